"""Prometheus metrics of the gateway, registered on the app's CollectorRegistry.

Per-tenant numbers live in the usage table (record_usage); labels here stay low-cardinality:
endpoint, engine, replica.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.engines.base import ReplicaStatus

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "loraplex_serving_requests_total",
            "Completion requests by endpoint, adapter or base, and HTTP status.",
            ["endpoint", "target", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "loraplex_serving_tokens_total",
            "Tokens processed, by kind (prompt, completion).",
            ["kind"],
            registry=registry,
        )
        self.latency = Histogram(
            "loraplex_serving_request_seconds",
            "Whole-request latency of completions.",
            ["endpoint", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "loraplex_serving_time_to_first_token_seconds",
            "Time from request to the first streamed token.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "loraplex_serving_tokens_per_second",
            "Completion tokens per second of each request.",
            ["endpoint"],
            buckets=RATE_BUCKETS,
            registry=registry,
        )
        self.adapter_loads = Counter(
            "loraplex_serving_adapter_loads_total",
            "Adapter fetches and repairs (cache), loads/unloads (replicas).",
            ["event"],
            registry=registry,
        )
        self.adapter_refusals = Counter(
            "loraplex_serving_adapter_refusals_total",
            "Requests refused because an adapter version failed verification, by reason.",
            ["reason"],
            registry=registry,
        )
        self.loaded_adapters = Gauge(
            "loraplex_serving_loaded_adapters",
            "Adapters each replica holds.",
            ["replica"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "loraplex_serving_queue_depth",
            "Requests in flight or waiting, per replica.",
            ["replica"],
            registry=registry,
        )
        self.replica_up = Gauge(
            "loraplex_serving_replica_up",
            "1 when a replica passes its health check.",
            ["replica"],
            registry=registry,
        )

    def observe_replicas(self, replicas: list[ReplicaStatus]) -> None:
        for replica in replicas:
            self.loaded_adapters.labels(replica.name).set(len(replica.loaded))
            self.queue_depth.labels(replica.name).set(replica.queue_depth)
            self.replica_up.labels(replica.name).set(1 if replica.healthy else 0)
