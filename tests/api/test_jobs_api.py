"""The fine-tuning jobs API up to the queue: validation, shapes, listing, cancel, isolation,
supervised and DPO.

Training itself (a real worker process) is exercised in tests/workers.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from api.db import get_engine
from api.models.jobs import Job
from api.settings import Settings
from tests.conformance.recorder import Conformance
from tests.conftest import bearer, new_tenant

BASE = "smollm2-135m-instruct"


def dataset(n: int) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def tenant(settings: Settings) -> tuple[str, str]:
    return new_tenant(settings, name="Support Team")


@pytest.fixture
def sdk(client: TestClient, tenant) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=tenant[1], http_client=client, max_retries=0
    )


@pytest.fixture
def train_file(sdk: openai.OpenAI) -> str:
    return sdk.files.create(file=("train.jsonl", dataset(24)), purpose="fine-tune").id


def jobs_in_db(settings: Settings) -> list[Job]:
    with Session(get_engine(settings.database_url)) as s:
        return list(s.exec(select(Job)))


def test_create_job_has_every_openai_field(sdk: openai.OpenAI, train_file: str) -> None:
    job = sdk.fine_tuning.jobs.create(
        model=BASE,
        training_file=train_file,
        suffix="support-bot",
        seed=7,
        metadata={"team": "support"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto"}}},
        extra_body={
            "method": {
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {"n_epochs": "auto", "lora_r": 8, "packing": True}
                },
            }
        },
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert job.status == "queued" and job.model == BASE and job.seed == 7
    assert job.error is None and job.fine_tuned_model is None and job.finished_at is None
    assert job.trained_tokens is None and job.validation_file is None
    assert job.result_files == [] and job.metadata == {"team": "support"}
    # "auto" is resolved from the dataset size (24 examples) and reported as numbers.
    hp = job.hyperparameters
    assert isinstance(hp.n_epochs, int) and hp.n_epochs > 3
    assert isinstance(hp.batch_size, int) and isinstance(hp.learning_rate_multiplier, float)
    assert job.model_extra["config"]["lora_r"] == 8 and job.model_extra["config"]["packing"]
    events = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id)]
    assert f"Created fine-tuning job: {job.id}" in events
    assert "Files validated, moving job to queued state" in events


def test_deprecated_top_level_hyperparameters_are_accepted(sdk, train_file) -> None:
    job = sdk.fine_tuning.jobs.create(
        model=BASE, training_file=train_file, hyperparameters={"n_epochs": 2, "batch_size": 4}
    )
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "gpt-4o"}, "model", "model_not_available"),
        ({"suffix": "Support_Bot"}, "suffix", None),
        ({"suffix": "x" * 65}, "suffix", None),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "method.supervised.hyperparameters.n_epochs",
            None,
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_r": 0}}}},
            "method.supervised.hyperparameters.lora_r",
            None,
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"warp": 9}}}},
            "method.supervised.hyperparameters.warp",
            None,
        ),
        ({"method": {"type": "reinforcement"}}, "method.type", None),
        ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size", None),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", None),
        ({"training_file": "file-nope"}, "training_file", "invalid_training_file"),
        ({"validation_file": "file-nope"}, "validation_file", "invalid_validation_file"),
    ],
)
def test_bad_requests_are_400_naming_the_field_and_queue_nothing(
    client: TestClient, tenant, train_file: str, settings: Settings, body, param, code
) -> None:
    r = client.post(
        "/v1/fine_tuning/jobs",
        headers=bearer(tenant[1]),
        json={"model": BASE, "training_file": train_file, **body},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    if code:
        assert err["code"] == code
    assert jobs_in_db(settings) == []


def test_unusable_training_files(sdk: openai.OpenAI, client, tenant, settings) -> None:
    few = sdk.files.create(file=("few.jsonl", dataset(3)), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as e:
        sdk.fine_tuning.jobs.create(model=BASE, training_file=few)
    assert e.value.code == "invalid_n_examples"
    assert "has 3 example(s), but must have at least 10" in e.value.message
    broken = sdk.files.create(file=("bad.jsonl", b"not json\n"), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as e:
        sdk.fine_tuning.jobs.create(model=BASE, training_file=broken)
    assert e.value.code == "invalid_training_file"
    _, other_key = new_tenant(settings)
    foreign = client.post(
        "/v1/files",
        headers=bearer(other_key),
        data={"purpose": "fine-tune"},
        files={"file": ("t.jsonl", dataset(20))},
    ).json()["id"]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.fine_tuning.jobs.create(model=BASE, training_file=foreign)
    assert e.value.code == "invalid_training_file"
    assert jobs_in_db(settings) == []


def test_cancel_a_queued_job(sdk: openai.OpenAI, train_file: str) -> None:
    job = sdk.fine_tuning.jobs.create(model=BASE, training_file=train_file)
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.BadRequestError) as e:
        sdk.fine_tuning.jobs.cancel(job.id)
    assert e.value.code == "job_not_cancellable"


def test_list_pages_and_filters_by_metadata(sdk: openai.OpenAI, train_file: str) -> None:
    ids = [
        sdk.fine_tuning.jobs.create(
            model=BASE, training_file=train_file, metadata={"n": str(i % 2)}
        ).id
        for i in range(4)
    ]
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=3)] == ids[::-1]
    page = sdk.fine_tuning.jobs.list(limit=3)
    assert page.has_more is True and len(page.data) == 3
    odd = sdk.fine_tuning.jobs.list(metadata={"n": "1"})
    assert [j.id for j in odd] == [ids[3], ids[1]]


def test_other_tenants_get_404_on_every_job_route(
    client: TestClient, tenant, train_file: str, settings: Settings
) -> None:
    job_id = client.post(
        "/v1/fine_tuning/jobs",
        headers=bearer(tenant[1]),
        json={"model": BASE, "training_file": train_file},
    ).json()["id"]
    _, other = new_tenant(settings)
    for method, path in [
        ("GET", ""),
        ("POST", "/cancel"),
        ("GET", "/events"),
        ("GET", "/checkpoints"),
    ]:
        mine = client.request(
            method, f"/v1/fine_tuning/jobs/ftjob-none{path}", headers=bearer(other)
        )
        theirs = client.request(
            method, f"/v1/fine_tuning/jobs/{job_id}{path}", headers=bearer(other)
        )
        assert theirs.status_code == mine.status_code == 404
        assert theirs.json()["error"]["code"] == mine.json()["error"]["code"]
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(other)).json()["data"] == []


# DPO jobs: OpenAI's `method: {type: "dpo", dpo: {hyperparameters}}`, the preference file
# kind, and every way such a request is a 400 naming the field.


def preferences(n: int) -> bytes:
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": f"q{i}"}]},
            "preferred_output": [{"role": "assistant", "content": f"Short answer {i}."}],
            "non_preferred_output": [{"role": "assistant", "content": f"A long answer {i}..."}],
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def pref_file(sdk: openai.OpenAI) -> str:
    return sdk.files.create(file=("prefs.jsonl", preferences(12)), purpose="fine-tune").id


def dpo(**hyperparameters: Any) -> Any:  # the SDK's `Method` TypedDict, loosely
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def conformance(client: TestClient) -> Conformance:
    """Checks every answer `client` (and an SDK on it) gets against OpenAI's schemas."""
    checked = Conformance()
    client.event_hooks["response"].append(checked.hook)
    return checked


def test_a_dpo_job_answers_in_openais_shape(
    client: TestClient, sdk: openai.OpenAI, pref_file: str
) -> None:
    checked = conformance(client)
    stats = (sdk.files.retrieve(pref_file).model_extra or {})["stats"]
    assert stats["kind"] == "preference" and stats["formats"] == {"preference": 12}
    auto = sdk.fine_tuning.jobs.create(model=BASE, training_file=pref_file, method=dpo())
    assert auto.method is not None and auto.method.type == "dpo" and auto.method.dpo
    hp = auto.method.dpo.hyperparameters
    assert hp is not None and hp.beta == 0.1 and isinstance(hp.n_epochs, int)
    assert (auto.model_extra or {})["config"]["objective"] == "dpo"

    job = sdk.fine_tuning.jobs.create(
        model=BASE,
        training_file=pref_file,
        validation_file=pref_file,
        method=dpo(beta=0.5, n_epochs=2, r=8, learning_rate_multiplier=2),
    )
    body: dict[str, Any] = sdk.fine_tuning.jobs.retrieve(job.id).to_dict()
    assert body["method"] == {
        "type": "dpo",
        "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 6, "learning_rate_multiplier": 2.0,
                                    "learning_rate": 4e-4, "beta": 0.5}},
    }  # fmt: skip
    assert (body["config"]["dpo_beta"], body["config"]["lora_r"]) == (0.5, 8)
    checked.assert_clean()


def test_a_file_mixing_kinds_is_refused_naming_the_line(sdk: openai.OpenAI) -> None:
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    data = preferences(3) + (json.dumps(chat) + "\n").encode() + preferences(1)
    refused = sdk.files.create(file=("mixed.jsonl", data), purpose="fine-tune")
    assert refused.status == "error"
    assert "line 4: a supervised example in a file of preference examples" in (
        refused.status_details or ""
    )


@pytest.mark.parametrize(
    ("method", "files", "param", "code"),
    [
        (dpo(), ("chat", None), "training_file", "invalid_training_file"),
        (None, ("pref", None), "training_file", "invalid_training_file"),
        ({"type": "supervised"}, ("pref", None), "training_file", "invalid_training_file"),
        (dpo(), ("pref", "chat"), "validation_file", "invalid_validation_file"),
        (dpo(beta=0), ("pref", None), "method.dpo.hyperparameters.beta", None),
        (dpo(beta=2.5), ("pref", None), "method.dpo.hyperparameters.beta", None),
        (dpo(beta="big"), ("pref", None), "method.dpo.hyperparameters.beta", None),
        (dpo(dpo_beta=0.2), ("pref", None), "method.dpo.hyperparameters.dpo_beta", None),
        (dpo(objective="sft"), ("pref", None), "method.dpo.hyperparameters.objective", None),
        (dpo(packing=True), ("pref", None), "method.dpo.hyperparameters.packing", None),
        (
            {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}},
            ("chat", None),
            "method.supervised.hyperparameters.beta",
            None,
        ),
        ({**dpo(), "supervised": {"hyperparameters": {}}}, ("pref", None), "method.supervised",
         None),
        ({"type": "supervised", "dpo": {"hyperparameters": {}}}, ("chat", None), "method.dpo",
         None),
        ({**dpo(), "reinforcement": {}}, ("pref", None), "method.reinforcement", None),
    ],
)  # fmt: skip
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # validation only: one database
def test_bad_dpo_requests_are_400_naming_the_field(
    client: TestClient,
    tenant,
    settings: Settings,
    train_file: str,
    pref_file: str,
    method: dict[str, Any] | None,
    files: tuple[str, str | None],
    param: str,
    code: str | None,
) -> None:
    ids = {"chat": train_file, "pref": pref_file}
    body: dict[str, Any] = {"model": BASE, "training_file": ids[files[0]]}
    if files[1]:
        body["validation_file"] = ids[files[1]]
    if method is not None:
        body["method"] = method
    checked = conformance(client)
    r = client.post("/v1/fine_tuning/jobs", headers=bearer(tenant[1]), json=body)
    assert r.status_code == 400, r.text
    checked.assert_clean()
    err = r.json()["error"]
    assert err["param"] == param, err
    if code:
        assert err["code"] == code
    assert jobs_in_db(settings) == []
