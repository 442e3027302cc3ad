"""A hostile tenant against the serving gateway (issue 13): tenant A sends what breaks, stalls
or out-spends a naive engine while tenant B works. A gets a clear 400 naming the parameter
(never a 5xx); B gets its right answer; a client that hangs up stops its generation and is
metered for what was generated. Real gateway, real in-process engine, tiny base.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, select

from api.db import get_engine
from api.models.usage import UsageRecord
from api.settings import Settings
from serving.engines.base import EngineRequest
from serving.engines.transformers import TransformersEngine
from serving.errors import EngineError
from serving.replicas import plan_replicas
from tests.conftest import bearer, new_tenant
from tests.serving.conftest import (
    LiveServer,
    Reference,
    answer,
    chat,
    free_port,
    healthy,
    live_gateway,
    wait_for,
)
from tests.serving.servingdata import BASE, QUESTIONS, TenantKey

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20


@pytest.fixture(scope="module")
def gateway(transformers_gateway: LiveServer) -> LiveServer:
    return transformers_gateway


def engine_of(server: LiveServer) -> TransformersEngine:
    engine = server.app.state.gateway.engine
    assert isinstance(engine, TransformersEngine)
    return engine


def complete(url: str, key: str, **body: Any) -> httpx.Response:
    body = {"model": BASE, "max_tokens": 4, "temperature": 0} | body
    return httpx.post(f"{url}/v1/completions", json=body, headers=bearer(key), timeout=120)


def refused(response: httpx.Response, *, param: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    return error


# Bounds, checked before anything is generated -------------------------------------------


@pytest.mark.parametrize(
    "prompt", [[100_000], [-5], [10**20], [], [[]], [[5, 6], [999_999]]], ids=repr
)
def test_token_ids_outside_the_vocabulary_are_a_400_naming_prompt(
    gateway: LiveServer, tenants: dict[str, TenantKey], prompt: Any
) -> None:
    refused(complete(gateway.url, tenants["a"].key, prompt=prompt), param="prompt")


def test_a_bad_prompt_never_fails_another_tenants_request(
    gateway: LiveServer, tenants: dict[str, TenantKey], adapters: dict, reference: Reference
) -> None:
    expected = reference.chat(adapters["b"], QUESTIONS[0])
    bad = [[100_000], [-5], [10**20], []] * 2

    def attack(prompt: Any) -> httpx.Response:
        return complete(gateway.url, tenants["a"].key, prompt=prompt)

    def work(_: int) -> httpx.Response:
        return chat(gateway.url, tenants["b"].key, "helper", QUESTIONS[0])

    with ThreadPoolExecutor(16) as pool:
        attacks = [pool.submit(attack, p) for p in bad]
        answers = list(pool.map(work, range(8)))
    assert [answer(r) for r in answers] == [expected] * 8
    assert [f.result().status_code for f in attacks] == [400] * len(bad)


def test_a_bad_row_inside_the_engine_fails_only_its_own_request(
    gateway: LiveServer, tenants: dict[str, TenantKey], adapters: dict, reference: Reference
) -> None:
    """Past the gateway's bounds (the engine's own guard): a batch holding a row that
    breaks generate() is run again request by request, so only that request fails, with a
    message that says nothing about anyone's input."""
    engine = engine_of(gateway)
    good_body = {"model": BASE, "max_tokens": 12, "temperature": 0,
                 "messages": [{"role": "user", "content": QUESTIONS[1]}]}  # fmt: skip

    async def together() -> list[Any]:
        good = [EngineRequest(endpoint="chat", body=good_body, adapter=None) for _ in range(3)]
        bad = EngineRequest(
            endpoint="completion",
            body={"model": BASE, "prompt": [5, 100_000], "max_tokens": 4, "temperature": 0},
            adapter=None,
        )
        calls = [engine.complete(r) for r in (good[0], bad, good[1], good[2])]
        return await asyncio.gather(*calls, return_exceptions=True)

    first, failed, *rest = asyncio.run(together())
    expected = reference.chat(None, QUESTIONS[1])
    for result in (first, *rest):
        assert isinstance(result, dict), result
        assert result["choices"][0]["message"]["content"] == expected
    assert isinstance(failed, EngineError)
    assert "index" not in failed.message.lower() and "100000" not in failed.message
    after = chat(gateway.url, tenants["b"].key, BASE, QUESTIONS[1])
    assert answer(after) == expected  # the engine lives on


def test_stop_lists_are_bounded(gateway: LiveServer, tenants: dict[str, TenantKey]) -> None:
    key = tenants["a"].key
    for stop in (["x"] * 50_000, ["a", "b", "c", "d", "e"], "y" * 10_000, ["ok", "z" * 600]):
        refused(chat(gateway.url, key, BASE, "hi", stop=stop), param="stop")
    assert chat(gateway.url, key, BASE, "hi", stop=["a", "b", "c", "d"]).status_code == 200


def test_rows_per_request_are_capped(gateway: LiveServer, tenants: dict[str, TenantKey]) -> None:
    key = tenants["a"].key
    many = complete(gateway.url, key, prompt=["What do bees"] * 65, max_tokens=1)
    assert refused(many, param="prompt")["code"] == "too_many_completions"
    refused(complete(gateway.url, key, prompt=["a", "b", "c", "d", "e"], n=16), param="n")
    at_cap = complete(gateway.url, key, prompt=["a", "b", "c", "d"], n=16, max_tokens=1)
    assert at_cap.status_code == 200 and len(at_cap.json()["choices"]) == 64


def test_token_limits_and_seeds_beyond_range_are_a_400_naming_them(
    gateway: LiveServer, tenants: dict[str, TenantKey]
) -> None:
    key = tenants["a"].key
    huge = refused(chat(gateway.url, key, BASE, "hi", max_tokens=10**20), param="max_tokens")
    assert huge["code"] == "context_length_exceeded"
    refused(
        chat(gateway.url, key, BASE, "hi", max_completion_tokens=10_000),
        param="max_completion_tokens",
    )
    refused(chat(gateway.url, key, BASE, "hi", seed=10**30, temperature=1), param="seed")


def test_prompt_bytes_are_capped_before_tokenizing(
    gateway: LiveServer, tenants: dict[str, TenantKey]
) -> None:
    started = time.perf_counter()
    response = complete(gateway.url, tenants["a"].key, prompt="What do bees make? " * 200_000)
    assert refused(response, param="prompt")["code"] == "prompt_too_large"
    in_messages = chat(gateway.url, tenants["a"].key, BASE, "é" * (MiB // 2 + 1))
    assert refused(in_messages, param="messages")["code"] == "prompt_too_large"
    # Tokenizing 3.8 MB takes seconds here: refused long before that.
    assert time.perf_counter() - started < 2


def test_bounds_are_documented_in_openapi(gateway: LiveServer) -> None:
    schemas = httpx.get(f"{gateway.url}/openapi.json").json()["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    stop_list = next(s for s in completion["stop"]["anyOf"] if s.get("type") == "array")
    assert stop_list["maxItems"] == 4 and stop_list["items"]["maxLength"] > 0
    token_lists = [s for s in completion["prompt"]["anyOf"] if s.get("type") == "array"]
    assert any(s["items"].get("minimum") == 0 for s in token_lists)
    assert all(s.get("minItems") == 1 for s in token_lists)
    assert "serving_max_rows_per_request" in completion["n"]["description"]
    assert "serving_max_prompt_bytes" in completion["prompt"]["description"]


# No request holds the engine or the event loop -------------------------------------------


@pytest.fixture(scope="module")
def roomy_gateway(
    serving_settings: Settings, tenants: dict[str, TenantKey]
) -> Iterator[LiveServer]:
    """A gateway that lets multi-MB prompts through to the tokenizer."""
    settings = serving_settings.model_copy(
        update={
            "serving_engine": "transformers",
            "serving_torch_threads": 1,
            "serving_max_prompt_bytes": 8 * MiB,
            "rate_limits_enabled": False,  # it would refuse the prompt for its size
        }
    )
    with live_gateway(settings) as server:
        yield server


def test_health_answers_while_a_huge_prompt_is_tokenized(
    roomy_gateway: LiveServer, tenants: dict[str, TenantKey]
) -> None:
    url, key = roomy_gateway.url, tenants["a"].key
    outcome: dict[str, Any] = {}

    def huge() -> None:
        started = time.perf_counter()
        outcome["response"] = chat(url, key, BASE, "What colour is the sky? " * 130_000)
        outcome["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=huge)
    thread.start()
    time.sleep(0.3)  # the body is sent and being tokenized
    worst = 0.0
    with httpx.Client(base_url=url, timeout=60) as client:
        while thread.is_alive():
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.05)
    thread.join()
    refused(outcome["response"], param="messages")  # longer than the context
    assert outcome["seconds"] > 1.0  # it did take a while to tokenize
    assert worst < outcome["seconds"] / 4, (worst, outcome["seconds"])


def test_a_big_request_does_not_hold_the_engine(
    gateway: LiveServer, tenants: dict[str, TenantKey], adapters: dict, reference: Reference
) -> None:
    """64 rows (the cap) run as slices of the batch size with others' requests between
    them: tenant B's short chat is answered long before A's big request ends."""
    engine = engine_of(gateway)

    def big() -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        response = complete(gateway.url, tenants["a"].key, prompt=["a", "b", "c", "d"], n=16,
                            max_tokens=240, temperature=1.0)  # fmt: skip
        return response, time.perf_counter() - started

    with ThreadPoolExecutor(1) as pool:
        a = pool.submit(big)
        wait_for(lambda: engine.status()[0].queue_depth > 0, timeout=30, what="A's rows")
        started = time.perf_counter()
        b = chat(gateway.url, tenants["b"].key, "helper", QUESTIONS[3])
        b_took = time.perf_counter() - started
        a_response, a_took = a.result()
    assert a_response.status_code == 200 and len(a_response.json()["choices"]) == 64
    assert answer(b) == reference.chat(adapters["b"], QUESTIONS[3])
    assert engine.largest_batch <= engine.max_batch_size
    assert b_took < a_took / 3, (b_took, a_took)


# A client that hangs up ------------------------------------------------------------------


def usage_rows(settings: Settings, tenant_id: str) -> list[UsageRecord]:
    with Session(get_engine(settings.database_url)) as session:
        query = select(UsageRecord).where(UsageRecord.tenant_id == tenant_id)
        return list(session.exec(query.order_by(UsageRecord.created_at)))  # type: ignore[arg-type]


@pytest.fixture
def stranger(serving_settings: Settings) -> TenantKey:
    tenant_id, key = new_tenant(serving_settings)
    return TenantKey(tenant_id=tenant_id, key=key, name="stranger")


# 64 rows (the cap) of up to 240 tokens: several seconds of work here.
LONG = {"prompt": [f"Tell me about {w}" for w in "abcdefghijklmnop"], "n": 4, "max_tokens": 240}


@pytest.fixture(scope="module")
def whole_long(gateway: LiveServer, tenants: dict[str, TenantKey]) -> tuple[float, dict]:
    """How long LONG takes when nobody hangs up, and its usage."""
    started = time.perf_counter()
    full = complete(gateway.url, tenants["b"].key, **LONG)
    assert full.status_code == 200, full.text
    return time.perf_counter() - started, full.json()["usage"]


def test_a_stream_the_client_drops_stops_and_is_metered(
    gateway: LiveServer,
    serving_settings: Settings,
    stranger: TenantKey,
    whole_long: tuple[float, dict],
) -> None:
    engine = engine_of(gateway)
    body = {"model": BASE, "temperature": 0, "stream": True, **LONG}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body,
                      headers=bearer(stranger.key), timeout=60) as response:  # fmt: skip
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
    _assert_stopped_and_metered(
        engine, serving_settings, stranger, whole_long, dropped=time.perf_counter()
    )


def test_a_request_the_client_drops_stops_and_is_metered(
    gateway: LiveServer,
    serving_settings: Settings,
    stranger: TenantKey,
    whole_long: tuple[float, dict],
) -> None:
    engine = engine_of(gateway)
    body = {"model": BASE, "temperature": 0, **LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/completions", json=body, headers=bearer(stranger.key),
                   timeout=httpx.Timeout(60, read=0.5))  # fmt: skip
    _assert_stopped_and_metered(
        engine, serving_settings, stranger, whole_long, dropped=time.perf_counter()
    )


def _assert_stopped_and_metered(
    engine: Any,
    settings: Settings,
    tenant: TenantKey,
    whole_long: tuple[float, dict],
    *,
    dropped: float,
) -> None:
    """The engine went idle well before a whole run's time, and the request is metered as
    499 with the prompt and a part of the completion."""
    full_seconds, full_usage = whole_long
    wait_for(lambda: engine.status()[0].queue_depth == 0, timeout=60, what="engine idle")
    stopped_after = time.perf_counter() - dropped
    wait_for(lambda: usage_rows(settings, tenant.tenant_id), timeout=10, what="usage")
    (cut,) = usage_rows(settings, tenant.tenant_id)
    assert cut.status_code == 499
    assert 0 < cut.prompt_tokens <= full_usage["prompt_tokens"]
    assert 0 < cut.completion_tokens < full_usage["completion_tokens"] / 2
    assert stopped_after < full_seconds / 4, (stopped_after, full_seconds)


def test_each_tenant_gets_its_own_cache_salt() -> None:
    from serving.gateway import tenant_cache_salt

    a, b = tenant_cache_salt("tenant-a-id"), tenant_cache_salt("tenant-b-id")
    assert a != b and a == tenant_cache_salt("tenant-a-id")
    assert "tenant-a-id" not in a and len(a) <= 128  # vLLM's limit


# On vLLM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_gateway(
    serving_settings: Settings, tiny_base: Path, tenants: dict[str, TenantKey]
) -> Iterator[tuple[LiveServer, str]]:
    """The gateway over one real vLLM replica (~30 s to boot): (gateway, replica URL)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vllm")
    ported = serving_settings.model_copy(update={"serving_replica_port": free_port()})
    replica = plan_replicas(ported, model_dir=tiny_base, served_name=BASE, count=1)[0]
    replica.start()
    try:
        wait_for(lambda: healthy(replica.url) or not replica.alive(), timeout=240,
                 what="vLLM replica")  # fmt: skip
        assert replica.alive(), replica.log_path.read_text()[-3000:]
        settings = serving_settings.model_copy(
            update={"serving_engine": "vllm", "serving_replicas": [replica.url]}
        )
        with live_gateway(settings, timeout=60) as server:
            yield server, replica.url
    finally:
        replica.stop()


def prefix_cache_hits(replica_url: str) -> float:
    lines = httpx.get(f"{replica_url}/metrics", timeout=10).text.splitlines()
    hits = [x for x in lines if x.startswith("vllm:prefix_cache_hits_total")]
    return sum(float(x.rsplit(" ", 1)[1]) for x in hits)


def test_vllm_prefix_cache_is_never_shared_across_tenants(
    vllm_gateway: tuple[LiveServer, str], tenants: dict[str, TenantKey]
) -> None:
    """Tenant B sends the prompt tenant A just sent (even naming A's salt): it finds none of
    A's cached blocks, so its time to first token says nothing about A's prompts."""
    from serving.gateway import tenant_cache_salt

    server, replica = vllm_gateway
    first, second = list(range(3, 163)), list(range(163, 323))  # ten full cache blocks each

    def ask(label: str, prompt: list[int], **extra: Any) -> None:
        response = complete(server.url, tenants[label].key, prompt=prompt, max_tokens=1, **extra)
        assert response.status_code == 200, response.text

    ask("a", first)
    ask("a", second)
    time.sleep(0.5)
    before = prefix_cache_hits(replica)
    ask("b", first)
    ask("b", second, cache_salt=tenant_cache_salt(tenants["a"].tenant_id))
    time.sleep(0.5)
    assert prefix_cache_hits(replica) == before  # B hit nothing of A's
    ask("a", first)
    wait_for(lambda: prefix_cache_hits(replica) > before, timeout=10, what="A's own cache hit")


def test_vllm_refuses_bad_token_ids_and_meters_a_dropped_stream(
    vllm_gateway: tuple[LiveServer, str], serving_settings: Settings, stranger: TenantKey
) -> None:
    server, _ = vllm_gateway
    for prompt in ([100_000], [-5], [10**20], []):
        refused(complete(server.url, stranger.key, prompt=prompt), param="prompt")
    body = {"model": BASE, "prompt": "Tell me", "n": 8, "temperature": 1.0, "max_tokens": 240,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers=bearer(stranger.key), timeout=60) as response:  # fmt: skip
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
    wait_for(lambda: usage_rows(serving_settings, stranger.tenant_id), timeout=10, what="usage")
    (cut,) = usage_rows(serving_settings, stranger.tenant_id)
    assert cut.status_code == 499
    assert cut.prompt_tokens > 0 and 0 < cut.completion_tokens < 8 * 240
