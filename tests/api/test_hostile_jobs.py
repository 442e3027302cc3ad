"""A hostile tenant against the fine-tuning jobs API and the job state machine (issue 13):
bounds refused before anything is queued, cancel racing success, fair share of the queue.

Real SQLite and PostgreSQL; the race runs two real sessions on two threads.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import openai
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.db import get_engine, utcnow
from api.errors import InvalidRequest
from api.models.jobs import Job
from api.services import job_runs
from api.services.job_runs import LeaseLost
from api.services.jobs import cancel_job
from api.services.limits import set_overrides
from api.settings import Settings
from tests.api.test_job_runs import make_job
from tests.api.test_jobs_api import BASE, dataset, jobs_in_db
from tests.conftest import new_tenant

HP = "method.supervised.hyperparameters"
# Backtracks for minutes inside peft's re.fullmatch while holding the GIL (issue 13, item 1).
CATASTROPHIC = r"(?:[a-z_0-9]*[a-z_0-9]*\.?)*X"


@pytest.fixture
def sdk(client: TestClient, settings: Settings) -> openai.OpenAI:
    _, key = new_tenant(settings, name="mallory")
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0
    )


@pytest.fixture
def train_file(sdk: openai.OpenAI) -> str:
    return sdk.files.create(file=("train.jsonl", dataset(24)), purpose="fine-tune").id


def _create(sdk: openai.OpenAI, train_file: str, **hyperparameters: object):
    return sdk.fine_tuning.jobs.create(
        model=BASE,
        training_file=train_file,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"target_modules": CATASTROPHIC}, "target_modules"),
        ({"target_modules": ".*proj"}, "target_modules"),
        ({"target_modules": [CATASTROPHIC]}, "target_modules"),
        ({"target_modules": ["q_proj|v_proj"]}, "target_modules"),
        ({"target_modules": [f"m{i}" for i in range(65)]}, "target_modules"),
        ({"lora_r": 256}, "lora_r"),  # trains, then could never be served (max rank 64)
        ({"max_seq_length": 100_000_000}, "max_seq_length"),
        ({"max_seq_length": 100_000}, "max_seq_length"),  # above the base's context
        ({"n_epochs": 50, "batch_size": 1, "checkpoint_interval": 1}, "checkpoint_interval"),
        ({"n_epochs": 50, "eval_interval": 1}, "eval_interval"),
        ({"probe_size": 1_000_000}, "probe_size"),
        ({"lora_alpha": 10**9}, "lora_alpha"),
        # A path on the worker (another tenant's adapter in its work dir): the worker's own.
        ({"init_adapter": "/var/lib/loraplex/work/ftjob-other/adapter"}, "init_adapter"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_out_of_bounds_training_requests_are_refused_before_anything_is_queued(
    sdk: openai.OpenAI, train_file: str, settings: Settings, hyperparameters: dict, field: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _create(sdk, train_file, **hyperparameters)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == f"{HP}.{field}", error
    assert jobs_in_db(settings) == []


def test_plain_module_names_and_bounded_values_are_accepted(
    sdk: openai.OpenAI, train_file: str
) -> None:
    job = _create(
        sdk,
        train_file,
        target_modules=["q_proj", "self_attn.v_proj"],
        lora_r=64,
        max_seq_length=8192,
        n_epochs=50,
        batch_size=1,
        checkpoint_interval=24,
    )
    assert job.status == "queued"
    assert job.model_extra["config"]["target_modules"] == ["q_proj", "self_attn.v_proj"]


def _finish_as_a_worker_would(settings: Settings, claim: job_runs.Claim, hold: float) -> None:
    """The worker's final transaction (workers.runner._register): lock the row, write the
    result, compare-and-set `succeeded`; `hold` seconds pass between lock and commit."""
    with Session(get_engine(settings.database_url)) as s:
        job_runs.owned_job(s, claim)
        time.sleep(hold)
        job_runs.settle(
            s, claim, status="succeeded", finished_at=utcnow(), fine_tuned_model="ft:m:t::x"
        )
        s.commit()


def _running_job(settings: Settings, session: Session) -> tuple[str, str, job_runs.Claim]:
    job_id = make_job(settings)
    claim = job_runs.claim(session, job_id=job_id, worker="w", stale_after=60)
    assert claim is not None
    return job_id, session.get(Job, job_id).tenant_id, claim  # type: ignore[union-attr]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_cancel_during_the_final_transaction_leaves_a_succeeded_job(
    settings: Settings, session: Session
) -> None:
    job_id, tenant_id, claim = _running_job(settings, session)
    worker = threading.Thread(target=_finish_as_a_worker_would, args=(settings, claim, 1.0))
    worker.start()
    time.sleep(0.3)  # the worker holds the row lock now; the cancel waits on it
    with Session(get_engine(settings.database_url)) as other, pytest.raises(InvalidRequest) as e:
        cancel_job(other, tenant_id=tenant_id, job_id=job_id)
    worker.join()
    assert e.value.code == "job_not_cancellable" and "succeeded" in e.value.message
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None and job.status == "succeeded" and job.fine_tuned_model


def test_a_cancel_that_commits_first_voids_the_workers_result(
    settings: Settings, session: Session
) -> None:
    job_id, tenant_id, claim = _running_job(settings, session)
    with Session(get_engine(settings.database_url)) as worker:
        worker.get(Job, job_id)  # the worker has read its row; then the cancel lands
        cancelled = cancel_job(session, tenant_id=tenant_id, job_id=job_id)
        assert cancelled.status == "cancelled"
        with pytest.raises(LeaseLost):
            job_runs.settle(worker, claim, status="succeeded", fine_tuned_model="ft:m:t::x")
        worker.rollback()
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None and job.status == "cancelled" and job.fine_tuned_model is None


def test_the_queue_takes_tenants_in_turn(settings: Settings, session: Session) -> None:
    busy, _ = new_tenant(settings, name="backlog")
    quiet, _ = new_tenant(settings, name="quiet")
    then = utcnow() - timedelta(minutes=5)
    backlog = [
        make_job(settings, tenant_id=busy, queue="q", created_at=then + timedelta(seconds=i))
        for i in range(4)
    ]
    # The backlog's first job already ran; the quiet tenant's one job came after all four.
    make_job(settings, tenant_id=busy, queue="q", status="succeeded", started_at=then)
    late = make_job(settings, tenant_id=quiet, queue="q")
    make_job(settings, tenant_id=quiet, queue="other")  # another worker class's queue
    assert _ids(job_runs.fair_order(session, queue="q")) == [late, *backlog]

    # At its running limit a tenant waits; the others go on.
    make_job(settings, tenant_id=quiet, queue="q", status="running", started_at=utcnow())
    assert _ids(job_runs.fair_order(session, queue="q", limit_of=lambda _: 1)) == backlog
    # Two tenants with backlogs alternate, the one served longest ago first.
    second = [make_job(settings, tenant_id=quiet, queue="q") for _ in range(2)]
    order = _ids(job_runs.fair_order(session, queue="q"))
    assert order[:6] == [backlog[0], late, backlog[1], second[0], backlog[2], second[1]]


def _ids(order: list[tuple[str, str]]) -> list[str]:
    return [job_id for job_id, _ in order]


def _override(settings: Settings, tenant_id: str, **limits: int) -> None:
    with Session(get_engine(settings.database_url)) as s:
        set_overrides(s, tenant_id=tenant_id, changes=dict(limits))
        s.commit()


def test_a_tenants_backlog_is_capped_and_others_are_unaffected(
    client: TestClient, settings: Settings
) -> None:
    (mallory, m_key), (_, b_key) = new_tenant(settings), new_tenant(settings)
    _override(settings, mallory, max_queued_jobs=2)
    sdks = [
        openai.OpenAI(base_url="http://testserver/v1", api_key=k, http_client=client, max_retries=0)
        for k in (m_key, b_key)
    ]
    files = [s.files.create(file=("t.jsonl", dataset(24)), purpose="fine-tune").id for s in sdks]
    first, _ = (_create(sdks[0], files[0]) for _ in range(2))
    with pytest.raises(openai.RateLimitError) as info:
        _create(sdks[0], files[0])
    assert info.value.code == "rate_limit_exceeded" and "2" in info.value.message
    assert info.value.response.headers["x-should-retry"] == "false"
    assert [_create(sdks[1], files[1]).status for _ in range(3)] == ["queued"] * 3
    sdks[0].fine_tuning.jobs.cancel(first.id)  # room again
    assert _create(sdks[0], files[0]).status == "queued"


def test_a_tenant_over_its_storage_quota_cannot_start_jobs(
    sdk: openai.OpenAI, train_file: str, settings: Settings
) -> None:
    _create(sdk, train_file)
    (job,) = jobs_in_db(settings)
    _override(settings, job.tenant_id, storage_quota_bytes=100)  # the file alone holds more
    with pytest.raises(openai.BadRequestError) as info:
        _create(sdk, train_file)
    assert info.value.code == "storage_quota_exceeded"
    assert len(jobs_in_db(settings)) == 1
