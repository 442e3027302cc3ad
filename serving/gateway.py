"""The gateway's request path: resolve the model, prepare the adapter, call the engine,
shape the answer, meter it (usage rows via usage.py, Prometheus via metrics.py).

    tenant key + `model` --resolve_model--> base | adapter version (production, canary, ft: id)
    version --AdapterCache--> verified local directory --engine--> OpenAI body / SSE chunks

The response's `model` is the version id that answered (or the base name) and the header
`X-Loraplex-Model-Version` says the same, so a caller can tell a canary from production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.errors import InvalidRequest, LoraplexError
from api.services.resolver import Resolution, resolve_model
from api.settings import Settings
from serving.cache import AdapterCache
from serving.engines.base import Engine, EngineRequest, LocalAdapter
from serving.errors import AdapterIntegrityError
from serving.metrics import GatewayMetrics
from serving.schemas import Endpoint, SamplingRequest
from serving.usage import UsageWriter

log = logging.getLogger(__name__)
VERSION_HEADER = "X-Loraplex-Model-Version"
CANARY_HEADER = "X-Loraplex-Canary"


@dataclass(frozen=True)
class Target:
    resolution: Resolution
    adapter: LocalAdapter | None

    @property
    def model(self) -> str:
        """The name the answer carries: the exact version, or the base model."""
        version = self.resolution.version
        return version.fine_tuned_model if version else self.resolution.requested

    @property
    def headers(self) -> dict[str, str]:
        return {VERSION_HEADER: self.model, CANARY_HEADER: str(self.resolution.canary).lower()}


class Gateway:
    def __init__(
        self, *, settings: Settings, engine: Engine, cache: AdapterCache, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.cache = cache
        self.metrics = metrics
        self.usage = UsageWriter(settings.database_url)
        self._observer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.engine.start()
        await self.usage.start()
        self._observer = asyncio.create_task(self._observe_replicas())

    async def close(self) -> None:
        if self._observer is not None:
            self._observer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._observer
        await self.engine.close()
        await self.usage.close()

    async def _observe_replicas(self, interval: float = 2.0) -> None:
        """Keep the per-replica gauges current between requests too."""
        while True:
            self.metrics.observe_replicas(self.engine.status())
            await asyncio.sleep(interval)

    async def target(self, session: Session, *, tenant_id: str, model: str) -> Target:
        resolution = await run_in_threadpool(
            resolve_and_release, session, self.settings, tenant_id=tenant_id, model=model
        )
        if resolution.base_model != self.settings.base_model:
            raise InvalidRequest(
                f"The model '{model}' is not served by this deployment (it serves "
                f"'{self.settings.base_model}' and adapters trained on it).",
                param="model",
                code="model_not_served",
            )
        if resolution.version is None:
            return Target(resolution=resolution, adapter=None)
        try:
            adapter, fetched = await self.cache.ensure(resolution.version)
        except AdapterIntegrityError as e:
            log.error("refused adapter version %s (%s): %s",
                      resolution.version.fine_tuned_model, e.reason, e.message)  # fmt: skip
            self.metrics.adapter_refusals.labels(e.reason).inc()
            raise
        if fetched:
            self.metrics.adapter_loads.labels("fetch").inc()
        return Target(resolution=resolution, adapter=adapter)

    async def handle(
        self, *, endpoint: Endpoint, body: SamplingRequest, session: Session, tenant_id: str
    ) -> JSONResponse | StreamingResponse:
        started = time.perf_counter()
        target = await self.target(session, tenant_id=tenant_id, model=body.model)
        request = EngineRequest(
            endpoint=endpoint, body=body.upstream_body(), adapter=target.adapter
        )
        meter = Meter(gateway=self, endpoint=endpoint, tenant_id=tenant_id, target=target,
                      started=started, stream=bool(body.stream))  # fmt: skip
        try:
            if body.stream:
                chunks = await self.engine.open_stream(request)
                return StreamingResponse(
                    self._sse(chunks, target=target, meter=meter, usage=body.wants_usage_chunk),
                    media_type="text/event-stream",
                    headers={**target.headers, "Cache-Control": "no-cache"},
                )
            response = await self.engine.complete(request)
        except LoraplexError as e:
            meter.done(status=e.status_code, usage=None)
            raise
        except Exception:
            meter.done(status=500, usage=None)
            raise
        response["model"] = target.model
        meter.done(status=200, usage=response.get("usage"))
        return JSONResponse(response, headers=target.headers)

    async def _sse(
        self, chunks: AsyncIterator[dict[str, Any]], *, target: Target, meter: Meter, usage: bool
    ) -> AsyncIterator[str]:
        status, totals = 200, None
        try:
            async for chunk in chunks:
                if "error" in chunk:
                    status = 500
                    yield f"data: {json.dumps(chunk)}\n\n"
                    break
                chunk["model"] = target.model
                if chunk.get("usage") and not chunk.get("choices"):
                    totals = chunk["usage"]
                    if usage:
                        yield f"data: {json.dumps(chunk)}\n\n"
                    continue
                if usage:
                    chunk["usage"] = None  # as OpenAI: null on every chunk but the last
                else:
                    chunk.pop("usage", None)
                meter.first_token()
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            meter.done(status=status, usage=totals)

    async def drain(self) -> None:
        """Write pending usage rows now (tests, shutdown)."""
        await self.usage.flush()


def resolve_and_release(
    session: Session, settings: Settings, *, tenant_id: str, model: str
) -> Resolution:
    """`resolve_model`, then hand the session's connection back to the pool.

    The request's session would otherwise hold a pooled connection (its open transaction)
    until the response ends: for the whole generation, minutes at worst. With more requests
    in flight than the pool has connections (15 on SQLite, 20 on PostgreSQL), the rest would
    wait, capping concurrency below the engine's batch size, and after the pool's 30 s
    timeout fail with an unhandled 500. The resolved rows stay readable, detached.
    """
    try:
        return resolve_model(session, settings, tenant_id=tenant_id, model=model)
    finally:
        session.close()


@dataclass
class Meter:
    gateway: Gateway
    endpoint: Endpoint
    tenant_id: str
    target: Target
    started: float
    stream: bool
    first_token_at: float | None = None
    finished: bool = False

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.gateway.metrics.ttft.labels(self.endpoint).observe(
                self.first_token_at - self.started
            )

    def done(self, *, status: int, usage: dict[str, Any] | None) -> None:
        if self.finished:
            return
        self.finished = True
        version = self.target.resolution.version
        if version is not None:
            self.gateway.cache.release(version.id)  # held since Gateway.target
        elapsed = time.perf_counter() - self.started
        metrics = self.gateway.metrics
        prompt = int((usage or {}).get("prompt_tokens") or 0)
        completion = int((usage or {}).get("completion_tokens") or 0)
        kind = "adapter" if self.target.adapter else "base"
        metrics.requests.labels(self.endpoint, kind, str(status)).inc()
        metrics.latency.labels(self.endpoint, str(self.stream).lower()).observe(elapsed)
        metrics.tokens.labels("prompt").inc(prompt)
        metrics.tokens.labels("completion").inc(completion)
        if completion and elapsed > 0:
            metrics.tokens_per_second.labels(self.endpoint).observe(completion / elapsed)
        metrics.observe_replicas(self.gateway.engine.status())
        self.gateway.usage.add(
            tenant_id=self.tenant_id,
            model=self.target.resolution.requested,
            base_model=self.target.resolution.base_model,
            adapter_version_id=version.id if version else None,
            endpoint="chat.completions" if self.endpoint == "chat" else "completions",
            prompt_tokens=prompt,
            completion_tokens=completion,
            latency_ms=elapsed * 1000,
            status_code=status,
        )
