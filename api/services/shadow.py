"""Shadow traffic: a share of an adapter's by-name production requests, sent again to a
candidate version. Users get production's answer only; the pair is kept and scored.

    admin: shadow {version, percent} -> the gateway mirrors that share (after production
        answered, never delaying it; at most a few mirrors in flight per gateway)
    each pair -> a ShadowSample: both answers, the adapter's local criteria applied with
        production's answer as the reference (agreement with production), the latency

The criteria are those of the adapter's attached eval (string_check / text_similarity, with
`{{item.ideal}}` = production's answer, `{{sample.output_text}}` = the candidate's), else a
fuzzy match >= 0.8. Agreement is not correctness: it says how much of production's
behaviour the candidate keeps on real traffic; read it beside the eval scores.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, delete, func, select

from api.db import unix, utcnow
from api.errors import Conflict, InvalidRequest
from api.models.adapters import Adapter, AdapterVersion
from api.models.evals import ShadowSample
from api.services import audit, graders
from api.services.eval_policy import VALIDATION_CRITERIA, attached_evals

CANDIDATE_STAGES = ("candidate", "staging")
MAX_SAMPLES_PER_VERSION = 1000  # the newest are kept: enough for any rate, bounded
MAX_STORED_REQUEST = 64 * 1024  # characters of a request's prompt kept with its pair
LOCAL = ("string_check", "text_similarity")


def set_shadow(
    session: Session, *, actor: Any, adapter: Adapter, version: AdapterVersion, percent: int
) -> Adapter:
    """Mirror `percent`% of by-name production traffic to `version` (audited)."""
    if not 0 < percent <= 100:
        raise InvalidRequest("percent must be 1-100", param="percent")
    if version.stage not in CANDIDATE_STAGES:
        raise Conflict(f"Version {version.version} is {version.stage}; shadow traffic goes to a "
                       "candidate or staging version.", code="invalid_transition")  # fmt: skip
    before = {"shadow_version_id": adapter.shadow_version_id, "percent": adapter.shadow_percent}
    adapter.shadow_version_id, adapter.shadow_percent = version.id, percent
    session.add(adapter)
    audit.record(session, actor=actor, action="shadow.set", target_type="adapter",
                 target_id=adapter.id, tenant_id=adapter.tenant_id, before=before,
                 after={"shadow_version": version.version, "percent": percent})  # fmt: skip
    session.commit()
    return adapter


def stop_shadow(session: Session, *, actor: Any, adapter: Adapter) -> Adapter:
    if adapter.shadow_version_id is None:
        raise Conflict(f"{adapter.name!r} has no shadow traffic.", code="no_shadow")
    before = {"shadow_version_id": adapter.shadow_version_id, "percent": adapter.shadow_percent}
    adapter.shadow_version_id, adapter.shadow_percent = None, 0
    session.add(adapter)
    audit.record(session, actor=actor, action="shadow.stop", target_type="adapter",
                 target_id=adapter.id, tenant_id=adapter.tenant_id, before=before)  # fmt: skip
    session.commit()
    return adapter


def criteria_for(session: Session, adapter: Adapter) -> list[dict[str, Any]]:
    """The local criteria of the adapter's attached eval (oldest first), else fuzzy match."""
    attached = next(iter(attached_evals(session, adapter)), None)
    local = [c for c in (attached.testing_criteria if attached else []) if c["type"] in LOCAL]
    return local or VALIDATION_CRITERIA


def stored_request(body: dict[str, Any]) -> dict[str, Any]:
    """What is kept of the mirrored request: its messages or prompt, bounded."""
    kept: dict[str, Any] = {k: body[k] for k in ("messages", "prompt") if k in body}
    if len(json.dumps(kept)) > MAX_STORED_REQUEST:
        return {"truncated": True}
    return kept


def record(
    session: Session,
    *,
    adapter_id: str,
    version_id: str,
    production_version_id: str,
    request: dict[str, Any],
    production_output: str,
    shadow_output: str | None,
    latency_ms: float | None,
    error: str | None,
) -> ShadowSample | None:
    """Score and keep one pair; prune the version's oldest beyond the bound."""
    adapter = session.get(Adapter, adapter_id)
    if adapter is None:
        return None
    sample = ShadowSample(tenant_id=adapter.tenant_id, adapter_id=adapter_id,
                          version_id=version_id, production_version_id=production_version_id,
                          request=stored_request(request), production_output=production_output,
                          shadow_output=shadow_output, shadow_latency_ms=latency_ms,
                          shadow_error=error)  # fmt: skip
    if shadow_output is not None:
        ctx = {"item": {**sample.request, "ideal": production_output},
               "sample": {"output_text": shadow_output}}  # fmt: skip
        results = [graders.grade_local(c, ctx) for c in criteria_for(session, adapter)]
        sample.results = [r.public() for r in results]
        sample.passed = graders.item_passed(results)
    session.add(sample)
    session.flush()
    _prune(session, version_id)
    session.commit()
    return sample


def _prune(session: Session, version_id: str) -> None:
    keep = select(ShadowSample.id).where(ShadowSample.version_id == version_id)
    newest = keep.order_by(col(ShadowSample.created_at).desc()).limit(MAX_SAMPLES_PER_VERSION)
    count = session.exec(
        select(func.count()).select_from(ShadowSample).where(ShadowSample.version_id == version_id)
    ).one()
    if count > MAX_SAMPLES_PER_VERSION:
        session.exec(
            delete(ShadowSample).where(  # type: ignore[call-overload]
                col(ShadowSample.version_id) == version_id,
                col(ShadowSample.id).not_in(list(session.exec(newest))),
            )
        )


def summary(session: Session, *, version_id: str, since: Any = None) -> dict[str, Any]:
    """Pairs kept for a version (since `since`): how many, agreement (errored mirrors count
    as disagreeing), errors, latency."""
    query = select(ShadowSample).where(ShadowSample.version_id == version_id)
    if since is not None:
        query = query.where(ShadowSample.created_at >= since)
    rows = list(session.exec(query))
    agreed = sum(1 for r in rows if r.passed)
    latencies = sorted(r.shadow_latency_ms for r in rows if r.shadow_latency_ms is not None)
    return {
        "samples": len(rows),
        "agreed": agreed,
        # A mirror the candidate failed to answer counts as disagreeing: it is a finding.
        "agreement": agreed / len(rows) if rows else None,
        "errors": sum(1 for r in rows if r.shadow_error),
        "latency_p50_ms": latencies[len(latencies) // 2] if latencies else None,
    }


def samples(session: Session, *, version_id: str, limit: int) -> list[ShadowSample]:
    return list(
        session.exec(
            select(ShadowSample)
            .where(ShadowSample.version_id == version_id)
            .order_by(col(ShadowSample.created_at).desc())
            .limit(limit)
        )
    )


def sample_public(row: ShadowSample) -> dict[str, Any]:
    return {
        "object": "shadow.sample",
        "id": row.id,
        "created_at": unix(row.created_at),
        "request": row.request,
        "production_output": row.production_output,
        "shadow_output": row.shadow_output,
        "passed": row.passed,
        "results": row.results,
        "shadow_latency_ms": row.shadow_latency_ms,
        "shadow_error": row.shadow_error,
    }


def shadow_state(session: Session, adapter: Adapter) -> dict[str, Any]:
    version = session.get(AdapterVersion, adapter.shadow_version_id or "")
    return {"object": "adapter.shadow", "adapter_id": adapter.id, "adapter": adapter.name,
            "version": version.version if version else None,
            "percent": adapter.shadow_percent if version else 0,
            "summary": summary(session, version_id=version.id) if version else None,
            "checked_at": int(utcnow().timestamp())}  # fmt: skip
