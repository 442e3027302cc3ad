"""Admin web API for evidence-based promotion: an adapter's policy (what production
requires of an eval, when a canary is aborted on its own), the guard's current figures, and
shadow traffic to a candidate version (api.services.shadow)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.deps import AdminDep, SessionDep
from api.errors import error_responses
from api.models.adapters import MAX_VERSION, Adapter
from api.routes.admin_registry import AdapterId
from api.services import eval_policy, promotion, shadow
from api.services.eval_policy import Policy

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def policy_public(adapter: Adapter) -> dict[str, Any]:
    return {"object": "adapter.policy", "adapter_id": adapter.id, "adapter": adapter.name,
            "tenant_id": adapter.tenant_id, **(adapter.policy or {})}  # fmt: skip


def _adapter(session: SessionDep, adapter_id: str) -> Adapter:
    """A read: no row lock (AdapterId has already answered 404 for an unknown one)."""
    adapter = session.get(Adapter, adapter_id)
    assert adapter is not None
    return adapter


@router.get("/adapters/{adapter_id}/policy")
def get_policy(adapter_id: AdapterId, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    return policy_public(_adapter(session, adapter_id))


@router.put("/adapters/{adapter_id}/policy", responses=error_responses(404))
def set_policy(
    adapter_id: AdapterId, body: Policy, admin: AdminDep, session: SessionDep
) -> dict[str, Any]:
    """Replace the policy: `promotion` {eval_id, min_margin, min_score} gates production on
    the eval's latest completed runs; `canary_guard` aborts a running canary past its
    thresholds (error rate, latency p95, eval score). Audited as `policy.set`."""
    adapter = promotion.lock_adapter(session, adapter_id)
    return policy_public(eval_policy.set_policy(session, actor=admin, adapter=adapter,
                                                policy=body))  # fmt: skip


@router.get("/adapters/{adapter_id}/canary/guard")
def canary_guard(adapter_id: AdapterId, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    """The figures the guard compares now, and what it would decide."""
    adapter = _adapter(session, adapter_id)
    why, figures = (
        eval_policy.guard_verdict(session, adapter) if adapter.canary_version_id else (None, {})
    )
    return {"object": "adapter.canary_guard", "adapter_id": adapter.id,
            "guarded": bool((adapter.policy or {}).get("canary_guard")),
            "canary_running": adapter.canary_version_id is not None,
            "would_abort": why, **figures}  # fmt: skip


class Shadow(BaseModel):
    version: int = Field(ge=1, le=MAX_VERSION)
    percent: int = Field(ge=1, le=100, description="Share of by-name production traffic.")


ShadowLimit = Annotated[int, Query(ge=0, le=100)]


@router.get("/adapters/{adapter_id}/shadow")
def get_shadow(
    adapter_id: AdapterId, _: AdminDep, session: SessionDep, limit: ShadowLimit = 20
) -> dict[str, Any]:
    """The shadow version and share, its pairs' summary, and the newest `limit` pairs."""
    adapter = _adapter(session, adapter_id)
    body = shadow.shadow_state(session, adapter)
    version_id = adapter.shadow_version_id
    rows = shadow.samples(session, version_id=version_id, limit=limit) if version_id else []
    return {**body, "data": [shadow.sample_public(r) for r in rows]}


@router.post("/adapters/{adapter_id}/shadow", responses=error_responses(404, 409))
def set_shadow(
    adapter_id: AdapterId, body: Shadow, admin: AdminDep, session: SessionDep
) -> dict[str, Any]:
    """Mirror `percent`% of by-name production traffic to a candidate or staging version;
    users still get production's answers only. Audited as `shadow.set`."""
    adapter = promotion.lock_adapter(session, adapter_id)
    version = promotion.get_version(session, adapter, body.version)
    shadow.set_shadow(session, actor=admin, adapter=adapter, version=version, percent=body.percent)
    return shadow.shadow_state(session, adapter)


@router.delete("/adapters/{adapter_id}/shadow", responses=error_responses(409))
def stop_shadow(adapter_id: AdapterId, admin: AdminDep, session: SessionDep) -> dict[str, Any]:
    """Stop mirroring (the pairs kept stay readable on the version). Audited."""
    adapter = promotion.lock_adapter(session, adapter_id)
    return shadow.shadow_state(session, shadow.stop_shadow(session, actor=admin, adapter=adapter))
