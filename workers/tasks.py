"""Celery tasks. They take ids only; `workers.runner` does the work."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_shutting_down

from api.db import connection_lost, get_engine
from api.services import job_runs
from api.settings import Settings, get_settings
from workers.celery_app import (
    EVAL_TASK,
    TRAIN_TASK,
    enqueue_training,
    held_messages,
    waiting_messages,
)

log = logging.getLogger(__name__)
# A tenant at its running-jobs limit: look again this much later.
DEFER_SECONDS = 5
# Set once the worker is asked to stop. A stopping solo worker still takes one more message
# (celery's loop drains once after the flag): it hands that one back instead of training.
STOPPING = threading.Event()


@worker_shutting_down.connect
def _on_shutting_down(**_: object) -> None:
    STOPPING.set()


@shared_task(
    name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def train_job(self: Task, job_id: str) -> str:
    from workers.runner import DEFERRED, run_training_job

    if STOPPING.is_set():
        raise Reject("the worker is stopping", requeue=True)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        outcome = run_training_job(
            job_id, settings=get_settings(), worker=worker, stopping=STOPPING
        )
    except Exception as e:
        if connection_lost(e):  # before the job was ours to run: try again shortly
            raise self.retry(countdown=DEFER_SECONDS, exc=e) from e
        raise
    log.info("job %s: %s", job_id, outcome)
    if outcome == DEFERRED:
        raise self.retry(countdown=DEFER_SECONDS)
    return outcome


@shared_task(name=EVAL_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def eval_run(self: Task, run_id: str) -> str:
    from workers.eval_runner import run_eval

    if STOPPING.is_set():
        raise Reject("the worker is stopping", requeue=True)
    outcome = run_eval(run_id, settings=get_settings(), stopping=STOPPING)
    log.info("eval run %s: %s", run_id, outcome)
    if outcome == "interrupted":  # the worker is stopping: the next one goes on from here
        raise Reject("the worker is stopping", requeue=True)
    return outcome


def redispatch(settings: Settings, *, older_than: float) -> None:
    """Send again the jobs of this worker's queues still queued `older_than` seconds after
    their last message, where the broker holds fewer messages than the queue has jobs: a
    broker that lost its messages (a restart without persistence) would strand them. A
    healthy backlog is left alone; a duplicate is harmless (only one run claims a job)."""
    from sqlmodel import Session

    with Session(get_engine(settings.database_url)) as session:
        queued = job_runs.queued_counts(session, queues=settings.queues)
        held = held_messages()  # the reaper runs inside the worker
        short = [q for q, n in queued.items() if waiting_messages(settings, q) + held < n]
        due = job_runs.take_due_for_dispatch(session, queues=short, older_than=older_than)
    for job_id, queue in due:
        enqueue_training(settings, job_id, queue=queue)
    if due:
        log.warning("the broker lost %d queued job(s); sent them again", len(due))


def redispatch_eval_runs(settings: Settings, *, older_than: float) -> None:
    """An eval worker's sweep: send again the runs still queued `older_than` seconds after
    they were made while the queue holds no message (a broker that lost them), and the runs
    in progress whose heartbeat stopped (a worker killed mid-run). A duplicate is harmless:
    each item is graded once, and a run claimed twice goes on from the items done."""
    from datetime import timedelta

    from sqlalchemy import and_, false, or_
    from sqlmodel import Session, col, select

    from api.db import utcnow
    from api.models.evals import EvalRun
    from workers.celery_app import enqueue_eval_run

    now = utcnow()
    lost: Any = and_(
        col(EvalRun.status) == "queued",
        col(EvalRun.created_at) <= now - timedelta(seconds=older_than),
    )
    if waiting_messages(settings, settings.eval_queue) + held_messages() > 0:
        lost = false()  # a backlog: queued runs have their messages
    dead = and_(
        col(EvalRun.status) == "in_progress",
        col(EvalRun.heartbeat_at) <= now - timedelta(seconds=settings.heartbeat_timeout),
    )
    with Session(get_engine(settings.database_url)) as session:
        stale = session.exec(select(EvalRun.id).where(or_(lost, dead))).all()
    for run_id in stale:
        enqueue_eval_run(settings, run_id)
    if stale:
        log.warning("sent %d unfinished eval run(s) again", len(stale))


def sweep(settings: Settings, *, redispatch_after: float) -> None:
    """Re-queue jobs whose worker died, then send the jobs whose message is overdue."""
    from sqlmodel import Session

    with Session(get_engine(settings.database_url)) as session:
        requeued = job_runs.requeue_or_fail_stale(
            session, stale_after=settings.heartbeat_timeout, max_attempts=settings.max_job_attempts
        )
    for job_id in requeued:
        log.warning("job %s lost its worker; re-queued", job_id)
    redispatch(settings, older_than=redispatch_after)
    if settings.eval_queue in settings.queues:
        redispatch_eval_runs(settings, older_than=redispatch_after)


def start_reaper(settings: Settings) -> threading.Thread:
    """A daemon thread in the worker: a sweep every few seconds. The first, at start-up,
    re-sends every queued job: the broker may have lost them while no worker ran."""

    def loop() -> None:
        interval = max(1.0, min(30.0, settings.heartbeat_timeout / 3))
        redispatch_after = 0.0
        while True:
            try:
                sweep(settings, redispatch_after=redispatch_after)
                redispatch_after = settings.redispatch_after
            except Exception:  # the database or the broker is down: try again next time
                log.exception("reaper sweep failed; retrying")
            threading.Event().wait(interval)

    thread = threading.Thread(target=loop, name="loraplex-reaper", daemon=True)
    thread.start()
    return thread
