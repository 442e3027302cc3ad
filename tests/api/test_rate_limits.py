"""Per-tenant limits on the control plane: the admin API that overrides them, and the
fine-tuning quotas (jobs per day, training tokens per month) on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.db import utcnow
from api.errors import RateLimited
from api.models.files import File
from api.models.jobs import Job
from api.models.tenants import Tenant
from api.services.limits import check_job_quota, effective_limits, format_reset
from api.settings import Settings
from tests.conftest import bearer, new_admin_key, new_tenant


def limits_url(tenant_id: str) -> str:
    return f"/v1/admin/tenants/{tenant_id}/limits"


def test_admins_override_limits_per_tenant(client: TestClient, settings: Settings) -> None:
    tenant_id, _ = new_tenant(settings)
    admin = bearer(new_admin_key(settings))
    shown = client.get(limits_url(tenant_id), headers=admin).json()
    assert shown["object"] == "tenant.limits" and shown["overrides"] == {}
    assert shown["requests_per_minute"] == settings.tenant_requests_per_minute == 600
    assert shown["max_queued_jobs"] == settings.max_queued_jobs_per_tenant == 20
    assert shown["defaults"]["storage_quota_bytes"] == shown["storage_quota_bytes"] > 0

    patch = {"requests_per_minute": 5, "jobs_per_day": 0}  # 0: unlimited
    changed = client.patch(limits_url(tenant_id), json=patch, headers=admin).json()
    assert changed["requests_per_minute"] == 5 and changed["jobs_per_day"] == 0
    assert changed["overrides"] == patch
    assert changed["tokens_per_minute"] == settings.tenant_tokens_per_minute  # left out: as is

    restored = client.patch(
        limits_url(tenant_id), json={"requests_per_minute": None}, headers=admin
    ).json()
    assert restored["overrides"] == {"jobs_per_day": 0}
    assert restored["requests_per_minute"] == settings.tenant_requests_per_minute
    assert client.get(limits_url(tenant_id), headers=admin).json() == restored
    audit = client.get("/v1/admin/audit", headers=admin).json()["data"]
    assert sum(entry["action"] == "tenant.limits" for entry in audit) == 2


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"requests_per_minute": -1}, 400, "requests_per_minute"),
        ({"tokens_per_minute": "many"}, 400, "tokens_per_minute"),
        ({"requests_per_second": 5}, 400, "requests_per_second"),
    ],
)
def test_limit_overrides_are_validated(
    client: TestClient, settings: Settings, body: dict[str, Any], status: int, param: str
) -> None:
    tenant_id, _ = new_tenant(settings)
    response = client.patch(
        limits_url(tenant_id), json=body, headers=bearer(new_admin_key(settings))
    )
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


def test_limits_are_admin_only(client: TestClient, settings: Settings) -> None:
    tenant_id, tenant_key = new_tenant(settings)
    for method in ("GET", "PATCH"):
        response = client.request(
            method, limits_url(tenant_id), json={}, headers=bearer(tenant_key)
        )
        assert response.status_code == 404
    unknown = client.get(limits_url("org-nope"), headers=bearer(new_admin_key(settings)))
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "tenant_id"


def override(session: Session, tenant_id: str, **limits: int) -> None:
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    tenant.limits = limits
    session.add(tenant)
    session.commit()


def add_job(
    session: Session, tenant_id: str, *, age: timedelta = timedelta(0), **fields: Any
) -> Job:
    job = Job(
        tenant_id=tenant_id,
        model="base",
        training_file=fields.pop("file", "file-x"),
        method={},
        config={},
        hyperparameters=fields.pop("hyperparameters", {}),
        created_at=utcnow() - age,
        **fields,
    )
    session.add(job)
    session.commit()
    return job


def refused(session: Session, settings: Settings, tenant_id: str, planned: int) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        check_job_quota(session, settings, tenant_id=tenant_id, planned_tokens=planned)
    assert caught.value.status_code == 429 and caught.value.code == "rate_limit_exceeded"
    return caught.value


def test_jobs_per_day_is_a_sliding_window(session: Session, settings: Settings) -> None:
    busy, _ = new_tenant(settings)
    other, _ = new_tenant(settings)
    override(session, busy, jobs_per_day=2)
    add_job(session, busy, age=timedelta(hours=25))  # out of the window
    add_job(session, busy, age=timedelta(hours=3))
    check_job_quota(session, settings, tenant_id=busy, planned_tokens=0)
    add_job(session, busy)
    for _ in range(3):
        add_job(session, other)

    error = refused(session, settings, busy, planned=0)
    assert error.type == "requests" and "2 jobs per day" in error.message
    headers = error.headers or {}
    # The job of 3 hours ago leaves the window in 21 hours.
    assert 21 * 3600 - 60 <= int(headers["Retry-After"]) <= 21 * 3600
    assert headers["x-should-retry"] == "false"  # not worth the SDK's quick retries
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] in ("21h0m0s", "20h59m59s")
    check_job_quota(session, settings, tenant_id=other, planned_tokens=0)  # default: 48


def test_training_tokens_per_month(session: Session, settings: Settings) -> None:
    tenant_id, _ = new_tenant(settings)
    override(session, tenant_id, training_tokens_per_month=10_000)
    dataset = File(
        tenant_id=tenant_id,
        filename="d.jsonl",
        purpose="fine-tune",
        sha256="0" * 64,
        storage_key="k",
        stats={"estimated_tokens": 1000},
    )
    session.add(dataset)
    session.commit()
    add_job(session, tenant_id, status="succeeded", trained_tokens=5000)
    add_job(
        session, tenant_id, status="queued", file=dataset.id, hyperparameters={"n_epochs": 3}
    )  # planned: 3 epochs x 1000
    add_job(session, tenant_id, status="cancelled")  # trained nothing
    if utcnow().day > 1:  # last month's jobs count for last month
        add_job(
            session,
            tenant_id,
            status="succeeded",
            trained_tokens=9000,
            age=timedelta(days=utcnow().day),
        )

    check_job_quota(session, settings, tenant_id=tenant_id, planned_tokens=2000)  # 10,000
    error = refused(session, settings, tenant_id, planned=2001)
    headers = error.headers or {}
    assert error.type == "tokens" and "8000 of 10000" in error.message
    assert headers["x-ratelimit-remaining-tokens"] == "2000"
    assert 0 < int(headers["Retry-After"]) <= 31 * 86400  # the first of next month
    too_large = refused(session, settings, tenant_id, planned=10_001)
    assert "Retry-After" not in (too_large.headers or {})
    assert (too_large.headers or {})["x-should-retry"] == "false"


def test_effective_limits_merge_overrides_over_the_settings() -> None:
    settings = Settings(tenant_tokens_per_minute=7, max_running_jobs_per_tenant=3)
    tenant = Tenant(name="t", limits={"tokens_per_minute": 0, "unknown": 5})
    merged = effective_limits(settings, tenant)
    assert merged.tokens_per_minute == 0 and merged.max_running_jobs == 3
    assert effective_limits(settings, None).tokens_per_minute == 7


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0123, "13ms"), (1.5, "1.5s"), (20, "20s"), (360, "6m0s"), (86399.5, "24h0m0s")],
)
def test_reset_durations_read_like_openais(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text
