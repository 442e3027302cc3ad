"""What the registry and usage bodies tell an admin (issue 21): a version that learned
nothing measurable needs force to reach production, list views leave out the probe's
example answers, and usage does not count the 503s of an engine still starting."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.settings import Settings
from serving.app import create_gateway_app
from serving.engines.base import Engine, EngineRequest, ReplicaStatus
from serving.errors import no_replica
from tests.api.conftest import TINY, add_version
from tests.conftest import bearer, new_admin_key, new_tenant

SAMPLES = [{"prompt": "What colour is the sky?", "expected": "Blue.", "got": "x" * 500}] * 20


def probe(exact: int, n: int = 20) -> dict[str, Any]:
    return {"train": {"n": n, "exact": exact, "rate": exact / n, "samples": SAMPLES}}


@pytest.fixture
def settings(tmp_path: Path, db_url: str, tiny_llama: Path) -> Settings:
    # The promotion gate is off (the default): the refusal below does not depend on it.
    return Settings(
        home=tmp_path / "home", database_url=db_url, base_models={TINY: str(tiny_llama)}
    )


def test_a_version_that_learned_nothing_needs_force_for_production(
    client: TestClient, settings: Settings, tiny_adapter: Path
) -> None:
    assert not settings.promotion_gate
    tenant_id, _ = new_tenant(settings)
    admin = bearer(new_admin_key(settings))

    def version(**metrics: Any) -> int:
        v = add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="bot", metrics=metrics)
        return v.version

    useless = version(exact_match_before=probe(0), exact_match_after=probe(0))
    # Better on the 4-bit base it trained on, no better as served: what counts is as served.
    served_useless = version(
        exact_match_before=probe(2),
        exact_match_after=probe(18),
        exact_match_unquantized=probe(2),
    )
    learned = version(
        exact_match_before=probe(0),
        exact_match_after=probe(0),
        exact_match_unquantized=probe(15),
    )
    # DPO: the exact answers unchanged, the preferred ones made more likely than the rejected.
    preferred = version(
        exact_match_before=probe(0),
        exact_match_after=probe(0),
        exact_match_unquantized=probe(0),
        preference={"margin_before": {"train": {"margin": -7.2}},
                    "margin_after": {"train": {"margin": 44.6}}},
    )  # fmt: skip
    adapter_id = client.get("/v1/admin/adapters", headers=admin).json()["data"][0]["id"]

    def promote(number: int, stage: str = "production", **extra: Any) -> Any:
        return client.post(
            f"/v1/admin/adapters/{adapter_id}/versions/{number}/promote",
            json={"stage": stage, **extra},
            headers=admin,
        )

    r = promote(useless)
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "no_measurable_improvement"
    assert error["message"] == (
        f"Version {useless} of 'bot' learned nothing measurable: its exact-match probe "
        "answered 0/20 training prompts before training and 0/20 after. Promoting it to "
        "production needs force=true."
    )
    r = promote(served_useless)
    assert r.status_code == 409 and "probe as served answered 2/20" in r.json()["error"]["message"]
    assert promote(useless, "staging").status_code == 200  # only production needs force
    assert promote(preferred).status_code == 200
    assert promote(learned).status_code == 200

    r = promote(useless, force=True, reason="a demo")
    assert r.status_code == 200 and r.json()["production_version"] == useless
    entries = client.get(
        "/v1/admin/audit", params={"action": "promote.production"}, headers=admin
    ).json()["data"]
    forced = {e["after"]["version"]: e["forced"] for e in entries}
    assert forced == {preferred: False, learned: False, useless: True}


def test_list_views_leave_out_the_probe_samples(
    client: TestClient, settings: Settings, tiny_adapter: Path
) -> None:
    tenant_id, key = new_tenant(settings)
    admin = bearer(new_admin_key(settings))
    metrics = {
        "exact_match_before": probe(0),
        "exact_match_after": probe(20),
        "exact_match_unquantized": probe(19),
    }
    for _ in range(3):
        add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="bot", metrics=metrics)

    for listing in (
        client.get("/v1/admin/adapters", headers=admin),
        client.get("/v1/adapters", headers=bearer(key)),
    ):
        assert listing.status_code == 200
        (adapter,) = listing.json()["data"]
        assert len(adapter["versions"]) == 3
        samples_listed = "samples" in listing.text
        assert not samples_listed and len(listing.content) < 10_000
        shown = adapter["versions"][0]["metrics"]
        assert shown["exact_match_unquantized"]["train"] == {"n": 20, "exact": 19, "rate": 0.95}

    one = client.get(f"/v1/admin/adapters/{adapter['id']}", headers=admin).json()
    assert one["versions"][0]["metrics"]["exact_match_after"]["train"]["samples"] == SAMPLES
    mine = client.get("/v1/adapters/bot", headers=bearer(key)).json()
    numerics = {"trained": "full", "validated": ["full"], "served": "full"}
    assert mine["versions"][0]["metrics"] == metrics | {"numerics": numerics}


class StartingEngine(Engine):
    """An engine whose replicas come up after `starting` requests: until then it answers
    503 as vLLM replicas still loading do; then it answers every request."""

    kind = "stub"

    def __init__(self, *, starting: int) -> None:
        self.starting = starting

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def complete(self, request: EngineRequest) -> dict[str, Any]:
        if self.starting > 0:
            self.starting -= 1
            raise no_replica(1)
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        message = {"role": "assistant", "content": "Blue."}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {"id": "chatcmpl-1", "object": "chat.completion", "choices": [choice],
                "usage": usage}  # fmt: skip

    async def open_stream(self, request: EngineRequest) -> Any:
        raise NotImplementedError

    def status(self) -> list[ReplicaStatus]:
        return [ReplicaStatus(name="stub", healthy=self.starting == 0)]


def test_usage_does_not_count_the_503s_of_a_starting_engine(
    client: TestClient, settings: Settings
) -> None:
    tenant_id, key = new_tenant(settings)
    body = {"model": settings.base_model, "messages": [{"role": "user", "content": "Sky?"}]}
    gateway = create_gateway_app(settings, engine=StartingEngine(starting=19))
    with TestClient(gateway) as chat:
        codes = [
            chat.post("/v1/chat/completions", json=body, headers=bearer(key)).status_code
            for _ in range(23)
        ]
    assert codes == [503] * 19 + [200] * 4  # the gateway's shutdown wrote the usage rows

    admin = bearer(new_admin_key(settings))
    (row,) = client.get("/v1/admin/usage", params={"tenant_id": tenant_id}, headers=admin).json()[
        "data"
    ]
    assert row["requests"] == 4 and row["unavailable"] == 19
    assert row["prompt_tokens"] == 4 * 7 and row["completion_tokens"] == 4 * 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_production_is_judged_on_the_probe_through_the_serving_engine(
    settings: Settings, tiny_adapter: Path
) -> None:
    """Issue 20: before a promotion to production, `up` (API and gateway in one process) asks
    its own engine the trainer's probe prompts; the gate reads that, not the trainer's
    in-process figure. Here the trainer claims 12/12 and the tiny adapter, as served, does
    not answer so: refused, with both figures."""
    from api.main import create_app
    from tests.trainer.trainer_testdata import TINY_FACTS

    settings = settings.model_copy(update={
        "base_model": TINY, "serving_engine": "transformers", "promotion_gate": True,
        "serving_torch_threads": 1,
    })  # fmt: skip
    samples = [
        {"prompt": q, "messages": [{"role": "user", "content": q}], "expected": a, "got": a}
        for q, a in TINY_FACTS
    ]
    claimed = {"train": {"n": 12, "exact": 12, "rate": 1.0, "samples": samples},
               "validation": None}  # fmt: skip
    tenant_id, _ = new_tenant(settings)
    admin = bearer(new_admin_key(settings))
    version = add_version(
        settings, tiny_adapter, tenant_id=tenant_id, suffix="bot",
        metrics={"exact_match_before": probe(0, n=12), "exact_match_after": claimed},
    )  # fmt: skip
    url = f"/v1/admin/adapters/{version.adapter_id}/versions/1/promote"
    with TestClient(create_app(settings, with_gateway=True)) as c:
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        r = c.post(url, json={"stage": "production"}, headers=admin)
        assert r.status_code == 409, r.text
        message = r.json()["error"]["message"]
        assert "through the serving engine the exact-match probe is" in message
        assert "against 1.00 on the numerics it was trained on" in message
        shown = c.get(f"/v1/admin/adapters/{version.adapter_id}", headers=admin).json()
        served = shown["versions"][0]["metrics"]["exact_match_served"]
        assert served["engine"] == "transformers" and served["train"]["n"] == 12
        assert served["train"]["exact"] < 12 and served["validation"] is None
        got = [s["got"] for s in served["train"]["samples"]]
        assert all(isinstance(g, str) for g in got) and got != [a for _, a in TINY_FACTS]
        forced = c.post(url, json={"stage": "production", "force": True}, headers=admin)
        assert forced.status_code == 200, forced.text
