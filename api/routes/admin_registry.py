"""Admin web API for the registry: promote, canary, roll back, delete; audit log; usage."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from pydantic import BaseModel, Field
from sqlmodel import col, select

from api.db import unix
from api.deps import AdminDep, SessionDep, SettingsDep, StoreDep
from api.errors import error_responses
from api.models.adapters import MAX_VERSION, Adapter
from api.models.audit import AuditEntry
from api.routes.adapters import VersionNumber, adapter_public, versions_of
from api.services import audit, promotion
from api.services.adapter_refs import find_adapter_id
from api.services.pagination import list_body
from api.services.usage import usage_summary

router = APIRouter(prefix="/v1/admin", tags=["admin"])
# The adapter's stages or canary do not allow the move, or another admin moved it first.
STATE = error_responses(409)
Limit = Annotated[int, Query(ge=1, le=1000)]


class Promote(BaseModel):
    stage: Literal["candidate", "staging", "production", "archived"]
    force: bool = Field(
        False,
        description="Allow a move outside the normal flow or past the "
        "promotion gate; audited as forced.",
    )
    reason: str | None = Field(None, max_length=2000)


class Canary(BaseModel):
    version: int = Field(ge=1, le=MAX_VERSION)
    percent: int = Field(ge=1, le=100, description="Share of by-name traffic, e.g. 5, 25, 50.")
    reason: str | None = Field(None, max_length=2000)


class Reason(BaseModel):
    reason: str | None = Field(None, max_length=2000)


# Every field is optional, so the body may be too: `curl -X POST .../rollback` works.
OptionalReason = Annotated[Reason, Body(default_factory=Reason)]


def adapter_id_of(
    adapter_id: Annotated[
        str,
        Path(
            description="The adapter's id (`GET /v1/admin/adapters` lists them), or "
            "`TENANT:NAME`: the tenant's name or id and the adapter's name, "
            "e.g. `support-team:support-bot`."
        ),
    ],
    _: AdminDep,  # first: to a tenant key, an admin route is an unknown URL
    session: SessionDep,
) -> str:
    return find_adapter_id(session, adapter_id)


AdapterId = Annotated[str, Depends(adapter_id_of)]


def _adapter_body(session: Any, adapter_id: str) -> dict[str, Any]:
    adapter = session.get(Adapter, adapter_id)
    return adapter_public(adapter, versions_of(session, adapter))


@router.get("/adapters")
def list_all_adapters(
    _: AdminDep, session: SessionDep, tenant_id: str | None = None
) -> dict[str, Any]:
    query = select(Adapter).order_by(col(Adapter.tenant_id), col(Adapter.name))
    if tenant_id is not None:
        query = query.where(Adapter.tenant_id == tenant_id)
    data = [adapter_public(a, versions_of(session, a), samples=False) for a in session.exec(query)]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/adapters/{adapter_id}")
def get_adapter(adapter_id: AdapterId, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    promotion.lock_adapter(session, adapter_id)  # 404 if unknown
    return _adapter_body(session, adapter_id)


@router.post("/adapters/{adapter_id}/versions/{number}/promote", responses=STATE)
def promote_version(
    adapter_id: AdapterId,
    number: VersionNumber,
    body: Promote,
    admin: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    request: Request,
) -> dict[str, Any]:
    if body.stage == "production":
        promotion.probe_as_served(
            session, gateway=getattr(request.app.state, "gateway", None),
            adapter_id=adapter_id, number=number,
        )  # fmt: skip
    promotion.promote(
        session,
        actor=admin,
        adapter_id=adapter_id,
        number=number,
        stage=body.stage,
        force=body.force,
        gate=settings.promotion_gate,
        reason=body.reason,
    )
    return _adapter_body(session, adapter_id)


@router.post("/adapters/{adapter_id}/rollback", responses=STATE)
def rollback(
    adapter_id: AdapterId, body: OptionalReason, admin: AdminDep, session: SessionDep
) -> dict[str, Any]:
    promotion.rollback(session, actor=admin, adapter_id=adapter_id, reason=body.reason)
    return _adapter_body(session, adapter_id)


@router.post("/adapters/{adapter_id}/canary", responses=STATE)
def set_canary(
    adapter_id: AdapterId, body: Canary, admin: AdminDep, session: SessionDep
) -> dict[str, Any]:
    promotion.set_canary(
        session,
        actor=admin,
        adapter_id=adapter_id,
        number=body.version,
        percent=body.percent,
        reason=body.reason,
    )
    return _adapter_body(session, adapter_id)


@router.post("/adapters/{adapter_id}/canary/promote", responses=STATE)
def promote_canary(
    adapter_id: AdapterId, body: OptionalReason, admin: AdminDep, session: SessionDep
) -> dict[str, Any]:
    promotion.finish_canary(
        session, actor=admin, adapter_id=adapter_id, promote=True, reason=body.reason
    )
    return _adapter_body(session, adapter_id)


@router.post("/adapters/{adapter_id}/canary/abort", responses=STATE)
def abort_canary(
    adapter_id: AdapterId, body: OptionalReason, admin: AdminDep, session: SessionDep
) -> dict[str, Any]:
    promotion.finish_canary(
        session, actor=admin, adapter_id=adapter_id, promote=False, reason=body.reason
    )
    return _adapter_body(session, adapter_id)


@router.post("/adapters/{adapter_id}/versions/{number}/verify")
def verify(
    adapter_id: AdapterId,
    number: VersionNumber,
    admin: AdminDep,
    session: SessionDep,
    store: StoreDep,
) -> dict[str, Any]:
    """Re-hash the stored files; a mismatch rejects the version for good."""
    adapter = promotion.lock_adapter(session, adapter_id)
    version = promotion.get_version(session, adapter, number)
    problems = promotion.verify_version(store, version)
    if problems:
        promotion.reject(session, actor=admin, version=version, problems=problems)
    return {
        "object": "adapter.verification",
        "ok": not problems,
        "problems": problems,
        "stage": version.stage,
    }


@router.delete("/adapters/{adapter_id}/versions/{number}", responses=STATE)
def delete_version(
    adapter_id: AdapterId,
    number: VersionNumber,
    admin: AdminDep,
    session: SessionDep,
    store: StoreDep,
) -> dict[str, Any]:
    promotion.delete_version(session, store, actor=admin, adapter_id=adapter_id, number=number)
    return {
        "object": "adapter.version",
        "adapter_id": adapter_id,
        "version": number,
        "deleted": True,
    }


def entry_public(e: AuditEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "object": "audit.entry",
        "created_at": unix(e.created_at),
        "actor_key_id": e.actor_key_id,
        "action": e.action,
        "target_type": e.target_type,
        "target_id": e.target_id,
        "tenant_id": e.tenant_id,
        "before": e.before,
        "after": e.after,
        "forced": e.forced,
        "reason": e.reason,
    }


@router.get("/audit")
def list_audit(
    _: AdminDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 50,
    action: str | None = None,
    tenant_id: str | None = None,
    target_id: str | None = None,
    actor_key_id: str | None = None,
) -> dict[str, Any]:
    rows, has_more = audit.list_entries(
        session,
        after=after,
        limit=limit,
        action=action,
        tenant_id=tenant_id,
        target_id=target_id,
        actor_key_id=actor_key_id,
    )
    return list_body([entry_public(e) for e in rows], has_more)


@router.get("/usage")
def usage(_: AdminDep, session: SessionDep, tenant_id: str | None = None) -> dict[str, Any]:
    """Requests and tokens per tenant and adapter version, from the serving gateway; the
    503s answered while no engine replica was ready are counted apart, as `unavailable`.
    `latency_ms`: p50/p95/p99 of the requests served in the last day (null if none)."""
    return {
        "object": "list",
        "data": usage_summary(session, tenant_id=tenant_id),
        "has_more": False,
    }
