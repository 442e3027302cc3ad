"""The adapter registry: a tenant's named adapter line and its immutable versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from api.db import utcnow
from api.models.tenants import new_id

STAGES = ("candidate", "staging", "production", "archived", "rejected")
# Version numbers are a 32-bit INTEGER column on PostgreSQL; a bigger one is no version.
MAX_VERSION = 2**31 - 1


class Adapter(SQLModel, table=True):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: str = Field(default_factory=lambda: new_id("adapter-"), primary_key=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    name: str = Field(max_length=64)
    base_model: str = Field(max_length=256)
    # A canary: a second version that gets `canary_percent`% of by-name traffic.
    canary_version_id: str | None = Field(default=None, max_length=64)
    canary_percent: int = 0
    canary_started_at: datetime | None = None
    # Shadow traffic: `shadow_percent`% of by-name production requests are also sent to this
    # version; users get production's answer only, the pair is kept (ShadowSample).
    shadow_version_id: str | None = Field(default=None, max_length=64)
    shadow_percent: int = 0
    # The admin's rules for this adapter (api.services.policy): what production requires
    # of an eval, when a canary is aborted on its own.
    policy: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)


class AdapterVersion(SQLModel, table=True):
    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "version"),
        # At most one production version per adapter, whatever two admins do at once.
        Index(
            "uq_adapter_versions_one_production",
            "adapter_id",
            unique=True,
            sqlite_where=text("stage = 'production'"),
            postgresql_where=text("stage = 'production'"),
        ),
    )

    id: str = Field(default_factory=lambda: new_id("adv-"), primary_key=True, max_length=64)
    adapter_id: str = Field(foreign_key="adapters.id", index=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    version: int
    # One version per job, enforced by the database: a job that runs twice registers once.
    # None for a version a tenant uploaded (bring your own adapter).
    job_id: str | None = Field(
        default=None, foreign_key="fine_tuning_jobs.id", unique=True, max_length=64
    )
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
    # A stable small integer per version: vLLM's LoRA int id (its own name hashing collides).
    serial: int | None = Field(default=None, unique=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    promoted_at: datetime | None = None


class ModelAlias(SQLModel, table=True):
    """Another name a tenant's clients call an adapter by: typically the `ft:gpt-...` id of
    the hosted model it replaced (`loraplex migrate`), so a client changes only its base URL
    and key. It resolves as the adapter's name does (its production version), and may be
    set before the adapter exists: a migrated job's adapter appears when the job succeeds."""

    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("tenant_id", "alias"),)

    id: str = Field(default_factory=lambda: new_id("alias-"), primary_key=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    alias: str = Field(max_length=256)
    adapter_name: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
