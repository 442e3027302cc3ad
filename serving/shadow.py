"""Shadow traffic in the gateway: after production has answered a by-name request, a share of
such requests is sent again to the adapter's shadow version, in the background, and the pair
is kept (api.services.shadow). A mirror never delays, changes or fails the user's answer; at
most `serving_max_shadow_in_flight` run at once per gateway, more are skipped (counted)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.db import get_engine
from api.services import shadow as shadow_service
from api.services.resolver import Resolution
from serving.engines.base import EngineRequest
from serving.schemas import Endpoint

if TYPE_CHECKING:
    from serving.gateway import Gateway

log = logging.getLogger(__name__)


def answer_text(response: dict[str, Any]) -> str:
    """The first choice's text of a chat or completion answer."""
    choices = response.get("choices") or [{}]
    first = choices[0]
    return str((first.get("message") or {}).get("content") or first.get("text") or "")


@dataclass(frozen=True)
class Mirror:
    """One answered by-name request, as it would be sent again."""

    resolution: Resolution
    endpoint: Endpoint
    body: dict[str, Any]
    cache_salt: str | None
    production_output: str


class Shadows:
    def __init__(self, gateway: Gateway, *, max_in_flight: int, rng: random.Random | None = None):
        self.gateway = gateway
        self.max_in_flight = max_in_flight
        self.rng = rng or random.Random()
        self.tasks: set[asyncio.Task[None]] = set()
        self.skipped = 0

    def maybe(self, mirror: Mirror) -> None:
        """Mirror this answered request to the shadow version, if it is drawn."""
        resolution = mirror.resolution
        if resolution.shadow is None or resolution.version is None or resolution.canary:
            return
        if self.rng.random() * 100 >= resolution.shadow_percent:
            return
        if len(self.tasks) >= self.max_in_flight:
            self.skipped += 1
            return
        task = asyncio.get_running_loop().create_task(self._mirror(mirror))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _mirror(self, mirror: Mirror) -> None:
        version = mirror.resolution.shadow
        assert version is not None
        started = time.perf_counter()
        text = error = None
        try:
            adapter = await self.gateway.acquire(version)
            try:
                request = EngineRequest(endpoint=mirror.endpoint, adapter=adapter,
                                        cache_salt=mirror.cache_salt,
                                        body={**mirror.body, "stream": False, "n": 1})  # fmt: skip
                text = answer_text(await self.gateway.engine.complete(request))
            finally:
                self.gateway.release(version, adapter)
        except Exception as e:  # the candidate failed: that is a finding, not an outage
            error = f"{type(e).__name__}: {e}"[:500]
        latency = (time.perf_counter() - started) * 1000 if text is not None else None
        try:
            await run_in_threadpool(self._record, mirror, text=text, latency=latency, error=error)
        except Exception:
            log.exception("could not keep a shadow sample of %s", version.fine_tuned_model)

    def _record(
        self, mirror: Mirror, *, text: str | None, latency: float | None, error: str | None
    ) -> None:
        resolution = mirror.resolution
        assert resolution.shadow is not None and resolution.version is not None
        with Session(get_engine(self.gateway.settings.database_url)) as session:
            shadow_service.record(
                session, adapter_id=resolution.adapter_id or "",
                version_id=resolution.shadow.id, production_version_id=resolution.version.id,
                request=mirror.body, production_output=mirror.production_output,
                shadow_output=text, latency_ms=latency, error=error,
            )  # fmt: skip

    async def drain(self) -> None:
        """Wait for the mirrors in flight (tests, shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
