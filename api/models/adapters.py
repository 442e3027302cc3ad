"""The adapter registry: a tenant's named adapter line and its immutable versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from api.db import utcnow
from api.models.tenants import new_id

STAGES = ("candidate", "staging", "production", "archived", "rejected")


class Adapter(SQLModel, table=True):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: str = Field(default_factory=lambda: new_id("adapter-"), primary_key=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    name: str = Field(max_length=64)
    base_model: str = Field(max_length=256)
    created_at: datetime = Field(default_factory=utcnow)


class AdapterVersion(SQLModel, table=True):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version"),)

    id: str = Field(default_factory=lambda: new_id("adv-"), primary_key=True, max_length=64)
    adapter_id: str = Field(foreign_key="adapters.id", index=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    version: int
    # One version per job, enforced by the database: a job that runs twice registers once.
    job_id: str = Field(foreign_key="fine_tuning_jobs.id", unique=True, max_length=64)
    fine_tuned_model: str = Field(unique=True, max_length=256)
    base_model: str = Field(max_length=256)
    storage_prefix: str = Field(max_length=512)
    files: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))  # path -> sha, size
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    rank: int
    target_modules: list[str] = Field(sa_column=Column(JSON, nullable=False))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    lineage: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    stage: str = Field(default="candidate", max_length=16, index=True)
    stage_reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow, index=True)
