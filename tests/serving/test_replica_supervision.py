"""Supervision of the replicas the gateway starts: one that keeps dying is restarted with
exponential backoff, not once per health check. Real child processes that exit at once
stand in for a vLLM server that crashes on start (a bad flag, a model that no longer loads).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from api.settings import Settings
from serving.app import ServingRuntime
from serving.engines.base import Engine, EngineRequest, ReplicaStatus
from serving.metrics import GatewayMetrics
from serving.replicas import ReplicaProcess, RestartBackoff
from serving.setup import EngineSetup


def test_backoff_doubles_up_to_its_cap_and_resets_when_healthy() -> None:
    backoff = RestartBackoff(base=2.0, cap=30.0)
    delays = [backoff.failed(now=0.0) for _ in range(7)]
    assert delays == [0.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    backoff.healthy()
    assert backoff.failed(now=100.0) == 0.0 and backoff.due == 100.0


class NeverHealthy(Engine):
    """The engine's view of a replica that never answers its health check."""

    kind = "stub"

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def complete(self, request: EngineRequest) -> dict[str, Any]:
        raise NotImplementedError

    async def open_stream(self, request: EngineRequest) -> Any:
        raise NotImplementedError

    def status(self) -> list[ReplicaStatus]:
        return [ReplicaStatus(name=url, healthy=False) for url in self.urls]


@dataclass
class CrashingReplica(ReplicaProcess):
    """A replica process that exits at once; remembers when each start happened."""

    starts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.starts.append(time.monotonic())
        super().start()


def test_a_replica_that_keeps_crashing_is_restarted_with_backoff(tmp_path: Path) -> None:
    interval = 0.05
    settings = Settings(home=tmp_path, serving_health_interval=interval)
    replica = CrashingReplica(command=["/bin/false"], env={}, port=1,
                              log_path=tmp_path / "replica.log")  # fmt: skip
    runtime = ServingRuntime(settings, metrics=GatewayMetrics(CollectorRegistry()), engine=None)
    setup = EngineSetup(engine=NeverHealthy([replica.url]), replicas=[replica])

    async def supervise_for(seconds: float) -> None:
        task = asyncio.create_task(runtime.supervise(setup))
        await asyncio.sleep(seconds)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    replica.start()
    asyncio.run(supervise_for(2.0))
    replica.stop()
    gaps = [b - a for a, b in zip(replica.starts, replica.starts[1:], strict=False)]
    # Restarts keep coming, each no sooner than its backoff (0, 1, 2, 4, 8 ... intervals)
    # after the crash is seen; a restart every check would give ~2 / 0.05 = 40 starts.
    expected = RestartBackoff(base=interval)
    floors = [expected.failed(now=0.0) for _ in gaps]
    assert len(replica.starts) >= 4, replica.starts
    assert all(gap >= floor for gap, floor in zip(gaps, floors, strict=True)), (gaps, floors)
    assert len(replica.starts) <= 8, gaps


class Toggled(NeverHealthy):
    """The engine's view of a replica whose health a test switches."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(urls)
        self.healthy = True

    def status(self) -> list[ReplicaStatus]:
        return [ReplicaStatus(name=url, healthy=self.healthy) for url in self.urls]


def test_a_replica_that_hangs_after_serving_is_restarted_without_the_boot_grace(
    tmp_path: Path,
) -> None:
    """A replica that served, then stopped answering while its process lives on (a wedged
    engine), is restarted after `serving_hang_timeout`, not after the boot timeout."""
    settings = Settings(home=tmp_path, serving_health_interval=0.05,
                        serving_startup_timeout=300, serving_hang_timeout=0.5)  # fmt: skip
    replica = CrashingReplica(command=["sleep", "600"], env={}, port=1,
                              log_path=tmp_path / "replica.log")  # fmt: skip
    runtime = ServingRuntime(settings, metrics=GatewayMetrics(CollectorRegistry()), engine=None)
    engine = Toggled([replica.url])
    setup = EngineSetup(engine=engine, replicas=[replica])

    async def scenario() -> float:
        task = asyncio.create_task(runtime.supervise(setup))
        await asyncio.sleep(0.3)  # serving
        assert len(replica.starts) == 1
        engine.healthy, hung_at = False, time.monotonic()
        while len(replica.starts) == 1 and time.monotonic() - hung_at < 10:
            await asyncio.sleep(0.02)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return time.monotonic() - hung_at

    replica.start()
    try:
        waited = asyncio.run(scenario())
    finally:
        replica.stop()
    assert len(replica.starts) == 2, "a hung replica was never restarted"
    assert 0.5 - 0.05 <= waited < 5, waited  # the last healthy check: up to 1 interval before
