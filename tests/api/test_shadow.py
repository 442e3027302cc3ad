"""Shadow traffic without a gateway's mirrors: what an admin sets and stops, what a by-name
request resolves to, how a pair is scored and kept, what a tenant sees of its pairs, and the
canary guard reading them.

No model generates here: the pairs are handed to `api.services.shadow.record` with the
strings a gateway would pass (production's answer, the candidate's, or its error). The
gateway mirroring real requests through an engine is tests/workers/test_evals.py.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.main import create_app
from api.models.evals import Eval
from api.services import shadow
from api.services.resolver import resolve_model
from api.settings import Settings
from serving.schemas import ChatCompletionRequest
from serving.shadow import Mirror
from serving.zero_adapter import zero_adapter_files
from tests.api.conftest import TINY, add_version
from tests.api.test_evals_api import Adapter, _guard, _start_canary, refused
from tests.api.test_graders import LABEL
from tests.conftest import bearer, new_admin_key, new_tenant

ANSWER = "Paris is the capital of France."
CONTAINS_IDEAL = {
    "type": "string_check",
    "name": "keeps production's answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.ideal}}",
    "operation": "ilike",
}


def zero_adapter(folder: Path, base_config: dict[str, Any]) -> Path:
    """A valid rank-1 LoRA of zeros for a base of this shape: it answers exactly as the base
    does, and registers in milliseconds."""
    folder.mkdir(parents=True)
    for name, data in zero_adapter_files(base_config, base_name=TINY).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shape = {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}
    return zero_adapter(tmp_path_factory.mktemp("shadow") / "adapter", shape)


def pair(
    session: Session,
    bot: Adapter,
    number: int,
    answer: str | None,
    *,
    error: str | None = None,
    request: dict[str, Any] | None = None,
    production_output: str = ANSWER,
) -> Any:
    """One mirrored request of `bot` (production: its version 1) answered by version
    `number` with `answer`, or failed with `error`, as the gateway hands it over."""
    return shadow.record(
        session,
        adapter_id=bot.id,
        version_id=bot.versions[number - 1].id,
        production_version_id=bot.versions[0].id,
        request=request or {"messages": [{"role": "user", "content": "Capital of France?"}]},
        production_output=production_output,
        shadow_output=answer,
        latency_ms=None if answer is None else 40.0,
        error=error,
    )


# -- the admin API ------------------------------------------------------------------------------


def test_an_admin_mirrors_a_candidate_and_stops(
    client: TestClient, settings: Settings, adapter_dir: Path
) -> None:
    bot = Adapter(client, settings, adapter_dir, versions=3)
    assert bot.promote(1).status_code == 200
    archived = bot.admin_call("POST", "/versions/3/promote", stage="archived")
    assert archived.status_code == 200, archived.text

    started = bot.admin_call("POST", "/shadow", version=2, percent=25)
    assert started.status_code == 200, started.text
    state = started.json()
    assert (state["object"], state["adapter_id"], state["adapter"]) == (
        "adapter.shadow",
        bot.id,
        bot.name,
    )
    assert (state["version"], state["percent"], state["summary"]["samples"]) == (2, 25, 0)
    [entry] = bot.audit("shadow.set")
    assert entry["after"] == {"shadow_version": 2, "percent": 25}

    for number in (1, 3):  # production, archived
        message = refused(
            bot.admin_call("POST", "/shadow", version=number, percent=10),
            409,
            None,
            "invalid_transition",
        )
        assert f"Version {number} is" in message
    for percent in (0, 101):
        refused(bot.admin_call("POST", "/shadow", version=2, percent=percent), 400, "percent")
    refused(bot.admin_call("POST", "/shadow", version=9, percent=10), 404, "version")
    as_tenant = [
        client.request(
            method,
            f"/v1/admin/adapters/{bot.id}/shadow",
            json={"version": 2, "percent": 100},
            headers=bearer(bot.key),
        )
        for method in ("GET", "POST", "DELETE")
    ]
    assert [r.status_code for r in as_tenant] == [404, 404, 404]
    now = bot.admin_call("GET", "/shadow").json()
    assert (now["version"], now["percent"], now["data"]) == (2, 25, [])
    assert len(bot.audit("shadow.set")) == 1

    stopped = bot.admin_call("DELETE", "/shadow")
    assert stopped.status_code == 200, stopped.text
    assert (stopped.json()["version"], stopped.json()["percent"]) == (None, 0)
    [entry] = bot.audit("shadow.stop")
    assert entry["before"]["percent"] == 25
    refused(bot.admin_call("DELETE", "/shadow"), 409, None, "no_shadow")
    assert len(bot.audit("shadow.stop")) == 1


# -- resolution -----------------------------------------------------------------------------------


def test_by_name_production_requests_carry_the_shadow_version(
    client: TestClient, settings: Settings, adapter_dir: Path, session: Session
) -> None:
    bot = Adapter(client, settings, adapter_dir, versions=3)
    assert bot.promote(1).status_code == 200
    assert bot.admin_call("POST", "/shadow", version=2, percent=30).status_code == 200
    v1, v2, v3 = bot.versions

    def resolve(model: str, **kwargs: Any) -> tuple[Any, ...]:
        """(version id, shadow version id, shadow percent, a canary draw, adapter id)"""
        found = resolve_model(session, settings, tenant_id=bot.tenant_id, model=model, **kwargs)
        assert found.version is not None
        shadow_id = found.shadow.id if found.shadow else None
        return found.version.id, shadow_id, found.shadow_percent, found.canary, found.adapter_id

    assert resolve(bot.name, canary=False) == (v1.id, v2.id, 30, False, bot.id)
    for version in (v1, v2):  # an exact version is that version alone
        assert resolve(version.fine_tuned_model) == (version.id, None, 0, False, None)

    assert bot.admin_call("POST", "/canary", version=3, percent=50).status_code == 200
    rng = random.Random(0)
    drawn = [resolve(bot.name, rng=rng) for _ in range(100)]
    # A canary draw is answered by the canary: never mirrored; production's are.
    assert set(drawn) == {(v1.id, v2.id, 30, False, bot.id), (v3.id, None, 0, True, None)}
    assert 20 < sum(1 for d in drawn if d[3]) < 80


# -- pairs: scored, kept, bounded -------------------------------------------------------------


def test_a_pair_is_scored_with_the_adapters_own_criteria(
    client: TestClient, settings: Settings, adapter_dir: Path, session: Session
) -> None:
    bot = Adapter(client, settings, adapter_dir, versions=2)
    assert bot.promote(1).status_code == 200
    # Fuzzy match with production's answer while the adapter has no attached eval.
    close = pair(session, bot, 2, "Paris is the capital of France!")
    far = pair(session, bot, 2, "The answer is Paris.")
    assert (close.passed, far.passed) == (True, False)
    assert [r["name"] for r in close.results] == ["matches the reference"]

    # Another tenant's eval under the same adapter name, made first, is never read.
    other_tenant, _ = new_tenant(settings)
    criteria = [{**CONTAINS_IDEAL, "reference": "nothing like it"}]
    _attach(session, tenant_id=other_tenant, name=bot.name, criteria=criteria)
    _attach(session, tenant_id=bot.tenant_id, name=bot.name, criteria=[LABEL, CONTAINS_IDEAL])
    wordy = pair(session, bot, 2, "It is PARIS. " + ANSWER.upper())
    assert wordy.passed is True  # fuzzy match would fail it; ilike containment passes it
    assert [(r["name"], r["type"]) for r in wordy.results] == [
        ("keeps production's answer", "string-check-grader")  # the judge is not called
    ]
    assert pair(session, bot, 2, "Lyon.").passed is False

    failed = pair(session, bot, 2, None, error="RuntimeError: adapter failed to load")
    assert (failed.passed, failed.results, failed.shadow_latency_ms) == (None, [], None)
    summary = shadow.summary(session, version_id=bot.versions[1].id)
    assert summary == {"samples": 5, "agreed": 2, "agreement": 0.4, "errors": 1,
                       "latency_p50_ms": 40.0}  # fmt: skip


def _attach(session: Session, *, tenant_id: str, name: str, criteria: list[dict[str, Any]]) -> None:
    """An eval attached to adapter `name`, as a fine-tune's validation file makes one."""
    session.add(Eval(tenant_id=tenant_id, name=f"{name} checks", adapter_name=name,
                     data_source_config={"type": "custom", "schema": {"type": "object"}},
                     testing_criteria=criteria))  # fmt: skip
    session.commit()


def test_what_is_kept_of_a_request_is_bounded(
    client: TestClient, settings: Settings, adapter_dir: Path, session: Session
) -> None:
    bot = Adapter(client, settings, adapter_dir, versions=2)
    asked = [{"role": "user", "content": "Capital of France?"}]
    kept = pair(session, bot, 2, ANSWER, request={"messages": asked, "user": "u-1", "n": 1})
    assert kept.request == {"messages": asked}
    prompt = pair(session, bot, 2, ANSWER, request={"prompt": "The capital of France is"})
    assert prompt.request == {"prompt": "The capital of France is"}
    huge = [{"role": "user", "content": "x" * (shadow.MAX_STORED_REQUEST + 1)}]
    big = pair(session, bot, 2, ANSWER, request={"messages": huge})
    assert (big.request, big.passed) == ({"truncated": True}, True)


def test_only_the_newest_pairs_of_a_version_are_kept(
    client: TestClient,
    settings: Settings,
    adapter_dir: Path,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shadow, "MAX_SAMPLES_PER_VERSION", 3)  # the bound, made small
    bot = Adapter(client, settings, adapter_dir, versions=3)
    other = pair(session, bot, 3, ANSWER, production_output="v3's own")
    for i in range(5):
        pair(session, bot, 2, ANSWER, production_output=f"answer {i}")
    kept = shadow.samples(session, version_id=bot.versions[1].id, limit=100)
    assert [s.production_output for s in kept] == ["answer 4", "answer 3", "answer 2"]
    assert shadow.summary(session, version_id=bot.versions[1].id)["samples"] == 3
    [still] = shadow.samples(session, version_id=bot.versions[2].id, limit=100)
    assert still.id == other.id


# -- the tenant's view ----------------------------------------------------------------------------


def test_a_tenant_reads_its_versions_pairs(
    client: TestClient, settings: Settings, adapter_dir: Path, session: Session
) -> None:
    bot = Adapter(client, settings, adapter_dir, versions=2)
    assert bot.promote(1).status_code == 200
    made = [pair(session, bot, 2, answer) for answer in (ANSWER, "Lyon.", ANSWER)]
    pair(session, bot, 2, None, error="TimeoutError: the candidate took too long")
    url = f"/v1/adapters/{bot.name}/versions/2/shadow"

    body = client.get(url, headers=bearer(bot.key))
    assert body.status_code == 200, body.text
    view = body.json()
    assert (view["object"], view["version"], view["has_more"]) == ("list", 2, False)
    assert view["summary"] == {"samples": 4, "agreed": 2, "agreement": 0.5, "errors": 1,
                               "latency_p50_ms": 40.0}  # fmt: skip
    newest = view["data"][0]
    assert (newest["object"], newest["passed"], newest["shadow_output"]) == (
        "shadow.sample",
        None,
        None,
    )
    assert newest["shadow_error"].startswith("TimeoutError")
    assert [s["id"] for s in view["data"][1:]] == [m.id for m in reversed(made)]
    assert view["data"][2]["production_output"] == ANSWER
    assert view["data"][2]["request"]["messages"][0]["content"] == "Capital of France?"
    one = client.get(url, params={"limit": 1}, headers=bearer(bot.key)).json()
    assert [s["id"] for s in one["data"]] == [newest["id"]]
    assert one["summary"]["samples"] == 4
    production = client.get(f"/v1/adapters/{bot.name}/versions/1/shadow", headers=bearer(bot.key))
    assert production.json()["summary"]["samples"] == 0

    _, stranger = new_tenant(settings)
    theirs = client.get(url, headers=bearer(stranger))
    ghost = client.get("/v1/adapters/bot-ghost/versions/2/shadow", headers=bearer(stranger))
    assert theirs.status_code == ghost.status_code == 404
    assert theirs.text.replace(bot.name, "<name>") == ghost.text.replace("bot-ghost", "<name>")


# -- the guarded canary -------------------------------------------------------------------------


def test_a_guarded_canary_disagreeing_with_production_is_aborted(
    client: TestClient, settings: Settings, adapter_dir: Path, session: Session
) -> None:
    disagreeing, few = (Adapter(client, settings, adapter_dir, versions=2) for _ in range(2))
    guard = {"min_shadow_agreement": 0.8, "min_shadow_samples": 5}
    # Pairs from before the canary started do not count.
    for _ in range(5):
        pair(session, few, 2, "Lyon.")
    for bot in (disagreeing, few):
        _start_canary(bot, {"canary_guard": guard})
    for answer in [ANSWER, ANSWER, "Lyon.", "Lyon.", "Lyon."]:
        pair(session, disagreeing, 2, answer)
    for _ in range(4):  # under min_shadow_samples: too few to judge
        pair(session, few, 2, "Lyon.")

    would = disagreeing.admin_call("GET", "/canary/guard").json()["would_abort"]
    assert would == "shadow agreement with production 0.400 over 5 pairs, below 0.800"
    assert _guard(disagreeing) == [disagreeing.id] and _guard(few) == []
    [entry] = disagreeing.audit("canary.abort")
    assert entry["actor_key_id"] == "system:canary-guard"
    assert entry["reason"] == f"canary guard: {would}"
    figures = entry["after"]["evidence"]["canary"]
    assert figures["version"] == 2
    assert figures["shadow"] == {"samples": 5, "agreed": 2, "agreement": 0.4, "errors": 0,
                                 "latency_p50_ms": 40.0}  # fmt: skip
    assert disagreeing.admin_call("GET", "/canary/guard").json()["canary_running"] is False
    assert few.audit("canary.abort") == []
    running = few.admin_call("GET", "/canary/guard").json()
    assert running["canary_running"] and running["would_abort"] is None
    assert running["canary"]["shadow"]["samples"] == 4


def test_a_shadow_version_leaving_candidacy_is_mirrored_no_more(
    client: TestClient, settings: Settings, adapter_dir: Path, session: Session
) -> None:
    promoted, archived, deleted = (
        Adapter(client, settings, adapter_dir, versions=2) for _ in range(3)
    )
    for bot in (promoted, archived, deleted):
        assert bot.promote(1).status_code == 200
        assert bot.admin_call("POST", "/shadow", version=2, percent=100).status_code == 200
    assert promoted.promote(2).status_code == 200
    gone = archived.admin_call("POST", "/versions/2/promote", stage="archived")
    assert gone.status_code == 200, gone.text
    assert deleted.admin_call("DELETE", "/versions/2").status_code == 200

    for bot in (promoted, archived, deleted):
        state = bot.admin_call("GET", "/shadow").json()
        assert (state["version"], state["percent"]) == (None, 0), state
        served = resolve_model(session, settings, tenant_id=bot.tenant_id, model=bot.name)
        assert served.shadow is None
        refused(bot.admin_call("DELETE", "/shadow"), 409, None, "no_shadow")


# -- the gateway's bound on mirrors in flight ---------------------------------------------------


def test_mirrors_past_the_in_flight_bound_are_skipped(
    settings: Settings, tiny_llama: Path, tmp_path: Path, session: Session
) -> None:
    """A real gateway and engine: with one mirror running, the next ones are dropped (and
    counted), never queued; once it is done, mirroring resumes."""
    served = settings.model_copy(update={
        "base_model": TINY, "base_models": {TINY: str(tiny_llama)},
        "serving_engine": "transformers", "serving_dtype": "float32",
        "serving_validate_new_versions": False, "serving_max_shadow_in_flight": 1,
    })  # fmt: skip
    # Zero adapters on the tiny base: the candidate answers exactly as production does.
    zero = zero_adapter(tmp_path / "zero", json.loads((tiny_llama / "config.json").read_text()))
    tenant_id, key = new_tenant(served)
    v1, v2 = (add_version(served, zero, tenant_id=tenant_id, suffix="mirrored") for _ in range(2))
    admin = bearer(new_admin_key(served))
    chat = {"model": "mirrored", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "What colour is the sky?"}]}  # fmt: skip
    with TestClient(create_app(served, with_gateway=True)) as client:
        url = f"/v1/admin/adapters/{v1.adapter_id}"
        promoted = client.post(f"{url}/versions/1/promote", json={"stage": "production"},
                               headers=admin)  # fmt: skip
        assert promoted.status_code == 200, promoted.text
        answer = _answer_once_served(client, chat, key)
        assert client.post(f"{url}/shadow", json={"version": 2, "percent": 100},
                           headers=admin).status_code == 200  # fmt: skip
        resolution = resolve_model(session, served, tenant_id=tenant_id, model="mirrored")
        assert resolution.shadow is not None and resolution.shadow.id == v2.id
        mirror = Mirror(resolution=resolution, endpoint="chat", cache_salt=None,
                        body=ChatCompletionRequest.model_validate(chat).upstream_body(),
                        production_output=answer)  # fmt: skip
        shadows = client.app.state.gateway.shadows  # type: ignore[attr-defined]

        def mirror_three_times() -> tuple[int, int]:
            for _ in range(3):  # in one step of the loop: the first has not finished
                shadows.maybe(mirror)
            return len(shadows.tasks), shadows.skipped

        assert client.portal.call(mirror_three_times) == (1, 2)  # type: ignore[union-attr]
        client.portal.call(shadows.drain)  # type: ignore[union-attr]
        assert client.portal.call(mirror_three_times) == (1, 4)  # type: ignore[union-attr]
        client.portal.call(shadows.drain)  # type: ignore[union-attr]
    pairs = shadow.samples(session, version_id=v2.id, limit=10)
    assert len(pairs) == 2
    assert {(p.shadow_output, p.passed, p.production_version_id) for p in pairs} == {
        (answer, True, v1.id)
    }
    assert all(p.shadow_latency_ms is not None for p in pairs)


def _answer_once_served(client: TestClient, chat: dict[str, Any], key: str) -> str:
    """The first answer, once the gateway's engine has started (503 until then)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = client.post("/v1/chat/completions", json=chat, headers=bearer(key))
        if response.status_code != 503:
            assert response.status_code == 200, response.text
            return str(response.json()["choices"][0]["message"]["content"])
        time.sleep(0.2)
    raise TimeoutError("the gateway's engine did not start")
