"""Evals (OpenAI's Evals API), their runs and each run's output items; shadow samples.

An eval is a tenant's definition: the shape of its items and the testing criteria. A run
grades one data source (items with samples, or items a model answers) against them:

    queued -> in_progress -> completed | failed | canceled
       ^           |
       +-----------+  (worker lost: the message is delivered again; items already
                       graded are kept, the run goes on from the next one)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from api.db import utcnow
from api.models.tenants import new_id

RUN_ACTIVE = ("queued", "in_progress")
RUN_TERMINAL = ("completed", "failed", "canceled")


class Eval(SQLModel, table=True):
    __tablename__ = "evals"

    id: str = Field(default_factory=lambda: new_id("eval_"), primary_key=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    name: str = Field(default="", max_length=256)
    data_source_config: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    testing_criteria: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    eval_metadata: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))
    # Attached to an adapter (made from a fine-tune's validation file): every new version
    # of that adapter gets a run, beside production's and the base's (A/B).
    adapter_name: str | None = Field(default=None, max_length=64, index=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)


class EvalRun(SQLModel, table=True):
    __tablename__ = "eval_runs"

    id: str = Field(default_factory=lambda: new_id("evalrun_"), primary_key=True, max_length=64)
    eval_id: str = Field(foreign_key="evals.id", index=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    name: str = Field(default="", max_length=256)
    # What generated the samples: the data source's `model` ("" for a jsonl source), and the
    # adapter version it resolved to when the run started (None: the base, or no model).
    model: str = Field(default="", max_length=256)
    adapter_version_id: str | None = Field(default=None, max_length=64, index=True)
    data_source: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    status: str = Field(default="queued", max_length=16, index=True)
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    result_counts: dict[str, int] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )
    per_criteria: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    usage: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    run_metadata: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))
    cancel_requested: bool = False
    attempts: int = 0
    # Touched as items are graded: a run in progress whose worker died goes stale, and the
    # eval workers' sweep sends it again (workers.tasks.redispatch_eval_runs).
    heartbeat_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class EvalOutputItem(SQLModel, table=True):
    __tablename__ = "eval_output_items"
    __table_args__ = (UniqueConstraint("run_id", "datasource_item_id"),)

    id: str = Field(default_factory=lambda: new_id("outputitem_"), primary_key=True, max_length=64)
    run_id: str = Field(foreign_key="eval_runs.id", index=True, max_length=64)
    eval_id: str = Field(max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    datasource_item_id: int
    datasource_item: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    results: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    sample: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    status: str = Field(max_length=8)  # pass | fail | error
    created_at: datetime = Field(default_factory=utcnow)


class ShadowSample(SQLModel, table=True):
    """One by-name production request mirrored to a candidate version: both answers, and
    the adapter's criteria applied to the pair (the production answer as the reference)."""

    __tablename__ = "shadow_samples"

    id: str = Field(default_factory=lambda: new_id("shadow_"), primary_key=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    adapter_id: str = Field(foreign_key="adapters.id", index=True, max_length=64)
    version_id: str = Field(max_length=64, index=True)  # the candidate
    production_version_id: str = Field(max_length=64)
    request: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    production_output: str = Field(sa_column=Column(Text, nullable=False))
    shadow_output: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    shadow_latency_ms: float | None = None
    shadow_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    results: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    passed: bool | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
