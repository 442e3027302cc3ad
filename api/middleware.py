"""ASGI middleware: request body limits, JSON bodies whatever their content type, and
Prometheus request metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import LoraplexError, PayloadTooLarge, RequestTimeout, render


class BodyLimitMiddleware:
    """413 for bodies over their limit: uploads get `upload_limit`, everything else `limit`;
    408 for a body that stalls: no bytes for `idle_timeout` seconds before its end.

    Checks Content-Length up front and counts bytes as they stream in, so a chunked body
    cannot slip past the header check. The idle timeout covers only the wait for the body:
    once it has ended, receive() waits for a disconnect (streaming responses listen so) as
    long as it takes.
    """

    def __init__(
        self, app: ASGIApp, *, limit: int, upload_limit: int, idle_timeout: float | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit
        self.idle_timeout = idle_timeout

    def _limit_for(self, scope: Scope) -> int:
        if scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files":
            return self.upload_limit + 64 * 1024  # room for the multipart envelope
        return self.limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit_for(scope)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await render(_too_large(limit))(scope, receive, send)
            return
        seen = 0
        body_ended = False
        refusal: LoraplexError | None = None
        started = replaced = False

        async def counted() -> Message:
            nonlocal seen, body_ended, refusal
            if body_ended:
                return await receive()
            try:
                async with asyncio.timeout(self.idle_timeout):
                    message = await receive()
            except TimeoutError:
                assert self.idle_timeout is not None
                refusal = _stalled(self.idle_timeout)
                raise refusal from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_ended = not message.get("more_body", False)
                if seen > limit:
                    refusal = _too_large(limit)
                    raise refusal
            return message

        async def guarded_send(message: Message) -> None:
            # Whatever the app made of the aborted body (FastAPI turns it into a parse
            # error), the client is told the truth: 413 or 408.
            nonlocal started, replaced
            if refusal is None or started:
                started = started or message["type"] == "http.response.start"
                await send(message)
            elif not replaced:
                replaced = True
                await render(refusal)(scope, receive, send)

        await self.app(scope, counted, guarded_send)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")


def _stalled(timeout: float) -> RequestTimeout:
    # Closing the connection: the rest of a stalled body is not worth waiting for.
    return RequestTimeout(
        f"No part of the request body arrived for {timeout:g} seconds; send it without pauses.",
        headers={"Connection": "close"},
    )


UPLOAD_PATH = "/v1/files"  # the one route that takes a body other than JSON (multipart)
JSON_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# The content type a request arrived with, when JsonBodyMiddleware replaced it.
SENT_CONTENT_TYPE = "loraplex.sent_content_type"


class JsonBodyMiddleware:
    """Reads every body sent to a JSON route as JSON, whatever its Content-Type says.

    `curl -d '{...}'` labels its body application/x-www-form-urlencoded, other clients send
    none or text/plain; OpenAI-compatible servers read all of them as JSON, and so does this.
    Multipart bodies and the upload route are left alone. A body that is not JSON then gets
    a 400 saying so (api.errors), not a complaint about the wrong shape of a form.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._relabel(scope):
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        sent = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        scope = {
            **scope,
            "headers": [*headers, (b"content-type", b"application/json")],
            SENT_CONTENT_TYPE: sent,
        }
        await self.app(scope, receive, send)

    @staticmethod
    def _relabel(scope: Scope) -> bool:
        if scope["method"] not in JSON_METHODS or scope["path"].rstrip("/") == UPLOAD_PATH:
            return False
        sent = dict(scope.get("headers") or []).get(b"content-type", b"")
        media = sent.split(b";", 1)[0].strip().lower()
        is_json = media == b"application/json" or media.endswith(b"+json")
        return not is_json and not media.startswith(b"multipart/")


class MetricsMiddleware:
    """Request count and latency by route template, method and status."""

    def __init__(self, app: ASGIApp, *, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "loraplex_http_requests_total",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "loraplex_http_request_duration_seconds",
            "HTTP request latency by route and status.",
            ["method", "route", "status"],
            registry=registry,
        )

    def _route(self, scope: Scope) -> str:
        app: Any = scope.get("app")
        for route in getattr(getattr(app, "router", None), "routes", []):
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(getattr(route, "path", scope["path"]))
        return "<unmatched>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            labels = (scope["method"], self._route(scope), str(status))
            self.requests.labels(*labels).inc()
            self.latency.labels(*labels).observe(time.perf_counter() - start)
