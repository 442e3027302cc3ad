"""The control plane's exceptions, rendered in the OpenAI error shape.

    LoraplexError                      base: status, type, code, param
    ├── InvalidRequest          400    bad parameter or body
    │   └── InvalidFile         400    a dataset or file that cannot be used
    ├── AuthenticationFailed    401    missing, unknown or revoked key
    ├── PermissionDenied        403    a valid key without the right to do this
    ├── NotFound                404    unknown id, route, or another tenant's object
    ├── RequestTimeout          408    the request body stalled past its idle timeout
    ├── Conflict                409    state does not allow the action (never a client typo:
    │                                  the SDK retries 409)
    ├── PayloadTooLarge         413    body or upload over its limit
    ├── RateLimited             429    over a per-tenant rate limit or quota (`type`: requests
    │                                  or tokens, as OpenAI); Retry-After and x-ratelimit-*
    └── ServiceUnavailable      503    a dependency is down; retry later

Services raise these; `install_error_handlers` maps them, plus FastAPI's validation errors,
unknown routes, values the database refuses (400) and anything unexpected, to
`{"error": {message, type, param, code}}`.
`error_responses` documents them for a route's `responses=` (and api.openapi for all routes).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class LoraplexError(Exception):
    status_code = 500
    type = "server_error"
    default_code: str | None = None
    # Sent as `x-should-retry` when set: the openai SDK retries 409 and 5xx unless told not to.
    should_retry: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers


class InvalidRequest(LoraplexError):
    status_code = 400
    type = "invalid_request_error"


class InvalidFile(InvalidRequest):
    default_code = "invalid_file"


class AuthenticationFailed(LoraplexError):
    status_code = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(LoraplexError):
    status_code = 403
    type = "invalid_request_error"
    default_code = "permission_denied"


class NotFound(LoraplexError):
    status_code = 404
    type = "invalid_request_error"
    default_code = "not_found"


class RequestTimeout(LoraplexError):
    status_code = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class Conflict(LoraplexError):
    """The request clashes with the object's state. Not retried by SDKs: resending the same
    request meets the same state (a race lost to another writer passes `headers` itself)."""

    status_code = 409
    type = "invalid_request_error"
    default_code = "conflict"
    should_retry = False


class PayloadTooLarge(LoraplexError):
    status_code = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimited(LoraplexError):
    """Over a per-tenant limit. OpenAI's shape: `type` names what ran out ("requests" or
    "tokens"), the code is always `rate_limit_exceeded`; api.services.limits builds them."""

    status_code = 429
    type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.type = kind


class ServiceUnavailable(LoraplexError):
    status_code = 503
    type = "server_error"
    default_code = "service_unavailable"


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def render(exc: LoraplexError) -> JSONResponse:
    body = error_body(exc.message, type=exc.type, param=exc.param, code=exc.code)
    headers = {} if exc.should_retry is None else {"x-should-retry": str(exc.should_retry).lower()}
    return JSONResponse(body, status_code=exc.status_code, headers=headers | (exc.headers or {}))


_HTTP_TYPES = {
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    413: PayloadTooLarge,
}


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


async def _on_loraplex_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LoraplexError)
    return render(exc)


def _body_problem(request: Request, error: dict[str, Any]) -> InvalidRequest | None:
    """The body as a whole is wrong (not JSON, or JSON but not an object): say exactly how,
    and what it was sent as when that explains it (api.middleware.JsonBodyMiddleware)."""
    loc = tuple(error.get("loc", ()))
    sent = request.scope.get("loraplex.sent_content_type")
    label = "" if sent is None else f" (sent as {sent})" if sent else " (sent with no Content-Type)"
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "JSON decode error")
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return InvalidRequest(
            f"The request body is not valid JSON{label}: {reason}{where}.", code="invalid_json"
        )
    if loc == ("body",) and error.get("type") in ("model_attributes_type", "dict_type"):
        kind = type(error.get("input")).__name__
        return InvalidRequest(
            f"The request body must be a JSON object, not {_JSON_KINDS.get(kind, kind)}{label}.",
            code="invalid_json",
        )
    return None


_JSON_KINDS = {
    "list": "an array",
    "str": "a string",
    "int": "a number",
    "float": "a number",
    "bool": "a boolean",
    "NoneType": "null",
}


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    problem = _body_problem(request, first)
    if problem is not None:
        return render(problem)
    param = _validation_param(tuple(first.get("loc", ())))
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return render(InvalidRequest(message, param=param, code="invalid_value"))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
    else:
        message = str(exc.detail)
    cls = _HTTP_TYPES.get(exc.status_code)
    if cls is not None:
        return render(cls(message))
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    code = "method_not_allowed" if exc.status_code == 405 else None
    body = error_body(message, type=kind, code=code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _on_data_error(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value, and in a request every value comes from the caller: e.g.
    # a NUL character, which PostgreSQL text cannot hold. A 5xx would have the SDK resend it.
    log.info("database refused a value on %s %s: %s", request.method, request.url.path, exc)
    return render(
        InvalidRequest(
            "A value in the request cannot be stored (for example, text with a NUL character).",
            code="invalid_value",
        )
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return render(LoraplexError("The server had an error while processing your request."))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LoraplexError, _on_loraplex_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(DataError, _on_data_error)
    app.add_exception_handler(Exception, _on_unexpected)


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer, as the OpenAI SDK reads it."""

    error: ErrorObject


ERROR_MEANINGS = {
    400: "Invalid request: a parameter or the body is malformed or not allowed.",
    401: "No API key, an unknown or revoked one, or the wrong kind of key for this route.",
    404: "Not found for this key: unknown ids, another tenant's objects, /v1/admin to tenants.",
    408: "The request body stalled: no bytes arrived for `body_idle_timeout` seconds.",
    409: "The object's current state does not allow this action.",
    413: "The request body is over its limit.",
    429: "Over a per-tenant rate limit or quota (`type`: requests or tokens); retry after "
    "`Retry-After` seconds unless `x-should-retry` is false.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries documenting these statuses in the OpenAI error shape."""
    out: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse, "description": ERROR_MEANINGS[s]} for s in statuses
    }
    if 429 in out:
        out[429]["headers"] = RATE_LIMIT_HEADERS
    return out


def _header(description: str, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


# What a 429 carries (the openai SDK reads them); the x-ratelimit-* also come on a served 200.
RATE_LIMIT_HEADERS = {
    "Retry-After": _header("Seconds until the request can succeed.", "integer"),
    "retry-after-ms": _header("The same, in milliseconds.", "integer"),
    "x-should-retry": _header("`false` when retrying soon cannot help (a daily quota)."),
    "x-ratelimit-limit-requests": _header("Requests allowed per window.", "integer"),
    "x-ratelimit-remaining-requests": _header("Requests left now.", "integer"),
    "x-ratelimit-reset-requests": _header("Until the request limit is whole again: `1s`."),
    "x-ratelimit-limit-tokens": _header("Tokens allowed per window.", "integer"),
    "x-ratelimit-remaining-tokens": _header("Tokens left now.", "integer"),
    "x-ratelimit-reset-tokens": _header("Until the token limit is whole again: `6m0s`."),
}
