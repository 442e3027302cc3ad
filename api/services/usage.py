"""Serving usage: record each request, aggregate per tenant and adapter version.

A 503 (no engine replica ready yet: a first start, a restart) served nothing: it is counted
apart, as `unavailable`, never among `requests`. A client that hung up (499) is a request,
charged for what the engine did before it stopped."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlmodel import Session, col

from api.models.usage import UsageRecord


def record_usage(
    session: Session,
    *,
    tenant_id: str,
    model: str,
    base_model: str,
    adapter_version_id: str | None,
    endpoint: str,
    prompt_tokens: int,
    completion_tokens: int,
    latency_ms: float,
    status_code: int = 200,
) -> None:
    session.add(
        UsageRecord(
            tenant_id=tenant_id,
            model=model,
            base_model=base_model,
            adapter_version_id=adapter_version_id,
            endpoint=endpoint,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=latency_ms,
            status_code=status_code,
        )
    )
    session.commit()


UNAVAILABLE = 503  # the gateway's answer while no engine replica is ready


def usage_summary(
    session: Session, *, tenant_id: str | None = None, since: datetime | None = None
) -> list[dict[str, Any]]:
    """Requests and tokens per tenant and (model, adapter version); 503s apart."""
    refused = col(UsageRecord.status_code) == UNAVAILABLE
    query = select(
        col(UsageRecord.tenant_id),
        col(UsageRecord.model),
        col(UsageRecord.adapter_version_id),
        func.sum(case((refused, 0), else_=1)),
        func.sum(case((refused, 1), else_=0)),
        func.sum(UsageRecord.prompt_tokens),
        func.sum(UsageRecord.completion_tokens),
    ).group_by(
        col(UsageRecord.tenant_id), col(UsageRecord.model), col(UsageRecord.adapter_version_id)
    )
    if tenant_id is not None:
        query = query.where(col(UsageRecord.tenant_id) == tenant_id)
    if since is not None:
        query = query.where(col(UsageRecord.created_at) >= since)
    return [
        {
            "tenant_id": t,
            "model": m,
            "adapter_version_id": v,
            "requests": int(n or 0),
            "unavailable": int(u or 0),
            "prompt_tokens": int(p or 0),
            "completion_tokens": int(c or 0),
        }
        for t, m, v, n, u, p, c in session.execute(query)
    ]
