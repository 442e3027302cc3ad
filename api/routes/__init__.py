"""HTTP routes, one module per domain: parse, call a service, shape the response."""
