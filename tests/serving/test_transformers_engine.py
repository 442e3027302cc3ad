"""The in-process transformers + peft engine behind the real gateway, on the tiny base."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlmodel import Session

from api.db import get_engine
from api.models.adapters import Adapter
from api.settings import Settings
from serving.engines.transformers import TransformersEngine
from tests.conformance.serving_tour import assert_toured, tour
from tests.serving.conftest import LiveServer, Reference, answer, chat
from tests.serving.servingdata import BASE, QUESTIONS, TenantKey, register, variant

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gateway(transformers_gateway: LiveServer) -> LiveServer:
    return transformers_gateway


def test_each_tenant_gets_its_own_adapter_and_the_base_differs(
    gateway: LiveServer, tenants: dict[str, TenantKey], adapters: dict, reference: Reference
) -> None:
    for label in ("a", "b"):
        key = tenants[label].key
        got = [answer(chat(gateway.url, key, "helper", q)) for q in QUESTIONS]
        assert got == [reference.chat(adapters[label], q) for q in QUESTIONS]
    base = [answer(chat(gateway.url, tenants["a"].key, BASE, q)) for q in QUESTIONS]
    assert base == [reference.chat(None, q) for q in QUESTIONS]
    assert base != [reference.chat(adapters["a"], q) for q in QUESTIONS]
    assert base != [reference.chat(adapters["b"], q) for q in QUESTIONS]


def test_mixed_concurrent_traffic_is_batched_and_matches_sequential(
    gateway: LiveServer, tenants: dict[str, TenantKey]
) -> None:
    calls = [(label, model, q) for q in QUESTIONS for label, model in
             (("a", "helper"), ("b", "helper"), ("a", BASE))] * 2  # fmt: skip

    def run(call: tuple[str, str, str]) -> str:
        label, model, q = call
        return answer(chat(gateway.url, tenants[label].key, model, q))

    sequential = [run(c) for c in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        concurrent = list(pool.map(run, calls))
    assert concurrent == sequential
    engine = gateway.app.state.gateway.engine
    assert isinstance(engine, TransformersEngine) and engine.largest_batch > 1


def test_openai_sdk_streams_and_completes(
    gateway: LiveServer, tenants: dict[str, TenantKey]
) -> None:
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=tenants["b"].key, max_retries=0)
    messages: Any = [{"role": "user", "content": QUESTIONS[3]}]
    whole = sdk.chat.completions.create(
        model="helper", messages=messages, max_tokens=10, temperature=0
    )
    assert whole.model.startswith(f"ft:{BASE}:tenant-b:helper:")
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    chunks = list(
        sdk.chat.completions.create(
            model="helper", messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])
    done = sdk.completions.create(
        model="helper", prompt="What do bees", max_tokens=6, temperature=0
    )
    streamed = sdk.completions.create(
        model="helper", prompt="What do bees", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_sampling_parameters(gateway: LiveServer, tenants: dict[str, TenantKey]) -> None:
    key = tenants["a"].key
    two = chat(gateway.url, key, "helper", QUESTIONS[0], n=2, temperature=0.9, seed=7).json()
    again = chat(gateway.url, key, "helper", QUESTIONS[0], n=2, temperature=0.9, seed=7).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["choices"] == again["choices"]  # a seed makes sampling repeatable
    full = answer(chat(gateway.url, key, "helper", QUESTIONS[0], max_tokens=12))
    stopped = chat(gateway.url, key, "helper", QUESTIONS[0], stop=[full[2:4]]).json()
    assert stopped["choices"][0]["message"]["content"] == full[: full.index(full[2:4])]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    short = chat(gateway.url, key, "helper", QUESTIONS[0], max_tokens=2).json()
    assert short["usage"]["completion_tokens"] == 2
    assert short["choices"][0]["finish_reason"] == "length"


def test_unsupported_parameter_is_a_400(gateway: LiveServer, tenants: dict[str, TenantKey]) -> None:
    response = chat(gateway.url, tenants["a"].key, "helper", "hi", logprobs=True)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "logprobs"
    too_long = chat(gateway.url, tenants["a"].key, "helper", "hi", max_tokens=10_000)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_a_canary_share_is_served_and_labelled(
    gateway: LiveServer,
    serving_settings: Settings,
    tenants: dict[str, TenantKey],
    adapters: dict,
    reference: Reference,
    tmp_path: Path,
) -> None:
    tenant = tenants["a"]
    canary = register(
        serving_settings, tenant=tenant, suffix="helper",
        adapter_dir=variant(adapters["b"], tmp_path / "canary", scale=1.0), stage="staging",
    )  # fmt: skip
    with Session(get_engine(serving_settings.database_url)) as session:
        line = session.get(Adapter, canary.adapter_id)
        assert line is not None
        line.canary_version_id, line.canary_percent = canary.id, 100
        session.add(line)
        session.commit()
    try:
        response = chat(gateway.url, tenant.key, "helper", QUESTIONS[3])
        assert response.headers["x-loraplex-model-version"] == canary.fine_tuned_model
        assert response.headers["x-loraplex-canary"] == "true"
        assert answer(response) == reference.chat(adapters["b"], QUESTIONS[3])
    finally:
        with Session(get_engine(serving_settings.database_url)) as session:
            line = session.get(Adapter, canary.adapter_id)
            assert line is not None
            line.canary_version_id, line.canary_percent = None, 0
            session.add(line)
            session.commit()
    production = chat(gateway.url, tenant.key, "helper", QUESTIONS[3])
    assert production.headers["x-loraplex-canary"] == "false"


def test_chat_bodies_carry_the_fields_the_spec_requires_and_one_created(
    gateway: LiveServer, tenants: dict[str, TenantKey]
) -> None:
    """`choices[].logprobs` and `message.refusal` are required (nullable) in OpenAI's spec,
    and every chunk of one stream carries the same `created` (issue 19)."""
    import json
    import time

    import httpx

    body = chat(gateway.url, tenants["a"].key, BASE, QUESTIONS[0]).json()
    (choice,) = body["choices"]
    assert choice["logprobs"] is None and "logprobs" in choice
    assert choice["message"]["refusal"] is None and "refusal" in choice["message"]
    # Start ~0.2 s before a second boundary: a stream of 200 tokens (~0.4 s here) spans it.
    while not 0.75 < time.time() % 1 < 0.85:
        time.sleep(0.005)
    request = {"model": BASE, "messages": [{"role": "user", "content": QUESTIONS[0]}],
               "max_tokens": 200, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}  # fmt: skip
    created = set()
    headers = {"Authorization": f"Bearer {tenants['a'].key}"}
    url = f"{gateway.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=request, headers=headers, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                created.add(chunk["created"])
                for c in chunk["choices"]:
                    assert "logprobs" in c and c["logprobs"] is None
    assert len(created) == 1, created


def test_every_answer_conforms_to_the_official_openai_schemas(
    gateway: LiveServer, tenants: dict[str, TenantKey]
) -> None:
    """Issue 19: the scripted tour (tests/conformance/serving_tour.py), zero violations."""
    assert_toured(tour(gateway.url, tenants["a"].key, adapter="helper", base=BASE))


def test_a_gateway_is_ready_once_its_engine_answers(gateway: LiveServer) -> None:
    """/readyz of a gateway checks its engine as well as its database (the 503 while the
    engine starts is tested on `loraplex up`'s default, tests/workers/test_up.py)."""
    import httpx

    ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "serving": "ok"}
