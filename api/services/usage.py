"""Serving usage: record each request, aggregate per tenant and adapter version.

A 503 (no engine replica ready yet: a first start, a restart) served nothing: it is counted
apart, as `unavailable`, never among `requests`. A client that hung up (499) is a request,
charged for what the engine did before it stopped."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlmodel import Session, col

from api.db import utcnow
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
# Latency percentiles are computed in Python from the rows, so they read a bounded slice:
# the last day (what an operator watches), at most this many of its newest requests.
LATENCY_WINDOW = timedelta(hours=24)
LATENCY_MAX_ROWS = 100_000
PERCENTILES = (50, 95, 99)
GroupKey = tuple[str, str, str | None]


def usage_summary(
    session: Session, *, tenant_id: str | None = None, since: datetime | None = None
) -> list[dict[str, Any]]:
    """Requests and tokens per tenant and (model, adapter version); 503s apart; each
    group's latency percentiles over the last `LATENCY_WINDOW` (null if none there)."""
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
    latencies = latency_percentiles(session, tenant_id=tenant_id, since=since)
    return [
        {
            "tenant_id": t,
            "model": m,
            "adapter_version_id": v,
            "requests": int(n or 0),
            "unavailable": int(u or 0),
            "prompt_tokens": int(p or 0),
            "completion_tokens": int(c or 0),
            "latency_ms": latencies.get((t, m, v)),
        }
        for t, m, v, n, u, p, c in session.execute(query)
    ]


def latency_percentiles(
    session: Session, *, tenant_id: str | None = None, since: datetime | None = None
) -> dict[GroupKey, dict[str, float]]:
    """p50/p95/p99 latency (ms) of served requests per (tenant, model, adapter version),
    over the last `LATENCY_WINDOW` (or since `since`, if later), newest rows first."""
    start = utcnow() - LATENCY_WINDOW
    if since is not None and since.replace(tzinfo=start.tzinfo) > start:
        start = since
    query = (
        select(
            col(UsageRecord.tenant_id),
            col(UsageRecord.model),
            col(UsageRecord.adapter_version_id),
            col(UsageRecord.latency_ms),
        )
        .where(col(UsageRecord.created_at) >= start)
        .where(col(UsageRecord.status_code) != UNAVAILABLE)
        .order_by(col(UsageRecord.created_at).desc())
        .limit(LATENCY_MAX_ROWS)
    )
    if tenant_id is not None:
        query = query.where(col(UsageRecord.tenant_id) == tenant_id)
    groups: dict[GroupKey, list[float]] = defaultdict(list)
    for t, m, v, latency in session.execute(query):
        groups[(t, m, v)].append(float(latency))
    window = LATENCY_WINDOW.total_seconds()
    return {
        key: {
            **{f"p{q}": _nearest_rank(sorted(values), q) for q in PERCENTILES},
            "samples": len(values),
            "window_seconds": window,
        }
        for key, values in groups.items()
    }


def _nearest_rank(ordered: list[float], q: int) -> float:
    """The q-th percentile by nearest rank: a latency some request really had."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
