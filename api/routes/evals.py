"""OpenAI Evals API: /v1/evals, their runs and output items (`client.evals`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from api.db import unix
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import error_responses
from api.models.evals import Eval, EvalOutputItem, EvalRun
from api.routes.adapters import VersionNumber, get_adapter
from api.services import eval_policy, eval_runs, evals, promotion, shadow
from api.services.eval_runs import RunCreate
from api.services.evals import EvalCreate, EvalUpdate
from api.services.pagination import Order, list_body

router = APIRouter(prefix="/v1/evals", tags=["evals"])
Limit = Annotated[int, Query(ge=1, le=100)]
NOT_FOUND = error_responses(404)
RunStatus = Literal["queued", "in_progress", "completed", "canceled", "failed"]


def eval_public(ev: Eval) -> dict[str, Any]:
    return {
        "object": "eval",
        "id": ev.id,
        "name": ev.name,
        "created_at": unix(ev.created_at),
        "data_source_config": ev.data_source_config,
        "testing_criteria": ev.testing_criteria,
        "metadata": ev.eval_metadata,
        "adapter": ev.adapter_name,  # Loraplex: the adapter whose versions it grades
    }


def run_public(run: EvalRun) -> dict[str, Any]:
    return {
        "object": "eval.run",
        "id": run.id,
        "eval_id": run.eval_id,
        "name": run.name,
        "model": run.model,
        "status": run.status,
        "created_at": unix(run.created_at),
        "data_source": run.data_source,
        "error": run.error,
        "metadata": run.run_metadata,
        "report_url": f"/v1/evals/{run.eval_id}/runs/{run.id}/output_items",
        "result_counts": run.result_counts,
        "per_model_usage": run.usage,
        "per_testing_criteria_results": run.per_criteria,
        "score": eval_runs.score(run),  # Loraplex: passed / total
        "adapter_version_id": run.adapter_version_id,
    }


def output_item_public(row: EvalOutputItem) -> dict[str, Any]:
    return {
        "object": "eval.run.output_item",
        "id": row.id,
        "run_id": row.run_id,
        "eval_id": row.eval_id,
        "created_at": unix(row.created_at),
        "status": row.status,
        "datasource_item_id": row.datasource_item_id,
        "datasource_item": row.datasource_item,
        "results": row.results,
        "sample": row.sample,
    }


@router.post("")
def create_eval(req: EvalCreate, tenant_id: TenantDep, session: SessionDep) -> dict[str, Any]:
    return eval_public(evals.create_eval(session, tenant_id=tenant_id, req=req))


@router.get("")
def list_evals(
    tenant_id: TenantDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    order_by: Literal["created_at", "updated_at"] = "created_at",
) -> dict[str, Any]:
    """`order_by=updated_at` orders by creation too: an eval's criteria never change."""
    rows, more = evals.list_evals(
        session, tenant_id=tenant_id, after=after, limit=limit, order=order
    )
    return list_body([eval_public(e) for e in rows], more)


@router.get("/{eval_id}", responses=NOT_FOUND)
def retrieve_eval(eval_id: str, tenant_id: TenantDep, session: SessionDep) -> dict[str, Any]:
    return eval_public(evals.get_eval(session, tenant_id=tenant_id, eval_id=eval_id))


@router.post("/{eval_id}", responses=NOT_FOUND)
def update_eval(
    eval_id: str, req: EvalUpdate, tenant_id: TenantDep, session: SessionDep
) -> dict[str, Any]:
    return eval_public(evals.update_eval(session, tenant_id=tenant_id, eval_id=eval_id, req=req))


@router.delete("/{eval_id}", responses=NOT_FOUND)
def delete_eval(eval_id: str, tenant_id: TenantDep, session: SessionDep) -> dict[str, Any]:
    evals.delete_eval(session, tenant_id=tenant_id, eval_id=eval_id)
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


@router.post("/{eval_id}/runs", responses={**NOT_FOUND, **error_responses(409)})
def create_run(
    eval_id: str,
    req: RunCreate,
    tenant_id: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    run = eval_runs.create_run(session, settings, tenant_id=tenant_id, eval_id=eval_id, req=req)
    from workers.celery_app import send_eval_runs

    send_eval_runs(settings, [run.id])
    return run_public(run)


@router.get("/{eval_id}/runs", responses=NOT_FOUND)
def list_runs(
    eval_id: str,
    tenant_id: TenantDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    status: RunStatus | None = None,
) -> dict[str, Any]:
    rows, more = eval_runs.list_runs(
        session,
        tenant_id=tenant_id,
        eval_id=eval_id,
        after=after,
        limit=limit,
        order=order,
        status=status,
    )
    return list_body([run_public(r) for r in rows], more)


@router.get("/{eval_id}/runs/{run_id}", responses=NOT_FOUND)
def retrieve_run(
    eval_id: str, run_id: str, tenant_id: TenantDep, session: SessionDep
) -> dict[str, Any]:
    return run_public(
        eval_runs.get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    )


@router.post("/{eval_id}/runs/{run_id}", responses={**NOT_FOUND, **error_responses(409)})
@router.post("/{eval_id}/runs/{run_id}/cancel", responses={**NOT_FOUND, **error_responses(409)})
def cancel_run(
    eval_id: str, run_id: str, tenant_id: TenantDep, session: SessionDep
) -> dict[str, Any]:
    """Cancel a queued or running run (OpenAI: POST on the run; `/cancel` also works)."""
    return run_public(
        eval_runs.cancel_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    )


@router.delete("/{eval_id}/runs/{run_id}", responses=NOT_FOUND)
def delete_run(
    eval_id: str, run_id: str, tenant_id: TenantDep, session: SessionDep
) -> dict[str, Any]:
    eval_runs.delete_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


@router.get("/{eval_id}/runs/{run_id}/output_items", responses=NOT_FOUND)
def list_output_items(
    eval_id: str,
    run_id: str,
    tenant_id: TenantDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    status: Literal["pass", "fail", "error"] | None = None,
) -> dict[str, Any]:
    rows, more = eval_runs.list_output_items(
        session,
        tenant_id=tenant_id,
        eval_id=eval_id,
        run_id=run_id,
        after=after,
        limit=limit,
        order=order,
        status=status,
    )
    return list_body([output_item_public(r) for r in rows], more)


@router.get("/{eval_id}/runs/{run_id}/output_items/{output_item_id}", responses=NOT_FOUND)
def retrieve_output_item(
    eval_id: str, run_id: str, output_item_id: str, tenant_id: TenantDep, session: SessionDep
) -> dict[str, Any]:
    row = eval_runs.get_output_item(
        session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id, item_id=output_item_id
    )
    return output_item_public(row)


adapter_router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@adapter_router.get("/{name}/versions/{number}/evals", responses=NOT_FOUND)
def version_evals(
    name: str, number: VersionNumber, tenant_id: TenantDep, session: SessionDep
) -> dict[str, Any]:
    """A/B: on each eval attached to the adapter or run on this version, its latest score
    beside production's and the base's, and the items it newly fails and newly passes."""
    adapter = get_adapter(session, tenant_id=tenant_id, name=name)
    version = promotion.get_version(session, adapter, number)
    data = [
        eval_policy.compare(session, ev=ev, version=version)
        for ev in eval_policy.evals_of(session, adapter=adapter, version=version)
    ]
    return {"object": "list", "data": data, "has_more": False}


@adapter_router.get("/{name}/versions/{number}/shadow", responses=NOT_FOUND)
def version_shadow(
    name: str,
    number: VersionNumber,
    tenant_id: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=0, le=100)] = 20,
) -> dict[str, Any]:
    """Shadow traffic mirrored to this version: the pairs' summary (agreement with
    production's answers, errors, latency) and the newest `limit` pairs."""
    adapter = get_adapter(session, tenant_id=tenant_id, name=name)
    version = promotion.get_version(session, adapter, number)
    rows = shadow.samples(session, version_id=version.id, limit=limit)
    pairs = shadow.summary(session, version_id=version.id)
    return {"object": "list", "version": number, "summary": pairs,
            "data": [shadow.sample_public(r) for r in rows], "has_more": False}  # fmt: skip
