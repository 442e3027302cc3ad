"""/openapi.json as the app answers: what FastAPI's generated schema leaves out or gets wrong.

Read off each route's dependencies, so the schema cannot drift from the code:
- a route with parameters or a body can fail validation, which `api.errors` answers with
  400 in the OpenAI error shape (FastAPI documents a 422 `HTTPValidationError` instead);
- a route that reads the key (`get_principal`) takes a bearer token and may answer 401;
  an admin route (`get_admin`) answers 404 to a tenant key, as for an unknown URL;
- every request's body is limited (`BodyLimitMiddleware`): 413; a route that reads a body
  answers 408 when that body stalls.
Route-specific errors (an unknown id, a state conflict) stay on the route's `responses=`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import APIRoute

from api.deps import get_admin, get_principal
from api.errors import ERROR_MEANINGS, ErrorResponse

BEARER = "bearer"
REF = "#/components/schemas/{model}"
# Dependency -> the status it may answer with.
DEPENDENCY_ERRORS: dict[Callable[..., Any], int] = {get_principal: 401, get_admin: 404}


def document_app(app: FastAPI) -> None:
    """Make `app.openapi()` return the generated schema with the additions above."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _complete(generate(), app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _complete(schema: dict[str, Any], app: FastAPI) -> dict[str, Any]:
    components = schema.setdefault("components", {})
    _add_error_schema(components.setdefault("schemas", {}))
    components.setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A tenant API key; /v1/admin routes take a platform admin key.",
    }
    for route in (r for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema):
        for method in route.methods:
            operation = schema["paths"][route.path_format][method.lower()]
            _complete_operation(operation, route)
    return schema


def _complete_operation(operation: dict[str, Any], route: APIRoute) -> None:
    responses = operation["responses"]
    if _is_fastapi_validation_error(responses.get("422")):
        del responses["422"]
    statuses = {413}
    if get_flat_params(route.dependant) or route.body_field:
        statuses.add(400)
    if route.body_field or "requestBody" in operation:
        statuses.add(408)
    calls = set(_calls(route.dependant))
    statuses |= {status for call, status in DEPENDENCY_ERRORS.items() if call in calls}
    if get_principal in calls:
        operation.setdefault("security", [{BEARER: []}])
    for status in sorted(statuses):
        responses.setdefault(str(status), _error(status))


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _calls(sub)


def _add_error_schema(schemas: dict[str, Any]) -> None:
    shape = ErrorResponse.model_json_schema(ref_template=REF)
    for name, definition in {**shape.pop("$defs", {}), "ErrorResponse": shape}.items():
        schemas.setdefault(name, definition)
    # Only the 422s dropped above used these.
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)


def _is_fastapi_validation_error(response: dict[str, Any] | None) -> bool:
    content = (response or {}).get("content", {}).get("application/json", {})
    return str(content.get("schema", {}).get("$ref", "")).endswith("/HTTPValidationError")


def _error(status: int) -> dict[str, Any]:
    schema = {"$ref": REF.format(model="ErrorResponse")}
    return {
        "description": ERROR_MEANINGS[status],
        "content": {"application/json": {"schema": schema}},
    }
