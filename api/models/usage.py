"""Serving usage: one row per completed request, aggregated on read."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from api.db import utcnow
from api.models.tenants import new_id


class UsageRecord(SQLModel, table=True):
    __tablename__ = "usage_records"

    id: str = Field(default_factory=lambda: new_id("usage-"), primary_key=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    model: str = Field(max_length=256)  # what the tenant asked for
    adapter_version_id: str | None = Field(default=None, max_length=64, index=True)
    base_model: str = Field(max_length=256)
    endpoint: str = Field(max_length=32)  # chat.completions | completions
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    status_code: int = 200
    created_at: datetime = Field(default_factory=utcnow, index=True)
