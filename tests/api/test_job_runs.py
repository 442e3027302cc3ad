"""The job row as a state machine: claims, leases, the reaper. Real SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session

from api.db import get_engine, utcnow
from api.models.jobs import Job
from api.services import job_runs
from api.services.job_runs import LeaseLost
from api.services.jobs import cancel_job
from api.settings import Settings
from tests.conftest import new_tenant


def make_job(settings: Settings, *, tenant_id: str | None = None, **values: object) -> str:
    tenant_id = tenant_id or new_tenant(settings)[0]
    with Session(get_engine(settings.database_url)) as s:
        fields: dict = {"status": "queued", **values}
        job = Job(
            tenant_id=tenant_id,
            model="m",
            training_file="file-x",
            method={},
            config={},
            hyperparameters={},
            **fields,
        )
        s.add(job)
        s.commit()
        return job.id


def test_only_one_worker_can_claim_a_job(settings: Settings, session: Session) -> None:
    job_id = make_job(settings)
    first = job_runs.claim(session, job_id=job_id, worker="a", stale_after=60)
    assert first is not None and first.attempt == 1
    assert job_runs.claim(session, job_id=job_id, worker="b", stale_after=60) is None


def test_a_claim_leaves_a_job_queued_while_its_tenant_is_at_its_limit(
    settings: Settings, session: Session
) -> None:
    first = make_job(settings)
    tenant_id = session.get(Job, first).tenant_id  # type: ignore[union-attr]
    second = make_job(settings, tenant_id=tenant_id)
    other_tenant = make_job(settings)
    claim = job_runs.claim(session, job_id=first, worker="a", stale_after=60, tenant_limit=1)
    assert claim is not None
    assert (
        job_runs.claim(session, job_id=second, worker="b", stale_after=60, tenant_limit=1) is None
    )
    assert session.get(Job, second, populate_existing=True).status == "queued"  # type: ignore[union-attr]
    assert job_runs.claim(session, job_id=other_tenant, worker="b", stale_after=60, tenant_limit=1)
    job_runs.fail(session, claim, code="x", message="done with it")
    assert job_runs.claim(session, job_id=second, worker="b", stale_after=60, tenant_limit=1)


def test_a_dead_workers_job_can_be_claimed_and_the_old_lease_is_void(
    settings: Settings, session: Session
) -> None:
    job_id = make_job(settings)
    old = job_runs.claim(session, job_id=job_id, worker="a", stale_after=60)
    assert old is not None
    job = session.get(Job, job_id)
    assert job is not None
    job.heartbeat_at = utcnow() - timedelta(seconds=120)
    session.commit()
    new = job_runs.claim(session, job_id=job_id, worker="b", stale_after=60)
    assert new is not None and new.attempt == 2
    with pytest.raises(LeaseLost):
        job_runs.heartbeat(session, old)
    job_runs.heartbeat(session, new)


def test_cancel_voids_the_running_lease(settings: Settings, session: Session) -> None:
    job_id = make_job(settings, estimated_finish=utcnow() + timedelta(minutes=5))
    claim = job_runs.claim(session, job_id=job_id, worker="a", stale_after=60)
    assert claim is not None
    tenant_id = session.get(Job, job_id).tenant_id  # type: ignore[union-attr]
    cancel_job(session, tenant_id=tenant_id, job_id=job_id)
    with pytest.raises(LeaseLost):
        job_runs.heartbeat(session, claim)
    with pytest.raises(LeaseLost):
        job_runs.owned_job(session, claim)
    assert job_runs.claim(session, job_id=job_id, worker="b", stale_after=0) is None
    cancelled = session.get(Job, job_id, populate_existing=True)
    assert cancelled is not None and cancelled.estimated_finish is None


def test_reaper_requeues_then_gives_up(settings: Settings, session: Session) -> None:
    stale = utcnow() - timedelta(seconds=300)
    retry = make_job(settings, status="running", attempts=1, heartbeat_at=stale, lease="x")
    give_up = make_job(settings, status="running", attempts=3, heartbeat_at=stale, lease="y")
    alive = make_job(settings, status="running", attempts=1, heartbeat_at=utcnow(), lease="z")
    requeued = job_runs.requeue_or_fail_stale(session, stale_after=60, max_attempts=3)
    assert requeued == [retry]
    rows = {j: session.get(Job, j, populate_existing=True) for j in (retry, give_up, alive)}
    assert rows[retry].status == "queued" and rows[retry].lease is None  # type: ignore[union-attr]
    assert rows[give_up].status == "failed"  # type: ignore[union-attr]
    assert rows[give_up].error["code"] == "worker_lost"  # type: ignore[index,union-attr]
    assert rows[alive].status == "running"  # type: ignore[union-attr]


def test_an_overdue_queued_job_is_handed_out_once_per_period(
    settings: Settings, session: Session
) -> None:
    long_ago = utcnow() - timedelta(seconds=600)
    overdue = make_job(settings, dispatched_at=long_ago, queue="q")
    never_sent = make_job(settings, dispatched_at=None, queue="q")
    make_job(settings, dispatched_at=utcnow(), queue="q")  # just sent: left alone
    make_job(settings, dispatched_at=long_ago, queue="other")  # another worker class's
    make_job(settings, dispatched_at=long_ago, queue="q", status="running")
    assert job_runs.queued_counts(session, queues=["q"]) == {"q": 3}

    due = job_runs.take_due_for_dispatch(session, queues=["q"], older_than=300)
    assert due == [(overdue, "q"), (never_sent, "q")]
    # A second worker sweeping at the same time finds nothing left to send.
    assert job_runs.take_due_for_dispatch(session, queues=["q"], older_than=300) == []
    # At start-up (older_than=0) every queued job of the queue is sent.
    assert len(job_runs.take_due_for_dispatch(session, queues=["q"], older_than=0)) == 3
