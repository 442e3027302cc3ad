"""Evals end to end: real training and eval workers, a real gateway, the official SDK.

The base is the learnable tiny Llama (it answers every fact with the next fact's answer).
One adapter, `facts`, gets two versions: v1 trained on those wrong answers, v2 on the right
ones; another, `judge`, learns to label answers. Each job's validation file (the right
answers) becomes an eval attached to the adapter, run by the eval worker on every new
version and on production and the base (A/B). What a tenant and an admin then see:

- the SDK's eval with string_check and text_similarity criteria scores v2 above the base;
- a label_model judge (the served `judge` adapter) labels items and passes or fails each;
- the promotion policy promotes v2 over v1, refuses v1 back with the figures, both audited;
- a guarded canary of v1 is aborted on its own, and by-name traffic is production's again;
- shadow traffic to v1: users get production's answers, the pairs show v1 disagreeing.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from sqlmodel import Session, select

from api.db import get_engine
from api.models.adapters import Adapter
from api.models.evals import EvalRun
from api.services import graders
from api.settings import Settings
from tests.conftest import bearer, new_admin_key, serve_in_thread
from tests.trainer.trainer_testdata import TINY_FACTS, chat_row
from tests.workers.conftest import TINY, hp, versions, wait_for_status

pytestmark = pytest.mark.timeout(900)
FAST = {"batch_size": 4, "method": "lora", "learning_rate_multiplier": 50}
FINISHED = {"succeeded", "failed", "cancelled"}
JUDGE: dict[str, Any] = {
    "type": "label_model",
    "name": "judge",
    "model": "judge",  # the served adapter version, in each run
    "input": [{"role": "user", "content": "{{item.q}} {{sample.output_text}}"}],
    "labels": ["Y", "N"],  # one token each: what the tiny judge can learn in seconds
    "passing_labels": ["Y"],
}


@pytest.fixture
def settings(settings: Settings, learnable_llama) -> Settings:
    return settings.model_copy(
        update={
            "base_models": {TINY: str(learnable_llama)},
            "base_model": TINY,
            "serving_engine": "transformers",
            "canary_guard_interval": 1.0,
        }
    )


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _judged() -> list[dict[str, Any]]:
    """Each fact with its right answer and with a wrong one, as a jsonl run's entries."""
    answers = [a for _, a in TINY_FACTS]
    return [
        {"item": {"q": q, "ideal": a}, "sample": {"output_text": given}}
        for i, (q, a) in enumerate(TINY_FACTS)
        for given in (a, answers[(i + 3) % len(answers)])
    ]


def _judge_rows() -> list[dict[str, Any]]:
    """The judge's training: exactly the prompts the label_model grader will send."""
    rows = []
    for entry in _judged():
        messages = graders.judge_messages(graders.validate_criteria([JUDGE])[0], entry)
        label = "Y" if entry["sample"]["output_text"] == entry["item"]["ideal"] else "N"
        rows.append({"messages": [*messages, {"role": "assistant", "content": label}]})
    return rows


def _wait_runs(sdk: openai.OpenAI, eval_id: str, n: int, timeout: float = 300) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = list(sdk.evals.runs.list(eval_id, limit=100))
        if len(runs) >= n and all(r.status in ("completed", "failed", "canceled") for r in runs):
            return runs
        time.sleep(0.5)
    raise TimeoutError([(r.name, r.status) for r in sdk.evals.runs.list(eval_id)])


def _train(sdk: openai.OpenAI, *, training: str, validation: str) -> Any:
    job = sdk.fine_tuning.jobs.create(
        model=TINY, training_file=training, validation_file=validation, suffix="facts",
        method=hp(n_epochs=30, **FAST),
    )  # fmt: skip
    done = wait_for_status(sdk, job.id, FINISHED, timeout=300)
    assert done.status == "succeeded", done.error
    return done


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_evals_grade_versions_and_gate_their_promotion(settings: Settings, start_worker) -> None:
    from tests.conftest import new_tenant

    _, key = new_tenant(settings, name="support")
    admin = bearer(new_admin_key(settings))
    with serve_in_thread(settings, with_gateway=True) as url:
        _wait_ready(url)
        start_worker()  # training
        start_worker(args=("--queues", settings.eval_queue), gateway_url=f"{url}/v1")
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
        http = httpx.Client(base_url=url, timeout=120)
        answers = [a for _, a in TINY_FACTS]
        facts = _jsonl([chat_row(q, a) for q, a in TINY_FACTS])
        right = sdk.files.create(file=("facts.jsonl", facts), purpose="fine-tune").id
        shifted = _jsonl([chat_row(q, answers[(i + 1) % len(answers)])
                          for i, (q, _) in enumerate(TINY_FACTS)])  # fmt: skip
        wrong = sdk.files.create(file=("wrong.jsonl", shifted), purpose="fine-tune").id
        judge_data = sdk.files.create(file=("judge.jsonl", _jsonl(_judge_rows())),
                                      purpose="fine-tune").id  # fmt: skip

        # v1, trained on wrong answers: its validation file becomes the adapter's eval, run on
        # v1 and on the base.
        v1 = _train(sdk, training=wrong, validation=right)
        (attached,) = [e for e in sdk.evals.list() if e.name == "facts: validation file"]
        first = _wait_runs(sdk, attached.id, 2)
        assert {r.name for r in first} == {"v1 (candidate)", f"{TINY} (base)"}
        assert all(r.status == "completed" and r.result_counts.total == 12 for r in first)
        adapter_id = _adapter_id(settings)
        promoted = http.post(
            f"/v1/admin/adapters/{adapter_id}/versions/1/promote",
            json={"stage": "production", "force": True}, headers=admin,
        )  # fmt: skip
        assert promoted.status_code == 200, promoted.text
        policy = {"promotion": {"eval_id": attached.id, "min_margin": 0.05},
                  "canary_guard": {"max_score_drop": 0.05, "min_requests": 10_000}}  # fmt: skip
        put = http.put(f"/v1/admin/adapters/{adapter_id}/policy", json=policy, headers=admin)
        assert put.status_code == 200, put.text

        # v2, trained on the right answers: run on v2 only (production and the base have
        # runs), and shown beside them.
        v2 = _train(sdk, training=right, validation=right)
        runs = _wait_runs(sdk, attached.id, 3)
        scores = {r.name: r.result_counts.passed / r.result_counts.total for r in runs}
        assert scores["v2 (candidate)"] > scores["v1 (candidate)"] + 0.5, scores
        ab = http.get("/v1/adapters/facts/versions/2/evals", headers=bearer(key)).json()["data"]
        (row,) = [r for r in ab if r["eval_id"] == attached.id]
        assert row["compared_with"] == "production" and row["production"]["version"] == 1
        assert row["candidate"]["score"] == scores["v2 (candidate)"]
        assert row["newly_passing_count"] >= 6 and row["newly_passing"][0]["output"]

        # The policy: v2 scores above production and is promoted; v1 is refused it back.
        up = http.post(f"/v1/admin/adapters/{adapter_id}/versions/2/promote",
                       json={"stage": "production"}, headers=admin)  # fmt: skip
        assert up.status_code == 200, up.text
        staged = http.post(f"/v1/admin/adapters/{adapter_id}/versions/1/promote",
                           json={"stage": "staging"}, headers=admin)  # fmt: skip
        assert staged.status_code == 200, staged.text
        back = http.post(f"/v1/admin/adapters/{adapter_id}/versions/1/promote",
                         json={"stage": "production"}, headers=admin)  # fmt: skip
        assert back.status_code == 409, back.text
        error = back.json()["error"]
        assert error["code"] == "eval_policy_failed"
        assert f"{scores['v1 (candidate)']:.3f}" in error["message"]
        assert f"{scores['v2 (candidate)']:.3f}" in error["message"]
        audit = http.get("/v1/admin/audit", headers=admin, params={"limit": 50}).json()["data"]
        (entry,) = [e for e in audit if e["action"] == "promote.production"
                    and e["target_id"] == v2.fine_tuned_model]  # fmt: skip
        assert entry["after"]["evidence"]["candidate"]["score"] == scores["v2 (candidate)"]

        # A guarded canary of v1 is aborted on its own; by-name traffic is v2's again.
        canary = http.post(f"/v1/admin/adapters/{adapter_id}/canary",
                           json={"version": 1, "percent": 50}, headers=admin)  # fmt: skip
        assert canary.status_code == 200, canary.text
        _wait_canary_aborted(http, adapter_id, admin)
        audit = http.get("/v1/admin/audit", headers=admin, params={"limit": 50}).json()["data"]
        (abort,) = [e for e in audit if e["action"] == "canary.abort"]
        assert abort["reason"].startswith("canary guard: eval ")
        assert abort["after"]["evidence"]["canary"]["version"] == 1
        # Shadow traffic: all by-name requests mirrored to v1; users get v2's answers only,
        # and the pairs show how little v1 agrees with production.
        mirrored = http.post(f"/v1/admin/adapters/{adapter_id}/shadow",
                             json={"version": 1, "percent": 100}, headers=admin)  # fmt: skip
        assert mirrored.status_code == 200, mirrored.text
        served = []
        for q, _ in TINY_FACTS[:6]:
            asked = [{"role": "user", "content": q}]
            by_name, pinned = (
                sdk.chat.completions.create(model=m, messages=asked, max_tokens=12, temperature=0)
                for m in ("facts", v2.fine_tuned_model)
            )
            assert by_name.model == v2.fine_tuned_model
            assert by_name.choices[0].message.content == pinned.choices[0].message.content
            served.append(by_name.choices[0].message.content)
        pairs = _wait_shadow_pairs(http, adapter_id, admin, n=6)
        assert sorted(p["production_output"] for p in pairs["data"]) == sorted(served)
        assert pairs["summary"]["agreement"] < 0.5, pairs["summary"]
        mine = http.get("/v1/adapters/facts/versions/1/shadow", headers=bearer(key)).json()
        assert mine["summary"]["samples"] == 6 and len(mine["data"]) == 6

        _sdk_eval_scores_adapter_above_base(sdk, right, v2.fine_tuned_model)
        judge = sdk.fine_tuning.jobs.create(model=TINY, training_file=judge_data, suffix="judge",
                                            method=hp(n_epochs=50, validation_split=0.25,
                                                      **FAST))  # fmt: skip
        judged = wait_for_status(sdk, judge.id, FINISHED, timeout=300)
        assert judged.status == "succeeded", judged.error
        # No validation file: the quarter the trainer held out becomes the adapter's eval.
        (split,) = [e for e in sdk.evals.list() if e.name == "judge: held-out split"]
        held = {r.name: r for r in _wait_runs(sdk, split.id, 2)}
        assert set(held) == {"v1 (candidate)", f"{TINY} (base)"}
        assert all(r.status == "completed" and r.result_counts.total == 6 for r in held.values())
        _label_model_judge(sdk, judged.fine_tuned_model)
        assert versions(settings, v1.id)[0].stage == "staging"


def _sdk_eval_scores_adapter_above_base(sdk: openai.OpenAI, file_id: str, model: str) -> None:
    """The acceptance's own eval, through the SDK: string_check and text_similarity."""
    ev = sdk.evals.create(
        name="facts, exact and close",
        data_source_config={"type": "custom", "include_sample_schema": True, "item_schema": {
            "type": "object", "properties": {"input": {"type": "array"},
                                             "ideal": {"type": "string"}}}},
        testing_criteria=[
            {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.ideal}}", "operation": "eq"},
            {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
             "reference": "{{item.ideal}}", "evaluation_metric": "rouge_l",
             "pass_threshold": 0.6},
        ],
    )  # fmt: skip
    source: Any = {"type": "file_id", "id": file_id}
    for target in (TINY, model):
        sdk.evals.runs.create(ev.id, name=target, data_source={
            "type": "completions", "source": source, "model": target,
            "input_messages": {"type": "item_reference", "item_reference": "item.input"},
            "sampling_params": {"temperature": 0, "max_completion_tokens": 12}})  # fmt: skip
    runs = {r.name: r for r in _wait_runs(sdk, ev.id, 2)}
    base, tuned = runs[TINY], runs[model]
    assert base.status == tuned.status == "completed", (base.error, tuned.error)
    assert tuned.result_counts.passed > base.result_counts.passed, (tuned, base)
    assert tuned.result_counts.total == 12 and tuned.result_counts.errored == 0
    criteria = {c.testing_criteria: c for c in tuned.per_testing_criteria_results}
    assert set(criteria) == {"exact", "close"}
    assert tuned.per_model_usage and tuned.per_model_usage[0].invocation_count == 12
    items = list(sdk.evals.runs.output_items.list(tuned.id, eval_id=ev.id, limit=100))
    assert len(items) == 12
    passed = [i for i in items if i.status == "pass"]
    assert len(passed) == tuned.result_counts.passed
    one = sdk.evals.runs.output_items.retrieve(passed[0].id, eval_id=ev.id, run_id=tuned.id)
    assert one.sample.output[0].content == one.datasource_item["ideal"]
    assert {r.name for r in one.results} == {"exact", "close"} and all(
        r.passed for r in one.results
    )


def _label_model_judge(sdk: openai.OpenAI, model: str) -> None:
    """A served adapter as the judge: a label per item, pass or fail by that label."""
    ev = sdk.evals.create(
        name="judged",
        data_source_config={"type": "custom", "include_sample_schema": True,
                            "item_schema": {"type": "object"}},
        testing_criteria=[{**JUDGE, "model": model}],
    )  # fmt: skip
    entries = _judged()
    sdk.evals.runs.create(ev.id, name="judge", data_source={
        "type": "jsonl", "source": {"type": "file_content", "content": entries}})  # fmt: skip
    (run,) = _wait_runs(sdk, ev.id, 1)
    assert run.status == "completed" and run.result_counts.total == 24, run.error
    items = list(sdk.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100))
    labels = [i.results[0].sample["label"] for i in items]  # type: ignore[index]
    said = [i.results[0].sample for i in items]
    assert sum(label in ("Y", "N") for label in labels) >= 20, said  # 6 were held out
    for item, label in zip(items, labels, strict=True):  # the label decides, item by item
        assert item.status == ("pass" if label == "Y" else "fail"), item
        assert item.results[0].passed == (item.status == "pass")
    assert run.result_counts.passed == labels.count("Y")


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/readyz").status_code != 200:  # the engine loads in the background
        assert time.monotonic() < deadline
        time.sleep(0.3)


def _adapter_id(settings: Settings) -> str:
    with Session(get_engine(settings.database_url)) as session:
        (adapter,) = session.exec(select(Adapter).where(Adapter.name == "facts")).all()
        return adapter.id


def _wait_canary_aborted(http: httpx.Client, adapter_id: str, admin: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = http.get(f"/v1/admin/adapters/{adapter_id}", headers=admin).json()
        if body.get("canary_version") is None:
            return
        time.sleep(0.3)
    raise AssertionError(f"the guard never aborted the canary: {body}")


def _wait_shadow_pairs(http: httpx.Client, adapter_id: str, admin: dict[str, str], *, n: int):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = http.get(f"/v1/admin/adapters/{adapter_id}/shadow", headers=admin).json()
        if body["summary"]["samples"] >= n:
            return body
        time.sleep(0.3)
    raise AssertionError(f"no {n} shadow pairs: {body}")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_run_whose_worker_is_killed_goes_on_from_the_items_graded(
    settings: Settings, start_worker
) -> None:
    """SIGKILL mid-run: the run's heartbeat stops, the next eval worker's sweep sends it again,
    and it goes on from the items already graded: every item graded once, none twice."""
    from tests.conftest import new_tenant

    _, key = new_tenant(settings)
    with serve_in_thread(settings, with_gateway=True) as url:
        _wait_ready(url)
        evals = ("--queues", settings.eval_queue)
        first = start_worker(args=evals, gateway_url=f"{url}/v1")
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
        ev = sdk.evals.create(
            name="many", data_source_config={"type": "custom", "item_schema": {"type": "object"}},
            testing_criteria=[{"type": "string_check", "name": "said", "operation": "ne",
                               "input": "{{sample.output_text}}", "reference": "nothing"}],
        )  # fmt: skip
        content = [{"item": {"q": f"{q} ({i})"}} for i in range(20) for q, _ in TINY_FACTS[:10]]
        template = [{"role": "user", "content": "{{item.q}}"}]
        run = sdk.evals.runs.create(ev.id, data_source={
            "type": "completions", "model": TINY,
            "source": {"type": "file_content", "content": content},
            "input_messages": {"type": "template", "template": template},
            "sampling_params": {"max_completion_tokens": 24}})  # fmt: skip
        deadline = time.monotonic() + 120
        while len(list(sdk.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100))) < 20:
            assert time.monotonic() < deadline, sdk.evals.runs.retrieve(run.id, eval_id=ev.id)
            time.sleep(0.2)
        first.kill()
        start_worker(args=evals, gateway_url=f"{url}/v1")
        (done,) = _wait_runs(sdk, ev.id, 1, timeout=300)
        assert done.status == "completed", done.error
        assert done.result_counts.total == 200 and done.result_counts.errored == 0
        items = list(sdk.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100))
        items += list(sdk.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100,
                                                       after=items[-1].id))  # fmt: skip
        assert sorted(i.datasource_item_id for i in items) == list(range(200))
        with Session(get_engine(settings.database_url)) as session:
            row = session.get(EvalRun, run.id)
            assert row is not None and row.attempts == 2
