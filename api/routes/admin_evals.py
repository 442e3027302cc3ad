"""Admin web API for evidence-based promotion: an adapter's policy (what production
requires of an eval, when a canary is aborted on its own) and the guard's current figures."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import AdminDep, SessionDep
from api.errors import error_responses
from api.models.adapters import Adapter
from api.routes.admin_registry import AdapterId
from api.services import eval_policy, promotion
from api.services.eval_policy import Policy

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def policy_public(adapter: Adapter) -> dict[str, Any]:
    return {"object": "adapter.policy", "adapter_id": adapter.id, "adapter": adapter.name,
            "tenant_id": adapter.tenant_id, **(adapter.policy or {})}  # fmt: skip


@router.get("/adapters/{adapter_id}/policy")
def get_policy(adapter_id: AdapterId, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    return policy_public(promotion.lock_adapter(session, adapter_id))


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
    adapter = promotion.lock_adapter(session, adapter_id)
    why, figures = (
        eval_policy.guard_verdict(session, adapter) if adapter.canary_version_id else (None, {})
    )
    session.rollback()  # release the row lock: nothing was changed
    return {"object": "adapter.canary_guard", "adapter_id": adapter.id,
            "guarded": bool((adapter.policy or {}).get("canary_guard")),
            "canary_running": adapter.canary_version_id is not None,
            "would_abort": why, **figures}  # fmt: skip
