"""Per-tenant rate limits and quotas: what each tenant may use, and the fine-tuning checks.

    Settings (tenant_* defaults) + Tenant.limits (an admin's overrides) --effective_limits-->
    Limits: requests_per_minute, tokens_per_minute        (serving; serving/ratelimit.py)
            jobs_per_day, training_tokens_per_month        (check_job_quota, at job creation)
            max_queued_jobs, max_running_jobs, storage_quota_bytes   (read by their owners)

Every limit is an integer and 0 means unlimited. Over a limit the caller gets `RateLimited`
(429, OpenAI's shape) with `Retry-After` and the `x-ratelimit-*` headers the openai SDK reads;
`x-should-retry: false` when the wait is longer than the SDK would sleep (a daily quota).

Jobs per day is a sliding 24-hour window over the tenant's created jobs; training tokens per
month is the calendar month (UTC), counting a finished job's `trained_tokens` and an
unfinished one's plan (its training file's estimated tokens x epochs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, func, select

from api.db import aware, utcnow
from api.errors import RateLimited
from api.models.files import File
from api.models.jobs import ACTIVE, PAUSED, Job
from api.models.tenants import Tenant
from api.services.tenants import get_tenant
from api.settings import Settings

# The SDK honours a Retry-After up to a minute; past that retrying now only fails again.
SDK_MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True)
class Limits:
    """One tenant's limits, all integers, 0: unlimited."""

    requests_per_minute: int
    tokens_per_minute: int  # prompt + completion, on chat/completions and completions
    jobs_per_day: int  # fine-tuning jobs created in any 24 hours
    training_tokens_per_month: int  # per calendar month (UTC)
    max_queued_jobs: int
    max_running_jobs: int
    storage_quota_bytes: int  # files and artifacts


LIMIT_NAMES = tuple(f.name for f in fields(Limits))


def default_limits(settings: Settings) -> Limits:
    return Limits(
        requests_per_minute=settings.tenant_requests_per_minute,
        tokens_per_minute=settings.tenant_tokens_per_minute,
        jobs_per_day=settings.tenant_jobs_per_day,
        training_tokens_per_month=settings.tenant_training_tokens_per_month,
        max_queued_jobs=settings.max_queued_jobs_per_tenant,
        max_running_jobs=settings.max_running_jobs_per_tenant,
        storage_quota_bytes=settings.tenant_storage_quota_bytes,
    )


def effective_limits(settings: Settings, tenant: Tenant | None) -> Limits:
    """The settings' defaults with the tenant's overrides on top (unknown names ignored)."""
    overrides = (tenant.limits if tenant is not None else None) or {}
    return replace(
        default_limits(settings),
        **{name: int(v) for name, v in overrides.items() if name in LIMIT_NAMES},
    )


def load_limits(session: Session, settings: Settings, *, tenant_id: str) -> Limits:
    return effective_limits(settings, session.get(Tenant, tenant_id))


def set_overrides(session: Session, *, tenant_id: str, changes: dict[str, int | None]) -> Tenant:
    """Apply an admin's changes: a number overrides the default, None restores it."""
    tenant = get_tenant(session, tenant_id=tenant_id)
    overrides = dict(tenant.limits or {})
    for name, value in changes.items():
        if name not in LIMIT_NAMES:
            continue
        if value is None:
            overrides.pop(name, None)
        else:
            overrides[name] = int(value)
    tenant.limits = overrides or None  # a new dict: SQLAlchemy sees the JSON change
    session.add(tenant)
    return tenant


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes x-ratelimit-reset-*: `20ms`, `1.5s`, `6m0s`, `23h59m0s`."""
    if seconds < 1:
        return f"{math.ceil(max(seconds, 0) * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    hours, rest = divmod(math.ceil(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def window_headers(kind: str, *, limit: int, remaining: float, reset: float) -> dict[str, str]:
    """The three x-ratelimit-* headers of one window (`kind`: requests or tokens)."""
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(remaining))),
        f"x-ratelimit-reset-{kind}": format_reset(reset),
    }


def rate_limited(
    message: str, *, kind: str, retry_after: float | None, headers: dict[str, str]
) -> RateLimited:
    """The 429 to raise; `retry_after` None: waiting cannot help (a request too large)."""
    extra = {"x-should-retry": "false"}
    if retry_after is not None:
        wait = max(retry_after, 0.001)
        extra = {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))}
        if wait > SDK_MAX_RETRY_AFTER:
            extra["x-should-retry"] = "false"
    return RateLimited(message, kind=kind, headers=headers | extra)


def planned_training_tokens(*, file_stats: Mapping[str, Any] | None, n_epochs: int) -> int:
    """What a job will train on: its file's estimated tokens (the upload scan) x epochs."""
    return int((file_stats or {}).get("estimated_tokens") or 0) * max(1, n_epochs)


def check_job_quota(
    session: Session, settings: Settings, *, tenant_id: str, planned_tokens: int
) -> None:
    """Raise RateLimited if one more job of `planned_tokens` would pass the tenant's
    jobs-per-day or training-tokens-per-month limit. Call before the job is stored, in the
    transaction that stores it: the tenant's row stays locked (PostgreSQL) until it commits,
    so two concurrent creations cannot both take the last slot."""
    locked = select(Tenant).where(Tenant.id == tenant_id).with_for_update()
    limits = effective_limits(settings, session.exec(locked).first())
    now = utcnow()
    if limits.jobs_per_day:
        _check_jobs_per_day(session, tenant_id=tenant_id, limit=limits.jobs_per_day, now=now)
    if limits.training_tokens_per_month:
        _check_training_tokens(session, tenant_id=tenant_id,
                               limit=limits.training_tokens_per_month, planned=planned_tokens,
                               now=now)  # fmt: skip


def check_backlog(session: Session, *, tenant_id: str, limit: int) -> None:
    """Raise RateLimited if the tenant already has `limit` jobs waiting (0: unlimited).
    Waiting jobs are only ever cleared by running or cancelling them: no Retry-After."""
    if not limit:
        return
    waiting = session.exec(
        select(func.count())
        .select_from(Job)
        # Paused jobs wait too: pausing must not be a way around the backlog cap.
        .where(
            Job.tenant_id == tenant_id,
            col(Job.status).in_(("validating_files", "queued", PAUSED)),
        )
    ).one()
    if waiting < limit:
        return
    raise rate_limited(
        f"You have {waiting} fine-tuning jobs waiting to run or paused, the most allowed "
        f"({limit}). Wait for some to start, or cancel some, before creating more.",
        kind="requests",
        retry_after=None,
        headers=window_headers("requests", limit=limit, remaining=0, reset=0),
    )


def _check_jobs_per_day(session: Session, *, tenant_id: str, limit: int, now: datetime) -> None:
    day = timedelta(days=1)
    newest = session.exec(
        select(Job.created_at)
        .where(Job.tenant_id == tenant_id, col(Job.created_at) > now - day)
        .order_by(col(Job.created_at).desc())
        .limit(limit)
    ).all()
    if len(newest) < limit:
        return
    # A slot frees when the oldest of the `limit` newest jobs leaves the 24-hour window.
    wait = (aware(newest[-1]) + day - now).total_seconds()
    headers = window_headers("requests", limit=limit, remaining=0, reset=wait)
    raise rate_limited(
        f"Rate limit reached for fine-tuning jobs: {limit} jobs per day. "
        f"Please try again in {format_reset(wait)}.",
        kind="requests",
        retry_after=wait,
        headers=headers,
    )


def _check_training_tokens(
    session: Session, *, tenant_id: str, limit: int, planned: int, now: datetime
) -> None:
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    used = training_tokens_used(session, tenant_id=tenant_id, since=month)
    if used + planned <= limit:
        return
    next_month = (month + timedelta(days=32)).replace(day=1)
    wait = (next_month - now).total_seconds()
    headers = window_headers("tokens", limit=limit, remaining=limit - used, reset=wait)
    message = (
        f"Training token quota reached: this month {used} of {limit} tokens are used or "
        f"planned, and this job plans {planned}."
    )
    too_large = planned > limit
    if too_large:
        message += " Make the job smaller (fewer epochs or examples): it exceeds the quota."
    raise rate_limited(
        message, kind="tokens", retry_after=None if too_large else wait, headers=headers
    )


def training_tokens_used(session: Session, *, tenant_id: str, since: datetime) -> int:
    """Tokens trained (finished jobs) or planned (unfinished ones) by jobs created since."""
    rows = session.exec(
        select(Job.status, Job.trained_tokens, Job.hyperparameters, File.stats)
        .join(File, col(File.id) == col(Job.training_file), isouter=True)
        .where(Job.tenant_id == tenant_id, col(Job.created_at) >= since)
    ).all()
    total = 0
    for status, trained, hyperparameters, stats in rows:
        if trained is not None:
            total += trained
        elif status in ACTIVE or status == PAUSED:
            epochs = (hyperparameters or {}).get("n_epochs")
            total += planned_training_tokens(
                file_stats=stats, n_epochs=epochs if isinstance(epochs, int) else 1
            )
    return total
