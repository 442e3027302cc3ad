"""The serving gateway's exceptions, on the control plane's tree (api/errors.py):

    LoraplexError
    ├── InvalidRequest            400  (api)  a bad sampling parameter, a prompt too long
    │   └── UnsupportedParameter  400  the in-process engine cannot honour a parameter
    ├── NotFound                  404  (api)  `model_not_found`
    ├── ServiceUnavailable        503  (api)  no replica up: Retry-After set
    ├── AdapterIntegrityError     500  a stored adapter's bytes do not match the registry;
    │                                  `reason` (incomplete, unreadable, altered, unsafe_path)
    │                                  labels the refusal metric
    └── EngineError               500  an engine failed on a valid request

`upstream_error` turns a vLLM error body (integer `code`) into the OpenAI shape, keeping a
4xx a 4xx: a client mistake is never answered with a 5xx (the SDK would resend it).
"""

from __future__ import annotations

from typing import Any

from api.errors import InvalidRequest, LoraplexError, NotFound, ServiceUnavailable

# The openai SDK retries 5xx unless told not to: a corrupt adapter stays corrupt.
NO_RETRY = {"x-should-retry": "false"}


class UnsupportedParameter(InvalidRequest):
    default_code = "unsupported_parameter"


class AdapterIntegrityError(LoraplexError):
    """The server's own copy is bad, not the request: a 5xx, but one the SDK must not resend
    (a corrupt adapter stays corrupt), and never a 4xx that would blame the caller."""

    default_code = "adapter_integrity_error"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, headers=NO_RETRY)
        self.reason = reason


class EngineError(LoraplexError):
    default_code = "engine_error"


def no_replica(retry_after: int) -> ServiceUnavailable:
    return ServiceUnavailable(
        "No serving replica is available right now; retry shortly.",
        code="no_replica_available",
        headers={"Retry-After": str(retry_after)},
    )


def upstream_error(status: int, body: Any) -> LoraplexError:
    """A vLLM error response as a Loraplex error of the same class (4xx stays 4xx)."""
    error = body.get("error", body) if isinstance(body, dict) else {}
    message = str(error.get("message") or body or f"engine answered HTTP {status}")
    param = error.get("param") if isinstance(error.get("param"), str) else None
    code = error.get("code") if isinstance(error.get("code"), str) else None
    if status == 404:
        return NotFound(message, param=param, code=code or "not_found")
    if 400 <= status < 500:
        # 409/422 and friends are still the client's request: a plain 400, never retried.
        return InvalidRequest(message, param=param, code=code or "invalid_request")
    return EngineError(message, code=code)
