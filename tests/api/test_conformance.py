"""Every OpenAI-compatible response of the control plane against the official OpenAPI
schemas (tests/conformance, vendored with their source commit): a scripted tour of files,
fine-tuning jobs, events, checkpoints and models, successes and errors, through the official
SDK and raw HTTP. Jobs that really ran are toured in tests/workers (their `sdk` fixture checks
every response too); chat and completions on both engines in tests/serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.db import get_engine
from api.models.jobs import Job
from api.services import job_runs
from api.settings import Settings
from tests.api.conftest import add_version
from tests.conformance.openai_spec import source
from tests.conformance.recorder import Conformance
from tests.conftest import bearer, new_tenant


@pytest.fixture
def conformance(client: TestClient) -> Iterator[Conformance]:
    checked = Conformance()
    client.event_hooks["response"].append(checked.hook)
    yield checked
    client.event_hooks["response"].remove(checked.hook)


def _rows(n: int) -> bytes:
    return b"".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                 {"role": "assistant", "content": f"a{i}"}]}).encode() + b"\n"
        for i in range(n)
    )  # fmt: skip


def test_the_vendored_schemas_name_their_source() -> None:
    origin = source()
    assert origin["repository"] == "https://github.com/openai/openai-openapi"
    assert len(origin["commit"]) == 40 and origin["openapi"].startswith("3.")


def test_the_checker_catches_what_the_issue_found() -> None:
    """The three deviations of issue 19 are violations to this checker (it can fail)."""
    from tests.conformance.openai_spec import violations

    chat = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hi"}}]}  # fmt: skip
    found = violations(chat, "CreateChatCompletionResponse")
    assert any("'logprobs' is a required property" in v for v in found)
    assert any("'refusal' is a required property" in v for v in found)
    chat["choices"][0] |= {"logprobs": None, "stop_reason": None}  # type: ignore[index]
    chat["choices"][0]["message"]["refusal"] = None  # type: ignore[index]
    found = violations(chat, "CreateChatCompletionResponse")
    assert any("'stop_reason' is not one of" in v for v in found)
    checker = Conformance()
    checker._stream("s", 'data: {"id":"a","object":"text_completion","created":1,"model":"m",'
                    '"choices":[]}\n\ndata: {"id":"a","object":"text_completion","created":2,'
                    '"model":"m","choices":[]}\n\ndata: [DONE]\n\n',
                    "CompletionStreamChunk")  # fmt: skip
    assert checker.violations == ["s: `created` differs between chunks: ['1', '2']"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_files_jobs_models_and_errors_conform(
    client: TestClient, settings: Settings, conformance: Conformance, tiny_adapter: Path
) -> None:
    tenant_id, key = new_tenant(settings, name="tour")
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client,
                        max_retries=0)  # fmt: skip

    # Files: upload, list, retrieve, content, delete; a bad file and a missing one.
    file = sdk.files.create(file=("train.jsonl", _rows(12)), purpose="fine-tune")
    other = sdk.files.create(file=("more.jsonl", _rows(4)), purpose="fine-tune")
    assert [f.id for f in sdk.files.list()] and sdk.files.retrieve(file.id).id == file.id
    assert sdk.files.content(file.id).content == _rows(12)
    assert sdk.files.delete(other.id).deleted
    sdk.files.create(file=("bad.jsonl", b'{"messages": 3}\n'), purpose="fine-tune")
    for missing in (other.id, "file-nope"):
        with pytest.raises(openai.NotFoundError):
            sdk.files.retrieve(missing)
        assert client.get(f"/v1/files/{missing}/content", headers=bearer(key)).status_code == 404
    with pytest.raises(openai.BadRequestError):
        sdk.files.create(file=("x.jsonl", b"{}\n"), purpose="nonsense")  # type: ignore[arg-type]

    # Jobs: create (every knob OpenAI has), list, retrieve, events, checkpoints, cancel.
    job = sdk.fine_tuning.jobs.create(
        model=settings.base_model, training_file=file.id, validation_file=file.id,
        suffix="tour", seed=7, metadata={"team": "support"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 2.0}}},
    )  # fmt: skip
    queued = sdk.fine_tuning.jobs.create(model=settings.base_model, training_file=file.id)
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=1).data] == [queued.id]
    assert sdk.fine_tuning.jobs.retrieve(job.id).status == "queued"

    # The job runs as a worker would run it (job_runs is what the worker calls): a
    # checkpoint, then success with a registered version.
    with Session(get_engine(settings.database_url)) as s:
        claim = job_runs.claim(s, job_id=job.id, worker="tour", stale_after=60)
        assert claim is not None
        job_runs.record_checkpoint(s, claim, step=3, prefix="checkpoints/tour/3",
                                   metrics={"train_loss": 0.5})  # fmt: skip
    version = add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="tour")
    assert sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sdk.fine_tuning.jobs.list_events(job.id, limit=50).data
    assert sdk.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.cancel(queued.id + "x")
    with pytest.raises(openai.BadRequestError):
        sdk.fine_tuning.jobs.create(model=settings.base_model, training_file="file-nope")
    with pytest.raises(openai.BadRequestError):
        sdk.fine_tuning.jobs.create(model="no-such-base", training_file=file.id)
    with Session(get_engine(settings.database_url)) as s:
        assert s.get(Job, job.id) is not None

    # Models: the base and the tenant's adapter, listed and retrieved; unknown ones.
    ids = [m.id for m in sdk.models.list()]
    assert settings.base_model in ids and version.fine_tuned_model in ids
    assert sdk.models.retrieve(version.fine_tuned_model).id == version.fine_tuned_model
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("ft:nobody:else")

    # Errors the SDK cannot produce: no key, a wrong key, a body that is not JSON.
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/files", headers=bearer("sk-wrong")).status_code == 401
    bad = client.post("/v1/fine_tuning/jobs", headers=bearer(key), content=b"{not json")
    assert bad.status_code == 400

    conformance.assert_clean()
    assert {"POST /files", "GET /files", "GET /files/{file_id}", "DELETE /files/{file_id}",
            "POST /fine_tuning/jobs", "GET /fine_tuning/jobs",
            "GET /fine_tuning/jobs/{fine_tuning_job_id}",
            "POST /fine_tuning/jobs/{fine_tuning_job_id}/cancel",
            "GET /fine_tuning/jobs/{fine_tuning_job_id}/events",
            "GET /fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
            "GET /models", "GET /models/{model}", "error"} <= set(conformance.seen)  # fmt: skip
