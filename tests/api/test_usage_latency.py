"""Usage per tenant and adapter carries latency percentiles over the last day."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlmodel import Session

from api.db import utcnow
from api.models.usage import UsageRecord
from api.services.usage import record_usage
from api.settings import Settings
from tests.conftest import bearer, new_admin_key, new_tenant


def test_usage_reports_p50_p95_p99_of_the_last_day(
    client: TestClient, session: Session, settings: Settings
) -> None:
    tenant_id, _ = new_tenant(settings, name="acme")
    for ms in range(1, 101):  # 1..100 ms: p50 = 50, p95 = 95, p99 = 99
        record_usage(session, tenant_id=tenant_id, model="bot", base_model="base",
                     adapter_version_id=None, endpoint="chat.completions", prompt_tokens=1,
                     completion_tokens=1, latency_ms=float(ms))  # fmt: skip
    # A 503 (nothing served), and a request older than the window.
    for status, age in ((503, timedelta(0)), (200, timedelta(days=2))):
        session.add(UsageRecord(tenant_id=tenant_id, model="bot", base_model="base",
                                endpoint="chat.completions", latency_ms=9000.0,
                                status_code=status, created_at=utcnow() - age))  # fmt: skip
    session.commit()
    body = client.get("/v1/admin/usage", headers=bearer(new_admin_key(settings))).json()
    (row,) = body["data"]
    assert row["requests"] == 101 and row["unavailable"] == 1
    latency = row["latency_ms"]
    assert (latency["p50"], latency["p95"], latency["p99"]) == (50.0, 95.0, 99.0)
    assert latency["samples"] == 100 and latency["window_seconds"] == 86400
