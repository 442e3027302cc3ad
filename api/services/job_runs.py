"""Fine-tuning jobs, worker side: claim, heartbeat, checkpoint, finish, reap.

Every write a worker makes is conditional on its lease: a job that was cancelled, or
re-queued because its worker looked dead, cannot be overwritten by the old run.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from api.db import aware, utcnow
from api.models.jobs import PAUSED, Job, JobCheckpoint
from api.models.tenants import Tenant
from api.services.jobs import add_event


@dataclass(frozen=True)
class Claim:
    job_id: str
    lease: str
    attempt: int


class LeaseLost(Exception):
    """The job was cancelled or handed to another worker while this one ran it."""


def claim(
    session: Session,
    *,
    job_id: str,
    worker: str,
    stale_after: float,
    tenant_limit: int | None = None,
) -> Claim | None:
    """Take the job if it is queued (or running with a dead worker); None if it is not ours
    to run: finished, cancelled, alive on another worker, or (queued) its tenant already
    runs `tenant_limit` jobs."""
    now = utcnow()
    lease = secrets.token_hex(8)
    stale = now - timedelta(seconds=stale_after)
    queued = col(Job.status) == "queued"
    if tenant_limit is not None:
        queued = and_(queued, _running_for_tenant(session, job_id) < tenant_limit)
    result = session.execute(
        update(Job)
        .where(
            col(Job.id) == job_id,
            or_(queued, and_(col(Job.status) == "running", col(Job.heartbeat_at) < stale)),
        )
        .values(
            status="running",
            lease=lease,
            worker=worker,
            heartbeat_at=now,
            attempts=col(Job.attempts) + 1,
            started_at=func.coalesce(Job.started_at, now),
        )
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return Claim(job_id=job_id, lease=lease, attempt=job.attempts)


def fair_order(
    session: Session, *, queue: str, limit_of: Callable[[str], int | None] = lambda _: None
) -> list[tuple[str, str]]:
    """The queue's queued jobs, as (job id, tenant id), in the order workers should take
    them: round robin across tenants, so one tenant's backlog never starves another. Tenants
    take turns by when one of their jobs last started (never first), then by their oldest
    queued job; each tenant's jobs go oldest first; a tenant already running `limit_of(it)`
    jobs (None: no limit) is left out."""
    queued = session.exec(
        select(Job.id, Job.tenant_id)
        .where(Job.status == "queued", Job.queue == queue)
        .order_by(col(Job.created_at), col(Job.id))
    ).all()
    tenants = list(dict.fromkeys(tenant for _, tenant in queued))
    if not tenants:
        return []
    stats = session.exec(
        select(
            Job.tenant_id,
            func.max(Job.started_at),
            func.count().filter(col(Job.status) == "running"),
        )
        .where(col(Job.tenant_id).in_(tenants))
        .group_by(col(Job.tenant_id))
    ).all()
    last_start = {t: aware(started) if started else None for t, started, _ in stats}
    running = {t: int(n) for t, _, n in stats}
    limits = {t: limit_of(t) for t in tenants}
    tenants = [t for t in tenants if running.get(t, 0) < (limits[t] or float("inf"))]
    # Stable sort: tenants that never started keep the order of their oldest queued job.
    turn = sorted(tenants, key=lambda t: (last_start[t] is not None, last_start[t] or utcnow()))
    per_tenant = {t: [job for job, owner in queued if owner == t] for t in turn}
    order: list[tuple[str, str]] = []
    while any(per_tenant.values()):
        for t in turn:
            if per_tenant[t]:
                order.append((per_tenant[t].pop(0), t))
    return order


def _running_for_tenant(session: Session, job_id: str) -> Any:
    """The count of the job's tenant's other running jobs, as a subquery of the claim.

    Claims of one tenant's jobs take turns on PostgreSQL (the tenant row's lock, held to the
    claim's commit); SQLite runs the one UPDATE alone. So two workers cannot both see room.
    """
    tenant_id = session.exec(select(Job.tenant_id).where(Job.id == job_id)).first()
    session.exec(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update()).all()
    other = aliased(Job)  # not correlated with the UPDATE's own row
    return (
        select(func.count())
        .select_from(other)
        .where(other.tenant_id == tenant_id, other.status == "running", other.id != job_id)
        .scalar_subquery()
    )


class PauseRequested(LeaseLost):
    """The job was paused: still this run's, to checkpoint and `park`."""


def heartbeat(session: Session, claim: Claim, **values: Any) -> None:
    """Prove the worker is alive (and store `values`); PauseRequested if the tenant paused
    the job, LeaseLost if the job is not ours any more."""
    result = session.execute(
        update(Job)
        .where(
            col(Job.id) == claim.job_id, col(Job.lease) == claim.lease, col(Job.status) == "running"
        )
        .values(heartbeat_at=utcnow(), **values)
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        paused = session.exec(
            select(Job.id).where(
                col(Job.id) == claim.job_id, col(Job.lease) == claim.lease,
                col(Job.status) == PAUSED,
            )
        ).first()  # fmt: skip
        raise (PauseRequested if paused else LeaseLost)(claim.job_id)


def settle(session: Session, claim: Claim, *, from_paused: bool = False, **values: Any) -> None:
    """Move the job out of `running` (to succeeded, failed or queued) in the caller's
    transaction, only if it is still this run's: a compare-and-set, so a cancel (or the
    reaper) that got there first wins and this raises LeaseLost; the caller's transaction
    then rolls back whatever it added (a registry version, a results file)."""
    statuses = ("running", PAUSED) if from_paused else ("running",)
    result = session.execute(
        update(Job)
        .where(
            col(Job.id) == claim.job_id,
            col(Job.lease) == claim.lease,
            col(Job.status).in_(statuses),
        )
        # estimated_finish: only a running job has one.
        .values(**{"lease": None, "estimated_finish": None, **values})
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(claim.job_id)


def owned_job(session: Session, claim: Claim, *, paused_ok: bool = False) -> Job:
    """The job row, locked for update where the database can; LeaseLost if not ours.
    `paused_ok`: a paused job whose worker still holds the lease (it is checkpointing to
    park it) is still ours."""
    job = session.exec(select(Job).where(Job.id == claim.job_id).with_for_update()).one()
    statuses = ("running", PAUSED) if paused_ok else ("running",)
    if job.lease != claim.lease or job.status not in statuses:
        raise LeaseLost(claim.job_id)
    return job


def record_checkpoint(
    session: Session,
    claim: Claim,
    *,
    step: int,
    prefix: str,
    metrics: dict[str, Any],
    keep: int | None = None,
    files: dict[str, Any] | None = None,
) -> list[str]:
    """Record the checkpoint of `step`; with `keep`, drop all but the newest `keep` rows.
    Returns the storage prefixes of the dropped ones, for the caller to delete once this
    commits (a crash in between leaves unlisted bytes, never a listed checkpoint without).
    A paused job's worker records the checkpoint it parks the job at. `files`: the adapter's
    files in it (path -> sha256, size), so it can be served by name."""
    owned_job(session, claim, paused_ok=True)
    exists = session.exec(
        select(JobCheckpoint).where(
            JobCheckpoint.job_id == claim.job_id, JobCheckpoint.step_number == step
        )
    ).first()
    if exists is None:
        session.add(
            JobCheckpoint(
                job_id=claim.job_id,
                step_number=step,
                storage_prefix=prefix,
                metrics=metrics,
                files=files,
            )
        )
        add_event(session, claim.job_id, f"Checkpoint created at step {step}", data={"step": step})
    dropped: list[str] = []
    if keep is not None:
        session.flush()
        older = session.exec(
            select(JobCheckpoint)
            .where(JobCheckpoint.job_id == claim.job_id)
            .order_by(col(JobCheckpoint.step_number).desc())
            .offset(keep)
        ).all()
        for ckpt in older:
            dropped.append(ckpt.storage_prefix)
            session.delete(ckpt)
    session.commit()
    return dropped


def latest_checkpoint(session: Session, *, job_id: str) -> JobCheckpoint | None:
    return session.exec(
        select(JobCheckpoint)
        .where(JobCheckpoint.job_id == job_id)
        .order_by(col(JobCheckpoint.step_number).desc())
    ).first()


def fail(
    session: Session, claim: Claim, *, code: str, message: str, param: str | None = None
) -> None:
    owned_job(session, claim)
    error = {"code": code, "message": message, "param": param}
    settle(session, claim, status="failed", finished_at=utcnow(), error=error)
    add_event(session, claim.job_id, f"Fine-tuning job failed: {message}", level="error")
    session.commit()


def fail_hung(session: Session, claim: Claim, *, seconds: float) -> None:
    """The run stopped answering (its watchdog ended the process): fail it for good rather
    than let the reaper hand it to the next worker to hang there too. LeaseLost if it was
    cancelled or re-queued meanwhile."""
    message = (
        f"Training stopped responding for more than {seconds:.0f} s and was stopped. "
        "Check the job's hyperparameters and data; the operator's worker log has details."
    )
    fail(session, claim, code="training_hung", message=message)


def hand_back(session: Session, claim: Claim, *, step: int) -> str:
    """A stopping worker returns the job it runs, checkpointed at `step`: queued again (to
    resume from that checkpoint), and the attempt not counted against it. Returns its queue.
    LeaseLost if the job is no longer this worker's."""
    job = owned_job(session, claim)
    settle(
        session,
        claim,
        status="queued",
        worker=None,
        attempts=max(0, job.attempts - 1),
        dispatched_at=utcnow(),
    )
    add_event(
        session,
        job.id,
        f"Worker stopping: job handed back after step {step}; it resumes from that checkpoint",
        level="warn",
    )
    session.commit()
    return job.queue


def park(session: Session, claim: Claim, *, step: int | None) -> bool:
    """A paused job's worker checkpointed at `step` (None: before training started) and
    lets it go: the job stays `paused`, without a worker, until resumed. False when it is
    not this run's any more (cancelled meanwhile)."""
    result = session.execute(
        update(Job)
        .where(
            col(Job.id) == claim.job_id, col(Job.lease) == claim.lease, col(Job.status) == PAUSED
        )
        .values(lease=None, worker=None, estimated_finish=None)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    job = session.get(Job, claim.job_id)
    assert job is not None
    job.attempts = max(0, job.attempts - 1)  # a pause is not a failed attempt
    where = f"after step {step}; it resumes from that checkpoint" if step else "before training"
    add_event(session, claim.job_id, f"Fine-tuning job paused {where}")
    session.commit()
    return True


def requeue_or_fail_stale(session: Session, *, stale_after: float, max_attempts: int) -> list[str]:
    """Jobs whose worker stopped heartbeating: re-queue (to resume) or fail. Returns the ids
    re-queued; `take_due_for_dispatch` hands them out to be sent again."""
    stale = utcnow() - timedelta(seconds=stale_after)
    jobs = session.exec(
        select(Job).where(Job.status == "running", col(Job.heartbeat_at) < stale)
    ).all()
    requeue = []
    for job in jobs:
        last_seen = aware(job.heartbeat_at) if job.heartbeat_at else None
        job.lease = None
        if job.attempts >= max_attempts:
            job.status, job.finished_at = "failed", utcnow()
            job.error = {
                "code": "worker_lost",
                "param": None,
                "message": f"The worker running this job stopped responding "
                f"{job.attempts} time(s); giving up.",
            }
            add_event(session, job.id, job.error["message"], level="error")
        else:
            job.status, job.dispatched_at = "queued", None  # the next dispatch sweep sends it
            requeue.append(job.id)
            add_event(
                session,
                job.id,
                f"Worker lost (last heartbeat {last_seen:%H:%M:%S} UTC); "
                "job re-queued to resume from its last checkpoint",
                level="warn",
            )
    session.commit()
    return requeue


def queued_counts(session: Session, *, queues: list[str]) -> dict[str, int]:
    """Queue -> how many of its jobs are `queued` (queues with none are left out)."""
    rows = session.exec(
        select(Job.queue, func.count())
        .where(Job.status == "queued", col(Job.queue).in_(queues))
        .group_by(col(Job.queue))
    ).all()
    return {queue: int(n) for queue, n in rows}


def take_due_for_dispatch(
    session: Session, *, queues: list[str], older_than: float
) -> list[tuple[str, str]]:
    """Queued jobs whose message was sent more than `older_than` seconds ago (or never),
    marked as sent now; returns (job id, queue) for the caller to send after this commits.

    One conditional UPDATE: of several workers sweeping at once, one re-sends each job.
    """
    if not queues:
        return []
    now = utcnow()
    due = update(Job).where(
        col(Job.status) == "queued",
        col(Job.queue).in_(queues),
        or_(
            col(Job.dispatched_at).is_(None),
            col(Job.dispatched_at) < now - timedelta(seconds=older_than),
        ),
    )
    rows = session.execute(
        due.values(dispatched_at=now).returning(col(Job.id), col(Job.queue), col(Job.created_at))
    ).all()
    session.commit()
    return [(job_id, queue) for job_id, queue, _ in sorted(rows, key=lambda r: r[2])]
