"""Celery tasks. They take ids only; `workers.runner` does the work."""

from __future__ import annotations

import logging
import os
import socket
import threading

from celery import Task, shared_task

from api.db import get_engine
from api.services import job_runs
from api.settings import Settings, get_settings
from workers.celery_app import TRAIN_TASK, enqueue_training

log = logging.getLogger(__name__)
# A tenant at its running-jobs limit: look again this much later.
DEFER_SECONDS = 5


@shared_task(
    name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def train_job(self: Task, job_id: str) -> str:
    from workers.runner import DEFERRED, run_training_job

    worker = f"{socket.gethostname()}:{os.getpid()}"
    outcome = run_training_job(job_id, settings=get_settings(), worker=worker)
    log.info("job %s: %s", job_id, outcome)
    if outcome == DEFERRED:
        raise self.retry(countdown=DEFER_SECONDS)
    return outcome


def sweep(settings: Settings) -> None:
    """Re-queue jobs whose worker died and re-send jobs queued with no message in flight.
    Sending a job twice is harmless: only one run can claim it."""
    from sqlmodel import Session

    with Session(get_engine(settings.database_url)) as session:
        requeued = job_runs.requeue_or_fail_stale(
            session, stale_after=settings.heartbeat_timeout, max_attempts=settings.max_job_attempts
        )
    for job_id in requeued:
        log.warning("job %s lost its worker; re-queued", job_id)
        enqueue_training(settings, job_id, queue=settings.train_queue)


def start_reaper(settings: Settings, *, resend_queued: bool = True) -> threading.Thread:
    """A daemon thread in the worker: a start-up sweep, then one every few seconds."""
    from sqlmodel import Session

    def loop() -> None:
        if resend_queued:
            with Session(get_engine(settings.database_url)) as session:
                queued = job_runs.queued_job_ids(session, queues=settings.queues)
            for job_id in queued:
                enqueue_training(settings, job_id, queue=settings.train_queue)
        interval = max(1.0, min(30.0, settings.heartbeat_timeout / 3))
        while True:
            try:
                sweep(settings)
            except Exception:
                log.exception("reaper sweep failed; retrying")
            threading.Event().wait(interval)

    thread = threading.Thread(target=loop, name="loraplex-reaper", daemon=True)
    thread.start()
    return thread
