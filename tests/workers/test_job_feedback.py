"""What a job tells its owner while and after it runs (issue 21): an event as each phase
begins, an estimated finish once steps run, and a loud warning (and a promotion that needs
force) when the adapter learned nothing measurable. Real worker processes, the tiny base."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import bearer, new_admin_key
from tests.workers.conftest import TINY, hp, upload, wait_for_status

pytestmark = pytest.mark.timeout(300)
TERMINAL = {"succeeded", "failed", "cancelled"}
PHASES = [
    "loading_base_model",
    "probing_before",
    "training",
    "probing_after",
    "saving",
    "probing_as_served",
    "uploading",
    "registering",
]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_phase_reports_and_the_finish_is_estimated(
    sdk: openai.OpenAI, start_worker, live_url: str
) -> None:
    start_worker()
    job = sdk.fine_tuning.jobs.create(
        model=TINY,
        training_file=upload(sdk),
        suffix="phases",
        method=hp(n_epochs=3, batch_size=4, method="qlora"),
    )
    estimates: list[int] = []
    deadline = time.monotonic() + 240
    while (current := sdk.fine_tuning.jobs.retrieve(job.id)).status not in TERMINAL:
        assert time.monotonic() < deadline, current.status
        if current.estimated_finish is not None:
            estimates.append(current.estimated_finish)
        time.sleep(0.1)
    assert current.status == "succeeded", current.error

    events = list(reversed(list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))))
    phases = [e.data["phase"] for e in events if e.data and "phase" in e.data]
    assert list(dict.fromkeys(phases)) == PHASES, phases  # each phase, in order
    for event in events:
        if event.data and "phase" in event.data:
            assert event.message and event.level in {"info", "warn"}
    at = {
        p: next(i for i, e in enumerate(events) if (e.data or {}).get("phase") == p) for p in PHASES
    }
    steps = [i for i, e in enumerate(events) if e.type == "metrics"]
    # Step progress comes between the training phase and the probe after it.
    assert steps and at["training"] < min(steps) and max(steps) < at["probing_after"]
    started = next(
        i for i, e in enumerate(events) if e.message.startswith("Fine-tuning job started")
    )
    assert started < at["loading_base_model"]
    assert events[-1].message == "The job has successfully completed"

    # Once steps ran, the running job carried a Unix timestamp for its finish; as on
    # OpenAI, a finished job has none.
    assert estimates, "estimated_finish stayed null while the job ran"
    assert all(current.created_at <= t <= time.time() + 600 for t in estimates), estimates
    assert current.estimated_finish is None

    # The probe as served (what the promotion gate reads) is in the API's version metrics.
    adapter = httpx.get(f"{live_url}/v1/adapters/phases", headers=bearer(sdk.api_key)).json()
    served = adapter["versions"][0]["metrics"]["exact_match_unquantized"]
    assert served["train"]["n"] > 0 and served["train"]["rate"] is not None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_adapter_that_learned_nothing_says_so_and_needs_force(
    sdk: openai.OpenAI, start_worker, live_url: str, settings
) -> None:
    start_worker()
    # One epoch at a tiny learning rate: the tiny base answers 0 prompts before and after.
    job = sdk.fine_tuning.jobs.create(
        model=TINY,
        training_file=upload(sdk),
        suffix="useless",
        method=hp(n_epochs=1, batch_size=4, method="lora", learning_rate_multiplier=0.01),
    )
    done = wait_for_status(sdk, job.id, TERMINAL)
    assert done.status == "succeeded", done.error
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))
    (warning,) = [e for e in events if e.level == "warn"]
    assert "learned nothing measurable" in warning.message
    assert "force" in warning.message and warning.data["no_measurable_improvement"] is True
    assert events[0].message == "The job has successfully completed"

    tenant_view = httpx.get(f"{live_url}/v1/adapters/useless", headers=bearer(sdk.api_key)).json()
    (version,) = tenant_view["versions"]
    assert version["metrics"]["no_measurable_improvement"] is True

    admin = bearer(new_admin_key(settings))
    url = f"{live_url}/v1/admin/adapters/{tenant_view['id']}/versions/1/promote"
    refused = httpx.post(url, json={"stage": "production"}, headers=admin)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "no_measurable_improvement"
    assert "learned nothing measurable" in refused.json()["error"]["message"]
    forced = httpx.post(url, json={"stage": "production", "force": True}, headers=admin)
    assert forced.status_code == 200 and forced.json()["production_version"] == 1
    audit = httpx.get(
        f"{live_url}/v1/admin/audit", params={"action": "promote.production"}, headers=admin
    ).json()["data"]
    assert [e["forced"] for e in audit] == [True]
