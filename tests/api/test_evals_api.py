"""The Evals API as a client sees it, without a worker: definitions, runs that stay queued,
the errors (each naming its field), the bounds, and the evidence promotion reads.

No model generates here. What an eval worker leaves behind (completed runs with their
counts, graded output items) is written straight into the database, as the worker stores
it; the worker itself, generating and grading, is tests/workers/test_evals.py.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
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
from api.models.evals import EvalOutputItem, EvalRun
from api.models.usage import UsageRecord
from api.services.eval_policy import check_canaries
from api.services.resolver import resolve_model
from api.settings import Settings
from serving.zero_adapter import zero_adapter_files
from tests.api.conftest import TINY, add_version
from tests.api.test_graders import STRING_CHECK  # exact match with item.answer
from tests.conftest import bearer, new_admin_key, new_tenant
from tests.trainer.trainer_testdata import chat_row

ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
SIMILAR = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "fuzzy_match",
    "pass_threshold": 0.8,
}
EVAL: dict[str, Any] = {
    "name": "capitals",
    "data_source_config": {
        "type": "custom",
        "item_schema": ITEM_SCHEMA,
        "include_sample_schema": True,
    },
    "testing_criteria": [STRING_CHECK, SIMILAR],
}
ENTRIES = [
    {"item": {"question": "Capital of France?", "answer": "Paris"}, "sample": {"output_text": a}}
    for a in ("Paris", "Lyon")
]
JSONL = {"type": "jsonl", "source": {"type": "file_content", "content": ENTRIES}}


def refused(response: Any, status: int, param: str | None, code: str | None = None) -> str:
    """Assert an OpenAI-shaped error naming `param`; returns its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return str(error["message"])


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid rank-1 LoRA of zeros for the tiny base: registered in milliseconds."""
    folder = tmp_path_factory.mktemp("zero-adapter")
    config = {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}
    for name, data in zero_adapter_files(config, base_name=TINY).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def sdk(live_url: str, settings: Settings) -> Iterator[openai.OpenAI]:
    _, key = new_tenant(settings)
    with openai.OpenAI(base_url=f"{live_url}/v1", api_key=key) as client:
        yield client


# -- definitions and runs, through the official SDK ------------------------------------------


def test_eval_crud_through_the_sdk(sdk: openai.OpenAI) -> None:
    made = [sdk.evals.create(**{**EVAL, "name": f"capitals-{i}"}) for i in range(3)]  # type: ignore[arg-type]
    ev = made[0]
    assert ev.object == "eval" and ev.name == "capitals-0"
    # OpenAI's shape: the item schema under `schema.properties.item`, the sample beside it.
    config = ev.data_source_config
    assert config.type == "custom"
    assert config.schema_["properties"]["item"] == ITEM_SCHEMA  # type: ignore[index]
    assert config.schema_["required"] == ["item", "sample"]
    assert [c.name for c in ev.testing_criteria] == ["exact", "close"]  # type: ignore[union-attr]
    assert sdk.evals.retrieve(ev.id).model_dump() == ev.model_dump()

    ids = [e.id for e in made]
    first = sdk.evals.list(limit=2, order="asc")
    assert [e.id for e in first.data] == ids[:2] and first.has_more
    rest = sdk.evals.list(limit=2, order="asc", after=first.data[-1].id)
    assert [e.id for e in rest.data] == ids[2:] and not rest.has_more
    assert [e.id for e in sdk.evals.list(limit=1, order="desc")] == ids[::-1]  # auto-paging

    updated = sdk.evals.update(ev.id, name="renamed", metadata={"team": "geo"})
    assert (updated.name, updated.metadata) == ("renamed", {"team": "geo"})
    assert sdk.evals.retrieve(ev.id).name == "renamed"
    assert updated.model_dump()["testing_criteria"] == ev.model_dump()["testing_criteria"]

    deleted = sdk.evals.delete(ev.id)
    assert deleted.deleted and deleted.eval_id == ev.id
    with pytest.raises(openai.NotFoundError) as gone:
        sdk.evals.retrieve(ev.id)
    assert gone.value.code == "eval_not_found"
    assert [e.id for e in sdk.evals.list()] == ids[1:]


def test_eval_files_upload_with_purpose_evals_and_feed_runs(sdk: openai.OpenAI) -> None:
    """OpenAI's `purpose="evals"`: a JSONL of items (or {item, sample}) is `processed`; a line
    that is no object is an `error` naming the line; a processed one is a run's source."""
    good = "".join(json.dumps(e) + "\n" for e in ENTRIES).encode()
    uploaded = sdk.files.create(file=("items.jsonl", good), purpose="evals")
    assert (uploaded.purpose, uploaded.status) == ("evals", "processed")
    bad = good + b'["not", "an", "object"]\n{"item": 3}\n'
    refused_file = sdk.files.create(file=("bad.jsonl", bad), purpose="evals")
    assert refused_file.status == "error"
    assert refused_file.status_details is not None
    assert "line 3:" in refused_file.status_details and "line 4:" in refused_file.status_details
    with pytest.raises(openai.BadRequestError, match="JSONL"):
        sdk.files.create(file=("items.csv", good), purpose="evals")

    ev = sdk.evals.create(**EVAL)  # type: ignore[arg-type]
    source: Any = {"type": "jsonl", "source": {"type": "file_id", "id": uploaded.id}}
    run = sdk.evals.runs.create(ev.id, data_source=source)
    assert run.status == "queued"
    broken: Any = {**source, "source": {"type": "file_id", "id": refused_file.id}}
    with pytest.raises(openai.BadRequestError) as unusable:
        sdk.evals.runs.create(ev.id, data_source=broken)
    assert unusable.value.param == "data_source.source.id"


def test_runs_stay_queued_without_a_worker_and_cancel_once(
    sdk: openai.OpenAI, live_url: str
) -> None:
    ev = sdk.evals.create(**EVAL)  # type: ignore[arg-type]
    runs = [
        sdk.evals.runs.create(ev.id, data_source=JSONL, name=f"run-{i}")  # type: ignore[arg-type]
        for i in range(3)
    ]
    run = runs[0]
    assert (run.object, run.status, run.eval_id, run.name) == ("eval.run", "queued", ev.id, "run-0")
    assert run.result_counts.total == 0
    assert run.data_source.source.content[1].item == ENTRIES[1]["item"]  # type: ignore[union-attr]
    assert sdk.evals.runs.output_items.list(run.id, eval_id=ev.id).data == []

    canceled = sdk.evals.runs.cancel(runs[1].id, eval_id=ev.id)
    assert canceled.status == "canceled"
    # OpenAI's own cancel is a POST on the run itself.
    headers = {"Authorization": f"Bearer {sdk.api_key}"}
    on_run = httpx.post(f"{live_url}/v1/evals/{ev.id}/runs/{runs[2].id}", headers=headers)
    assert on_run.status_code == 200 and on_run.json()["status"] == "canceled"

    statuses = {
        status: [r.id for r in sdk.evals.runs.list(ev.id, status=status)]  # type: ignore[arg-type]
        for status in ("queued", "canceled")
    }
    assert statuses == {"queued": [runs[0].id], "canceled": [runs[1].id, runs[2].id]}

    again = httpx.post(f"{live_url}/v1/evals/{ev.id}/runs/{runs[1].id}/cancel", headers=headers)
    refused(again, 409, None, "run_not_active")
    assert again.headers.get("x-should-retry") == "false"  # the SDK does not resend it
    with pytest.raises(openai.ConflictError):
        sdk.evals.runs.cancel(runs[2].id, eval_id=ev.id)

    deleted = sdk.evals.runs.delete(runs[0].id, eval_id=ev.id)
    assert deleted.deleted and deleted.run_id == runs[0].id
    with pytest.raises(openai.NotFoundError) as gone:
        sdk.evals.runs.retrieve(runs[0].id, eval_id=ev.id)
    assert gone.value.code == "run_not_found"


# -- refusals, each naming the field ------------------------------------------------------------


@pytest.fixture
def tenant(settings: Settings) -> dict[str, str]:
    tenant_id, key = new_tenant(settings)
    return {"id": tenant_id, "key": key}


def test_eval_definitions_are_refused_naming_the_field(
    client: TestClient, tenant: dict[str, str]
) -> None:
    cosine = {**SIMILAR, "evaluation_metric": "cosine"}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"data_source_config": {"type": "logs"}}, "data_source_config.type", "invalid_value"),
        (
            {"data_source_config": {"type": "custom", "item_schema": {"type": "nonsense"}}},
            "data_source_config.item_schema",
            "invalid_value",
        ),
        (
            {"testing_criteria": [{"type": "python", "name": "py", "source": "def grade(s, i):"}]},
            "testing_criteria[0].type",
            "unsupported_grader",
        ),
        (
            {"testing_criteria": [STRING_CHECK, cosine]},
            "testing_criteria[1].evaluation_metric",
            "unsupported_metric",
        ),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value"),
        ({"metadata": {"note": "x" * 513}}, "metadata.note", "invalid_value"),
    ]
    headers = bearer(tenant["key"])
    for patch, param, code in cases:
        refused(client.post("/v1/evals", json={**EVAL, **patch}, headers=headers), 400, param, code)
    assert client.get("/v1/evals", headers=headers).json()["data"] == []

    ev = client.post("/v1/evals", json=EVAL, headers=headers).json()
    too_big = {"metadata": {f"k{i}": "v" for i in range(17)}}
    refused(client.post(f"/v1/evals/{ev['id']}", json=too_big, headers=headers), 400, "metadata")


def test_runs_are_refused_naming_the_field(
    client: TestClient, tenant: dict[str, str], settings: Settings
) -> None:
    headers = bearer(tenant["key"])
    ev = client.post("/v1/evals", json=EVAL, headers=headers).json()
    template = {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]}
    completions = {
        "type": "completions",
        "model": settings.base_model,
        "source": {"type": "file_content", "content": [{"item": ENTRIES[0]["item"]}]},
        "input_messages": template,
    }
    unfit = [ENTRIES[0], {"item": {"question": "Capital of Peru?"}}]  # no answer
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"data_source": {**JSONL, "type": "responses"}}, 400, "data_source.type", "invalid_value"),
        (
            {"data_source": {**JSONL, "source": {"type": "file_content", "content": unfit}}},
            400,
            "data_source.source.content[1].item",
            "invalid_value",
        ),
        (
            {"data_source": {**completions, "model": "no-such-model"}},
            404,
            "data_source.model",
            "model_not_found",
        ),
        (
            {"data_source": {**completions, "sampling_params": {"temperature": 3}}},
            400,
            "data_source.sampling_params.temperature",
            "invalid_value",
        ),
        (
            {"data_source": {**completions, "sampling_params": {"max_completion_tokens": 0}}},
            400,
            "data_source.sampling_params.max_completion_tokens",
            "invalid_value",
        ),
        (
            {"data_source": JSONL, "metadata": {f"k{i}": "v" for i in range(17)}},
            400,
            "metadata",
            "invalid_value",
        ),
    ]
    url = f"/v1/evals/{ev['id']}/runs"
    for body, status, param, code in cases:
        refused(client.post(url, json=body, headers=headers), status, param, code)
    assert client.get(url, headers=headers).json()["data"] == []

    # The same completions run on a base model is accepted, its sampling defaults filled in.
    run = client.post(url, json={"data_source": completions}, headers=headers).json()
    assert (run["status"], run["model"], run["adapter_version_id"]) == (
        "queued",
        settings.base_model,
        None,
    )
    assert run["data_source"]["sampling_params"]["temperature"] == 0.0


def _upload(client: TestClient, key: str) -> str:
    rows = "".join(json.dumps(chat_row(f"Capital {i}?", f"City {i}.")) + "\n" for i in range(12))
    response = client.post(
        "/v1/files",
        headers=bearer(key),
        files={"file": ("capitals.jsonl", rows.encode())},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def test_a_run_reads_only_its_own_tenants_files(
    client: TestClient, tenant: dict[str, str], settings: Settings
) -> None:
    headers = bearer(tenant["key"])
    _, other_key = new_tenant(settings)
    theirs, mine = _upload(client, other_key), _upload(client, tenant["key"])
    ev = client.post("/v1/evals", json=EVAL, headers=headers).json()

    def run_on(file_id: str) -> Any:
        source = {"type": "file_id", "id": file_id}
        return client.post(
            f"/v1/evals/{ev['id']}/runs",
            json={"data_source": {"type": "jsonl", "source": source}},
            headers=headers,
        )

    foreign, missing = run_on(theirs), run_on("file-" + "0" * 24)
    refused(foreign, 404, "data_source.source.id", "file_not_found")
    assert foreign.text.replace(theirs, "<id>") == missing.text.replace("file-" + "0" * 24, "<id>")
    assert run_on(mine).json()["data_source"]["source"] == {"type": "file_id", "id": mine}


def test_bounds_items_per_run_and_active_runs_per_tenant(settings: Settings) -> None:
    small = settings.model_copy(update={"eval_max_items": 2, "max_active_eval_runs_per_tenant": 2})
    (_, key), (_, other) = new_tenant(small), new_tenant(small)
    with TestClient(create_app(small)) as client:
        ev = client.post("/v1/evals", json=EVAL, headers=bearer(key)).json()
        url = f"/v1/evals/{ev['id']}/runs"
        three = {"type": "file_content", "content": [*ENTRIES, ENTRIES[0]]}
        message = refused(
            client.post(url, json={"data_source": {**JSONL, "source": three}}, headers=bearer(key)),
            400,
            "data_source.source.content",
            "too_many_items",
        )
        assert "at most 2 items" in message

        runs = [
            client.post(url, json={"data_source": JSONL}, headers=bearer(key)) for _ in range(3)
        ]
        assert [r.status_code for r in runs] == [200, 200, 409]
        refused(runs[2], 409, None, "too_many_eval_runs")
        # Another tenant's runs do not count; a finished one no longer does.
        theirs = client.post("/v1/evals", json=EVAL, headers=bearer(other)).json()
        ok = client.post(
            f"/v1/evals/{theirs['id']}/runs", json={"data_source": JSONL}, headers=bearer(other)
        )
        assert ok.status_code == 200, ok.text
        client.post(f"{url}/{runs[0].json()['id']}/cancel", headers=bearer(key))
        again = client.post(url, json={"data_source": JSONL}, headers=bearer(key))
        assert again.status_code == 200, again.text


# -- evidence-based promotion: the stored state an eval worker leaves ---------------------------


class Adapter:
    """A tenant's adapter with versions, an eval of the tenant's, and admin access."""

    def __init__(
        self, client: TestClient, settings: Settings, adapter_dir: Path, *, versions: int
    ) -> None:
        self.client, self.settings = client, settings
        self.tenant_id, self.key = new_tenant(settings)
        self.admin = new_admin_key(settings)
        self.name = f"bot-{random.randrange(16**6):06x}"
        self.versions = [
            add_version(settings, adapter_dir, tenant_id=self.tenant_id, suffix=self.name)
            for _ in range(versions)
        ]
        self.id = self.versions[0].adapter_id
        made = client.post("/v1/evals", json=EVAL, headers=bearer(self.key))
        self.eval_id: str = made.json()["id"]

    def admin_call(self, method: str, path: str, **body: Any) -> Any:
        return self.client.request(
            method, f"/v1/admin/adapters/{self.id}{path}", json=body, headers=bearer(self.admin)
        )

    def promote(self, number: int, **body: Any) -> Any:
        return self.admin_call("POST", f"/versions/{number}/promote", stage="production", **body)

    def completed_run(
        self, number: int | None, *, passed: int, total: int = 10, items: Sequence[str] = ()
    ) -> EvalRun:
        """A completed run on version `number` (None: the base), as the worker leaves it:
        its counts, and an output item per status in `items` ("pass"/"fail")."""
        version = self.versions[number - 1] if number else None
        run = EvalRun(
            eval_id=self.eval_id,
            tenant_id=self.tenant_id,
            model=version.fine_tuned_model if version else self.versions[0].base_model,
            adapter_version_id=version.id if version else None,
            data_source=JSONL,
            status="completed",
            result_counts={"total": total, "passed": passed, "failed": total - passed,
                           "errored": 0},
        )  # fmt: skip
        rows = [
            EvalOutputItem(
                run_id=run.id,
                eval_id=self.eval_id,
                tenant_id=self.tenant_id,
                datasource_item_id=i,
                datasource_item=ENTRIES[0]["item"],
                status=status,
                results=[{"name": "exact", "passed": status == "pass"}],
                sample={"output_text": f"v{number} says {status}"},
            )
            for i, status in enumerate(items)
        ]
        with Session(get_engine(self.settings.database_url), expire_on_commit=False) as s:
            s.add(run)
            s.flush()  # no ORM relationship orders the inserts
            s.add_all(rows)
            s.commit()
        return run

    def audit(self, action: str) -> list[dict[str, Any]]:
        return list(
            self.client.get(
                "/v1/admin/audit",
                params={"action": action, "tenant_id": self.tenant_id},
                headers=bearer(self.admin),
            ).json()["data"]
        )


def test_promotion_policy_gates_production_on_eval_scores(
    client: TestClient, settings: Settings, adapter_dir: Path
) -> None:
    bot = Adapter(client, settings, adapter_dir, versions=3)
    assert bot.promote(1).status_code == 200
    bot.completed_run(1, passed=8)
    bot.completed_run(2, passed=7)
    bot.completed_run(3, passed=9)

    policy = {"promotion": {"eval_id": bot.eval_id, "min_margin": 0.05}}
    put = bot.admin_call("PUT", "/policy", **policy)
    assert put.status_code == 200, put.text
    assert bot.admin_call("GET", "/policy").json()["promotion"]["eval_id"] == bot.eval_id
    assert bot.audit("policy.set")[0]["after"]["policy"]["promotion"]["min_margin"] == 0.05

    message = refused(bot.promote(2), 409, None, "eval_policy_failed")
    assert "0.700" in message and "0.800" in message  # the candidate's and production's

    forced = bot.promote(2, force=True, reason="hotfix")
    assert forced.status_code == 200, forced.text
    entry = bot.audit("promote.production")[0]
    assert entry["forced"] and entry["target_id"] == bot.versions[1].fine_tuned_model
    evidence = entry["after"]["evidence"]
    assert (evidence["candidate"]["score"], evidence["production"]["score"]) == (0.7, 0.8)
    assert evidence["eval_id"] == bot.eval_id and evidence["min_margin"] == 0.05

    assert bot.promote(3).status_code == 200  # 0.9 >= 0.7 + 0.05: no force needed
    entry = bot.audit("promote.production")[0]
    assert not entry["forced"] and entry["target_id"] == bot.versions[2].fine_tuned_model
    evidence = entry["after"]["evidence"]
    assert (evidence["candidate"]["score"], evidence["production"]["score"]) == (0.9, 0.7)


def test_a_policy_names_only_the_adapters_tenants_evals(
    client: TestClient, settings: Settings, adapter_dir: Path
) -> None:
    bot = Adapter(client, settings, adapter_dir, versions=1)
    _, other_key = new_tenant(settings)
    theirs = client.post("/v1/evals", json=EVAL, headers=bearer(other_key)).json()["id"]
    for policy, param in [
        ({"promotion": {"eval_id": theirs}}, "promotion.eval_id"),
        ({"canary_guard": {"eval_id": theirs}}, "canary_guard.eval_id"),
    ]:
        refused(bot.admin_call("PUT", "/policy", **policy), 404, param, "eval_not_found")
    assert bot.admin_call("GET", "/policy").json().get("promotion") is None

    as_tenant = client.put(
        f"/v1/admin/adapters/{bot.id}/policy",
        json={"promotion": {"eval_id": bot.eval_id}},
        headers=bearer(bot.key),
    )
    assert as_tenant.status_code == 404
    assert bot.admin_call("GET", "/policy").json().get("promotion") is None


def test_a_version_shows_its_scores_beside_production_and_base(
    client: TestClient, settings: Settings, adapter_dir: Path
) -> None:
    bot = Adapter(client, settings, adapter_dir, versions=2)
    assert bot.promote(1).status_code == 200
    # Item 0 newly fails on v2, item 1 newly passes, item 2 passes on both.
    prod = bot.completed_run(1, passed=2, total=3, items=["pass", "fail", "pass"])
    mine = bot.completed_run(2, passed=2, total=3, items=["fail", "pass", "pass"])
    base = bot.completed_run(None, passed=1, total=3)

    body = client.get(f"/v1/adapters/{bot.name}/versions/2/evals", headers=bearer(bot.key))
    assert body.status_code == 200, body.text
    [ab] = body.json()["data"]
    assert ab["eval_id"] == bot.eval_id and ab["compared_with"] == "production"
    assert ab["candidate"]["run_id"] == mine.id and ab["candidate"]["score"] == 2 / 3
    assert (ab["production"]["run_id"], ab["production"]["version"]) == (prod.id, 1)
    assert ab["base"]["run_id"] == base.id and ab["base"]["score"] == 1 / 3
    [failing], [passing] = ab["newly_failing"], ab["newly_passing"]
    assert (failing["datasource_item_id"], failing["output"], failing["reference_output"]) == (
        0,
        "v2 says fail",
        "v1 says pass",
    )
    assert passing["datasource_item_id"] == 1
    assert (ab["newly_failing_count"], ab["newly_passing_count"]) == (1, 1)


# -- the guarded canary -------------------------------------------------------------------------


def _start_canary(bot: Adapter, policy: dict[str, Any]) -> None:
    assert bot.promote(1).status_code == 200
    assert bot.admin_call("PUT", "/policy", **policy).status_code == 200
    started = bot.admin_call("POST", "/canary", version=2, percent=50)
    assert started.status_code == 200, started.text


def _served(bot: Adapter) -> set[int]:
    """The versions 200 by-name requests resolve to."""
    rng = random.Random(0)
    with Session(get_engine(bot.settings.database_url)) as s:
        found = [
            resolve_model(s, bot.settings, tenant_id=bot.tenant_id, model=bot.name, rng=rng)
            for _ in range(200)
        ]
    return {f.version.version for f in found if f.version is not None}


def _guard(bot: Adapter) -> list[str]:
    with Session(get_engine(bot.settings.database_url), expire_on_commit=False) as s:
        return check_canaries(s, adapter_ids=[bot.id])


def test_a_guarded_canary_scoring_below_production_is_aborted(
    client: TestClient, settings: Settings, adapter_dir: Path
) -> None:
    worse, close = (Adapter(client, settings, adapter_dir, versions=2) for _ in range(2))
    for bot, canary_passed in ((worse, 5), (close, 88)):
        guard = {"eval_id": bot.eval_id, "max_score_drop": 0.05}
        _start_canary(bot, {"canary_guard": guard})
        bot.completed_run(1, passed=90, total=100)
        bot.completed_run(2, passed=canary_passed, total=100)
    assert _served(worse) == {1, 2}
    assert worse.admin_call("GET", "/canary/guard").json()["would_abort"].startswith("eval ")

    assert _guard(worse) == [worse.id] and _guard(close) == []
    assert _served(worse) == {1} and _served(close) == {1, 2}
    [entry] = worse.audit("canary.abort")
    assert entry["actor_key_id"] == "system:canary-guard"
    assert entry["reason"].startswith("canary guard:") and "0.050" in entry["reason"]
    figures = entry["after"]["evidence"]
    assert (figures["canary"]["eval_score"], figures["production"]["eval_score"]) == (0.05, 0.9)
    assert close.audit("canary.abort") == []
    assert close.admin_call("GET", "/canary/guard").json()["would_abort"] is None


def _traffic(bot: Adapter, number: int, statuses: list[int], latency_ms: float = 50.0) -> None:
    """By-name requests served by version `number`, as the gateway records them."""
    version: AdapterVersion = bot.versions[number - 1]
    with Session(get_engine(bot.settings.database_url)) as s:
        s.add_all(
            UsageRecord(
                tenant_id=bot.tenant_id,
                model=bot.name,
                adapter_version_id=version.id,
                base_model=version.base_model,
                endpoint="chat.completions",
                status_code=status,
                latency_ms=latency_ms,
            )
            for status in statuses
        )
        s.commit()


def test_a_guarded_canary_failing_requests_is_aborted(
    client: TestClient, settings: Settings, adapter_dir: Path
) -> None:
    failing, few, slow = (Adapter(client, settings, adapter_dir, versions=2) for _ in range(3))
    guard = {"min_requests": 10, "max_error_rate_increase": 0.05, "max_latency_p95_ratio": 2.0}
    for bot in (failing, few, slow):
        _start_canary(bot, {"canary_guard": guard})
        _traffic(bot, 1, [200] * 20)
    _traffic(failing, 2, [200] * 6 + [500] * 6)
    _traffic(few, 2, [500] * 9)  # under min_requests: too few to judge
    _traffic(slow, 2, [200] * 12, latency_ms=500.0)

    aborted = {bot.id: _guard(bot) for bot in (failing, few, slow)}
    assert aborted == {failing.id: [failing.id], few.id: [], slow.id: [slow.id]}
    [entry] = failing.audit("canary.abort")
    assert "error rate 0.500 on the canary against 0.000" in entry["reason"]
    assert entry["after"]["evidence"]["canary"]["requests"] == 12
    [entry] = slow.audit("canary.abort")
    assert "latency p95 500 ms on the canary against 50 ms" in entry["reason"]
    assert _served(failing) == {1} and _served(few) == {1, 2}


def test_an_attached_files_runs_generate_only_room_for_its_answers() -> None:
    """A base model rambles to max_completion_tokens: an attached file's runs get room for
    its longest reference answer (~2 characters a token), 32-512, 128 when it has none."""
    from api.services.eval_policy import DEFAULT_MAX_TOKENS, answer_budget

    def chat(answer: str) -> bytes:
        return json.dumps(chat_row("q", answer)).encode() + b"\n"

    assert answer_budget(chat("Blue.") + chat("x" * 100)) == 100 // 2 + 16
    assert answer_budget(chat("ok")) == 32
    assert answer_budget(chat("x" * 5000)) == 512
    assert answer_budget(b'{"item": {}}\nnot json\n') == DEFAULT_MAX_TOKENS
