"""Fine-tuning jobs, their events and checkpoints. The job row is the job's state machine:

validating_files -> queued -> running -> succeeded | failed | cancelled
                      ^          |
                      +----------+  (worker lost: the reaper re-queues, resume from checkpoint)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from api.db import utcnow
from api.models.tenants import new_id

ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
# A paused job (POST .../pause, as OpenAI has it) holds no worker and waits for .../resume;
# it can still be cancelled. While its worker checkpoints it keeps its lease.
PAUSED = "paused"


class Job(SQLModel, table=True):
    __tablename__ = "fine_tuning_jobs"

    id: str = Field(default_factory=lambda: new_id("ftjob-"), primary_key=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    model: str = Field(max_length=256)
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    suffix: str | None = Field(default=None, max_length=64)
    # Continued fine-tuning: the tenant's adapter version this job starts from (its weights,
    # rank and target modules); `model` is then that version's base.
    parent_version_id: str | None = Field(default=None, max_length=64)
    seed: int = 42
    job_metadata: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))
    method: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    # The full trainer config (TrainConfig as JSON), "auto" values left as requested.
    config: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    # What "auto" resolved to for this dataset (n_epochs, batch_size, lr multiplier).
    hyperparameters: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    status: str = Field(default="validating_files", max_length=32, index=True)
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    fine_tuned_model: str | None = Field(default=None, max_length=256)
    trained_tokens: int | None = None
    result_files: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    queue: str = Field(default="train-cpu", max_length=64)
    cancel_requested: bool = False
    attempts: int = 0
    lease: str | None = Field(default=None, max_length=64)
    worker: str | None = Field(default=None, max_length=256)
    heartbeat_at: datetime | None = None
    # When a message for this job was last sent to the broker: a job still queued long after
    # is re-sent, in case the broker lost it (workers.tasks.redispatch).
    dispatched_at: datetime | None = None
    estimated_finish: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobEvent(SQLModel, table=True):
    __tablename__ = "fine_tuning_job_events"

    id: str = Field(default_factory=lambda: new_id("ftevent-"), primary_key=True, max_length=64)
    job_id: str = Field(foreign_key="fine_tuning_jobs.id", index=True, max_length=64)
    level: str = Field(default="info", max_length=8)
    type: str = Field(default="message", max_length=16)
    message: str = Field(sa_column=Column(Text, nullable=False))
    data: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow, index=True)


class JobCheckpoint(SQLModel, table=True):
    __tablename__ = "fine_tuning_job_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number"),)

    id: str = Field(default_factory=lambda: new_id("ftckpt-"), primary_key=True, max_length=64)
    job_id: str = Field(foreign_key="fine_tuning_jobs.id", index=True, max_length=64)
    step_number: int
    storage_prefix: str = Field(max_length=512)
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The adapter's files in the checkpoint (path -> sha256, size): what serving it by its
    # `fine_tuned_model_checkpoint` name fetches and verifies. None: recorded before 0009.
    files: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = Field(default_factory=utcnow, index=True)
