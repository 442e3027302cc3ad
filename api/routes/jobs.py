"""OpenAI fine-tuning jobs API: /v1/fine_tuning/jobs."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from api.db import unix
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import error_responses
from api.models.jobs import Job, JobCheckpoint, JobEvent
from api.models.tenants import Tenant
from api.services import jobs
from api.services.jobs import JobRequest
from api.services.pagination import list_body
from api.services.resolver import checkpoint_model_name

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=1000)]
NOT_FOUND = error_responses(404)


def job_public(job: Job) -> dict[str, Any]:
    hp = job.hyperparameters
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": unix(job.finished_at),
        "hyperparameters": {
            k: hp.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")
        },
        "model": job.model,
        "organization_id": job.tenant_id,
        "result_files": job.result_files,
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": unix(job.estimated_finish),
        "integrations": [],
        "metadata": job.job_metadata,
        "method": job.method,
        "user_provided_suffix": job.suffix,
        "attempts": job.attempts,
        "config": job.config,
    }


def event_public(event: JobEvent) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": unix(event.created_at),
        "level": event.level,
        "message": event.message,
        "type": event.type,
    }
    if event.data is not None:  # an object in the spec, never null: absent when empty
        body["data"] = event.data
    return body


def checkpoint_public(ckpt: JobCheckpoint, job: Job, tenant: Tenant) -> dict[str, Any]:
    """`fine_tuned_model_checkpoint` is a model name: chat with it as with any version."""
    return {
        "id": ckpt.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(ckpt.created_at),
        "fine_tuned_model_checkpoint": checkpoint_model_name(job, tenant, ckpt.step_number),
        "fine_tuning_job_id": job.id,
        "step_number": ckpt.step_number,
        "metrics": {"step": ckpt.step_number, **ckpt.metrics},
    }


@router.post("/jobs", responses=error_responses(429))
def create_job(
    req: JobRequest, tenant_id: TenantDep, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    from workers.celery_app import enqueue_training

    job = jobs.create_job(session, settings, tenant_id=tenant_id, req=req)
    try:
        enqueue_training(settings, job.id, queue=job.queue)
    except Exception:  # the broker is down: the job stays queued; workers sweep it up
        log.exception("could not enqueue %s; it stays queued for the start-up sweep", job.id)
        jobs.add_event(
            session,
            job.id,
            "Queue unavailable; the job will be picked up when a worker starts",
            level="warn",
        )
        session.commit()
    return job_public(job)


def _metadata_filter(request: Request) -> dict[str, str]:
    return {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.items()
        if k.startswith("metadata[") and k.endswith("]")
    }


@router.get("/jobs")
def list_jobs(
    request: Request,
    tenant_id: TenantDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
) -> dict[str, Any]:
    rows, has_more = jobs.list_jobs(
        session, tenant_id=tenant_id, after=after, limit=limit, metadata=_metadata_filter(request)
    )
    return list_body([job_public(j) for j in rows], has_more)


@router.get("/jobs/{fine_tuning_job_id}", responses=NOT_FOUND)
def retrieve_job(
    fine_tuning_job_id: str, tenant_id: TenantDep, session: SessionDep
) -> dict[str, Any]:
    return job_public(jobs.get_job(session, tenant_id=tenant_id, job_id=fine_tuning_job_id))


@router.post("/jobs/{fine_tuning_job_id}/cancel", responses=NOT_FOUND)
def cancel_job(
    fine_tuning_job_id: str, tenant_id: TenantDep, session: SessionDep
) -> dict[str, Any]:
    return job_public(jobs.cancel_job(session, tenant_id=tenant_id, job_id=fine_tuning_job_id))


@router.post("/jobs/{fine_tuning_job_id}/pause", responses=NOT_FOUND)
def pause_job(fine_tuning_job_id: str, tenant_id: TenantDep, session: SessionDep) -> dict[str, Any]:
    """Pause a queued or running job (`paused`): its worker checkpoints and is freed."""
    return job_public(jobs.pause_job(session, tenant_id=tenant_id, job_id=fine_tuning_job_id))


@router.post("/jobs/{fine_tuning_job_id}/resume", responses=NOT_FOUND)
def resume_job(
    fine_tuning_job_id: str, tenant_id: TenantDep, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    """Queue a paused job again; it continues from its last checkpoint."""
    from workers.celery_app import enqueue_training

    job = jobs.resume_job(session, tenant_id=tenant_id, job_id=fine_tuning_job_id)
    try:
        enqueue_training(settings, job.id, queue=job.queue)
    except Exception:  # the broker is down: queued, the workers' sweep sends it again
        log.exception("could not enqueue resumed %s; it stays queued for the sweep", job.id)
    return job_public(job)


@router.get("/jobs/{fine_tuning_job_id}/events", responses=NOT_FOUND)
def list_events(
    fine_tuning_job_id: str,
    tenant_id: TenantDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
) -> dict[str, Any]:
    rows, has_more = jobs.list_events(
        session, tenant_id=tenant_id, job_id=fine_tuning_job_id, after=after, limit=limit
    )
    return list_body([event_public(e) for e in rows], has_more)


@router.get("/jobs/{fine_tuning_job_id}/checkpoints", responses=NOT_FOUND)
def list_checkpoints(
    fine_tuning_job_id: str,
    tenant_id: TenantDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 10,
) -> dict[str, Any]:
    job = jobs.get_job(session, tenant_id=tenant_id, job_id=fine_tuning_job_id)
    rows, has_more = jobs.list_checkpoints(
        session, tenant_id=tenant_id, job_id=fine_tuning_job_id, after=after, limit=limit
    )
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    return list_body([checkpoint_public(c, job, tenant) for c in rows], has_more)
