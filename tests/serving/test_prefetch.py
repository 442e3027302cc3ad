"""Prefetch on promotion (serving/prefetch.py): a version that starts taking by-name traffic,
as production or as a canary, is loaded on a replica before its first request, and only
into room. The gateway is the real app over a real SQLite registry, adapters the trainer's,
fetched and verified into the gateway's cache; the vLLM replica is a stub (the HTTP seam,
test_vllm_routing.py), so what the gateway asked of it can be read back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from sqlmodel import Session

from api.db import get_engine, upgrade
from api.services.promotion import set_canary
from api.services.tenants import Principal
from api.settings import Settings
from serving.engines.base import LocalAdapter
from serving.engines.vllm import VLLMEngine
from tests.conftest import bearer, new_tenant
from tests.serving.conftest import LiveServer, live_gateway
from tests.serving.servingdata import BASE, TenantKey, register
from tests.serving.test_vllm_routing import SERVED, ZERO, stub_vllm

ADMIN = Principal(key_id="test-admin", tenant_id=None, is_admin=True)


def loaded_within(stub: LiveServer, name: str, *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in stub.app.state.loaded:
            return True
        time.sleep(0.1)
    return False


def test_production_and_canary_versions_are_loaded_before_their_first_request(
    tmp_path: Path, tiny_base: Path, adapters: dict[str, Path]
) -> None:
    url = f"sqlite:///{tmp_path / 'loraplex.db'}"
    upgrade(url)
    settings = Settings(
        home=tmp_path, database_url=url, storage_url=f"file://{tmp_path / 'artifacts'}",
        base_model=BASE, base_models={BASE: str(tiny_base)}, serving_engine="vllm",
        serving_adapter_source="gateway", serving_cache_dir=tmp_path / "cache",
        serving_max_cpu_loras=3, serving_health_interval=0.5, max_lora_rank=8,
        serving_validate_new_versions=False,
    )  # fmt: skip
    tenant_id, key = new_tenant(settings, name="prefetch")
    tenant = TenantKey(tenant_id=tenant_id, key=key, name="prefetch")
    stub = LiveServer(stub_vllm(lora=True, lora_op="grouped"))
    with stub, live_gateway(settings.model_copy(update={"serving_replicas": [stub.url]})) as gw:
        production = register(settings, tenant=tenant, suffix="helper", adapter_dir=adapters["a"])
        candidate = register(settings, tenant=tenant, suffix="helper", adapter_dir=adapters["b"],
                             stage="candidate")  # fmt: skip
        assert loaded_within(stub, production.fine_tuned_model, timeout=30)
        path = Path(stub.app.state.loaded[production.fine_tuned_model])
        assert path.is_relative_to(tmp_path / "cache")  # verified into the gateway's cache
        assert not loaded_within(stub, candidate.fine_tuned_model, timeout=5)

        with Session(get_engine(url)) as session:  # the candidate as a 25 % canary
            set_canary(session, actor=ADMIN, adapter_id=candidate.adapter_id,
                       number=candidate.version, percent=25)  # fmt: skip
        assert loaded_within(stub, candidate.fine_tuned_model, timeout=30)

        # The first by-name request finds the production version loaded: no load in between.
        loads = len(stub.app.state.loaded)
        body = {"model": "helper", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(4):
            response = httpx.post(f"{gw.url}/v1/chat/completions", json=body,
                                  headers=bearer(key), timeout=30)  # fmt: skip
            assert response.status_code == 200, response.text
        served = set(stub.app.state.calls)
        assert served <= {production.fine_tuned_model, candidate.fine_tuned_model}
        assert len(stub.app.state.loaded) == loads


def test_preload_fills_room_on_the_least_busy_replica_and_never_unloads() -> None:
    first, second = LiveServer(stub_vllm(lora=True)), LiveServer(stub_vllm(lora=True))

    async def scenario() -> None:
        engine = VLLMEngine(urls=[first.url, second.url], zero_adapter=ZERO, served_model=SERVED,
                            budget=2, health_interval=60)  # fmt: skip
        await engine.start()
        try:
            busy = next(r for r in engine.replicas if r.url == first.url)
            busy.inflight = 5  # requests in flight there: a first request would go elsewhere
            held = [LocalAdapter(name=f"v{i}", path=Path(f"/a/{i}")) for i in range(6)]
            assert await engine.preload(held[0])
            assert list(second.app.state.loaded) == ["v0"]
            results = [await engine.preload(adapter) for adapter in held[1:]]
            assert results == [True, True, True, False, False]  # budget 2 on each, then full
            assert await engine.preload(held[0])  # already held: nothing to do
            everywhere = [*first.app.state.loaded, *second.app.state.loaded]
            assert sorted(everywhere) == ["v0", "v1", "v2", "v3"]  # nothing unloaded for it
        finally:
            await engine.close()

    with first, second:
        asyncio.run(scenario())
