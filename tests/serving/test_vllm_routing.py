"""VLLMEngine's routing against stub vLLM servers (the HTTP seam): which replica and which
`model` each request is sent with. Real vLLM behaviour is covered in test_vllm_gateway.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.adapter_source import INFO_PATH
from serving.engines.base import EngineRequest, LocalAdapter
from serving.engines.vllm import VLLMEngine
from tests.serving.conftest import LiveServer

SERVED = "base-x"
ZERO = LocalAdapter(name="zero", path=Path("/zero"))


def stub_vllm(*, lora: bool, lora_op: str | None = None) -> FastAPI:
    """Just enough of vLLM's OpenAI server: health, models, LoRA load/unload, chat; with
    `lora_op`, the Loraplex plugin's info route saying which LoRA op it runs."""
    app = FastAPI()
    app.state.loaded = {}
    app.state.calls = []
    if lora_op is not None:

        @app.get(INFO_PATH)
        def info() -> dict[str, str]:
            return {"lora_op": lora_op}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        data = [{"id": SERVED, "parent": None}]
        data += [{"id": n, "parent": SERVED} for n in app.state.loaded]
        return {"data": data}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> JSONResponse:
        body = await request.json()
        if not lora or body["lora_name"] in app.state.loaded:
            return JSONResponse({"error": {"message": "no", "code": 400}}, status_code=400)
        app.state.loaded[body["lora_name"]] = body["lora_path"]
        return JSONResponse("ok")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> JSONResponse:
        app.state.loaded.pop((await request.json())["lora_name"], None)
        return JSONResponse("ok")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        model = (await request.json())["model"]
        app.state.calls.append(model)
        if model != SERVED and model not in app.state.loaded:
            return JSONResponse({"error": {"message": "no model", "code": 404}}, status_code=404)
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"},
                  "finish_reason": "length"}  # fmt: skip
        return JSONResponse({"id": "chatcmpl-stub", "object": "chat.completion", "created": 0,
                             "model": model, "choices": [choice], "usage": usage})  # fmt: skip

    return app


@pytest.fixture
def stubs() -> Iterator[dict[str, LiveServer]]:
    servers = {"lora": LiveServer(stub_vllm(lora=True)), "base": LiveServer(stub_vllm(lora=False))}
    for server in servers.values():
        server.__enter__()
    yield servers
    for server in servers.values():
        server.__exit__()


def request(adapter: LocalAdapter | None) -> EngineRequest:
    body = {"model": "client-name", "messages": [{"role": "user", "content": "hi"}]}
    return EngineRequest(endpoint="chat", body=body, adapter=adapter)


async def run_engine(stubs: dict[str, LiveServer], *, budget: int = 3, **kw: Any) -> VLLMEngine:
    engine = VLLMEngine(urls=[stubs["lora"].url], zero_adapter=ZERO, served_model=SERVED,
                        budget=budget, health_interval=60, **kw)  # fmt: skip
    await engine.start()
    return engine


def test_base_goes_to_a_base_only_replica_else_through_the_zero_adapter(
    stubs: dict[str, LiveServer],
) -> None:
    async def scenario() -> None:
        engine = await run_engine(stubs, base_urls=[stubs["base"].url])
        adapter = LocalAdapter(name="ft:x", path=Path("/a"))
        try:
            await engine.complete(request(None))
            await engine.complete(request(adapter))
            assert stubs["base"].app.state.calls == [SERVED]  # plain base rows, no LoRA there
            assert stubs["lora"].app.state.calls == ["ft:x"]
            stubs["base"].server.should_exit = True  # the base replica goes away
            await asyncio.sleep(0.5)
            await engine.complete(request(None))
            assert stubs["lora"].app.state.calls[-1] == "zero"  # never plain rows here
            assert "zero" in stubs["lora"].app.state.loaded
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_base_goes_plain_to_a_replica_whose_lora_op_keeps_base_rows_exact() -> None:
    """A replica running Loraplex's grouped op gets base rows plain; one running vLLM's own
    op (it says so, or has no info route) gets them through the zero adapter."""
    ops = {"grouped": "grouped", "stock": "vllm", "bare": None}
    servers = {name: LiveServer(stub_vllm(lora=True, lora_op=op)) for name, op in ops.items()}
    for server in servers.values():
        server.__enter__()

    async def scenario() -> None:
        for name, server in servers.items():
            engine = VLLMEngine(urls=[server.url], zero_adapter=ZERO, served_model=SERVED,
                                budget=3, health_interval=60)  # fmt: skip
            await engine.start()
            try:
                await engine.complete(request(None))
                expected = SERVED if name == "grouped" else "zero"
                assert server.app.state.calls == [expected], name
                assert ("zero" in server.app.state.loaded) == (name != "grouped")
            finally:
                await engine.close()

    try:
        asyncio.run(scenario())
    finally:
        for server in servers.values():
            server.__exit__()


def test_lru_unloads_idle_adapters_and_keeps_the_zero_adapter(
    stubs: dict[str, LiveServer],
) -> None:
    async def scenario() -> None:
        engine = await run_engine(stubs, budget=3)
        try:
            await engine.complete(request(None))
            for i in range(5):
                await engine.complete(request(LocalAdapter(name=f"ft:{i}", path=Path(f"/{i}"))))
            assert list(stubs["lora"].app.state.loaded) == ["zero", "ft:3", "ft:4"]
            assert engine.status()[0].loaded == ["zero", "ft:3", "ft:4"]
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_a_replica_that_lost_its_adapters_gets_them_reloaded(
    stubs: dict[str, LiveServer],
) -> None:
    async def scenario() -> None:
        engine = await run_engine(stubs)
        adapter = LocalAdapter(name="ft:y", path=Path("/y"))
        try:
            await engine.complete(request(adapter))
            stubs["lora"].app.state.loaded.clear()  # a restart between two health checks
            response = await engine.complete(request(adapter))
            assert response["model"] == "ft:y" and "ft:y" in stubs["lora"].app.state.loaded
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_replicas_named_by_dns_come_and_go_with_it(stubs: dict[str, LiveServer]) -> None:
    """`dns+http://name:port` (a headless Service) stands for every address the name has,
    looked up on each health check: a scaled-up replica takes traffic, a removed one none."""
    port = int(stubs["lora"].url.rsplit(":", 1)[1])
    addresses: list[str] = []
    lookups: list[tuple[str, int]] = []

    async def resolve(host: str, at: int) -> list[str]:  # the cluster's DNS, as a test sets it
        lookups.append((host, at))
        return list(addresses)

    async def scenario() -> None:
        engine = VLLMEngine(urls=[f"dns+http://vllm.loraplex:{port}"], zero_adapter=ZERO,
                            served_model=SERVED, budget=3, health_interval=60,
                            resolve=resolve)  # fmt: skip
        await engine.start()
        try:
            assert engine.status() == [] and not engine.ready()
            addresses.append("127.0.0.1")  # scaled up: a pod appears behind the name
            await engine.check_health()
            (replica,) = engine.status()
            assert replica.name == stubs["lora"].url and replica.healthy and engine.ready()
            await engine.complete(request(LocalAdapter(name="ft:z", path=Path("/z"))))
            assert stubs["lora"].app.state.calls == ["ft:z"]
            addresses.clear()  # scaled down
            await engine.check_health()
            assert engine.status() == [] and not engine.ready()
        finally:
            await engine.close()

    asyncio.run(scenario())
    assert set(lookups) == {("vllm.loraplex", port)}
