"""The Celery app, built from the settings: broker, queues, one training task per worker.

The embedded default uses kombu's filesystem transport (no broker server), made safe for
concurrent processes in `workers.broker_fs`: folders under `LORAPLEX_HOME/broker`.
Production uses Redis or RabbitMQ.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu import Queue

from api.settings import Settings

log = logging.getLogger(__name__)
TRAIN_TASK = "loraplex.train_job"
EVAL_TASK = "loraplex.eval_run"


def _filesystem_options(settings: Settings) -> dict[str, Any]:
    root = settings.broker_dir
    folders = {name: root / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "processed_folder": str(folders["processed"]),
        "store_processed": False,
        "control_folder": str(folders["control"]),  # its default is a relative path
        "polling_interval": settings.broker_polling_interval,
    }


def transport_options(settings: Settings) -> dict[str, Any]:
    if settings.broker_url.startswith("filesystem"):
        return _filesystem_options(settings)
    # Redis/SQS redeliver unacked messages after this: it must exceed the longest run.
    return {"visibility_timeout": settings.broker_visibility_timeout}


def make_celery(settings: Settings) -> Celery:
    app = Celery("loraplex", broker=settings.broker_url, include=["workers.tasks"])
    app.conf.update(
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # the job row is the result
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,  # one training task per GPU
        worker_hijack_root_logger=False,
        # Library output stays what it is: redirected, every stray line was a WARNING.
        worker_redirect_stdouts=False,
        task_default_queue=settings.train_queue,
        task_queues=[Queue(q) for q in dict.fromkeys([settings.train_queue, *settings.queues])],
        task_create_missing_queues=True,
        worker_send_task_events=False,
        enable_utc=True,
    )
    if settings.broker_url.startswith("filesystem"):
        from workers.broker_fs import TRANSPORT

        app.conf.broker_transport = TRANSPORT  # kombu's, with atomic writes
    return app


_apps: dict[tuple[str, str, str], Celery] = {}


def celery_for(settings: Settings) -> Celery:
    """One app per broker/queue/home (each holds a connection pool)."""
    key = (settings.broker_url, ",".join(settings.queues), str(settings.home))
    if key not in _apps:
        _apps[key] = make_celery(settings)
    return _apps[key]


def enqueue_training(settings: Settings, job_id: str, *, queue: str) -> None:
    """Send the job to a worker. Call only after the job row is committed."""
    celery_for(settings).send_task(TRAIN_TASK, args=[job_id], queue=queue)


def enqueue_eval_run(settings: Settings, run_id: str) -> None:
    """Send an eval run to the eval workers. Call only after the run row is committed."""
    celery_for(settings).send_task(EVAL_TASK, args=[run_id], queue=settings.eval_queue)


def send_eval_runs(settings: Settings, run_ids: list[str]) -> None:
    """Enqueue committed runs; a broker that is down is logged, not raised: the runs stay
    queued and an eval worker's sweep sends them (workers.tasks.redispatch_eval_runs)."""
    for run_id in run_ids:
        try:
            enqueue_eval_run(settings, run_id)
        except Exception:
            log.exception("could not enqueue eval run %s; the eval workers' sweep will", run_id)


def waiting_messages(settings: Settings, queue: str) -> int:
    """Messages waiting in `queue` on the broker (not those a worker holds)."""
    with celery_for(settings).connection_for_write() as conn:
        channel = conn.channel()
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except conn.channel_errors:  # no such queue (Redis drops empty ones): nothing waits
            return 0
        finally:
            channel.close()


def held_messages() -> int:
    """Messages this worker process holds: received and not finished, so in neither the
    broker's count nor (until the task claims its job) the database's `running`."""
    from celery.worker import state

    return len(state.reserved_requests)
