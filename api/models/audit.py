"""The audit log: every admin action, who did it, and the state before and after."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Text
from sqlmodel import Field, SQLModel

from api.db import utcnow
from api.models.tenants import new_id


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit_log"

    id: str = Field(default_factory=lambda: new_id("audit-"), primary_key=True, max_length=64)
    actor_key_id: str = Field(max_length=64, index=True)
    action: str = Field(max_length=64, index=True)
    target_type: str = Field(max_length=32)
    target_id: str = Field(max_length=128, index=True)
    tenant_id: str | None = Field(default=None, max_length=64, index=True)
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    forced: bool = False
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow, index=True)
