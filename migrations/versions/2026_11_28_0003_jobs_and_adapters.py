"""fine-tuning jobs, events, checkpoints; adapters and versions

Revision ID: 0003_jobs_and_adapters
Revises: 0002_files
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_jobs_and_adapters"
down_revision: str | None = "0002_files"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def _id() -> sa.Column:
    return sa.Column("id", sa.String(64), primary_key=True)


def upgrade() -> None:
    op.create_table(
        "fine_tuning_jobs",
        _id(),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("training_file", sa.String(64), nullable=False),
        sa.Column("validation_file", sa.String(64), nullable=True),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("job_metadata", sa.JSON(), nullable=True),
        sa.Column("method", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("fine_tuned_model", sa.String(256), nullable=True),
        sa.Column("trained_tokens", sa.Integer(), nullable=True),
        sa.Column("result_files", sa.JSON(), nullable=False),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease", sa.String(64), nullable=True),
        sa.Column("worker", sa.String(256), nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("estimated_finish", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_index("ix_fine_tuning_jobs_tenant_id", "fine_tuning_jobs", ["tenant_id"])
    op.create_index("ix_fine_tuning_jobs_status", "fine_tuning_jobs", ["status"])
    op.create_index("ix_fine_tuning_jobs_created_at", "fine_tuning_jobs", ["created_at"])

    op.create_table(
        "fine_tuning_job_events",
        _id(),
        sa.Column("job_id", sa.String(64), sa.ForeignKey("fine_tuning_jobs.id"), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_fine_tuning_job_events_job_id", "fine_tuning_job_events", ["job_id"])
    op.create_index(
        "ix_fine_tuning_job_events_created_at", "fine_tuning_job_events", ["created_at"]
    )

    op.create_table(
        "fine_tuning_job_checkpoints",
        _id(),
        sa.Column("job_id", sa.String(64), sa.ForeignKey("fine_tuning_jobs.id"), nullable=False),
        sa.Column("step_number", sa.Integer(), nullable=False),
        sa.Column("storage_prefix", sa.String(512), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("job_id", "step_number"),
    )
    op.create_index(
        "ix_fine_tuning_job_checkpoints_job_id", "fine_tuning_job_checkpoints", ["job_id"]
    )
    op.create_index(
        "ix_fine_tuning_job_checkpoints_created_at", "fine_tuning_job_checkpoints", ["created_at"]
    )

    op.create_table(
        "adapters",
        _id(),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("base_model", sa.String(256), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("tenant_id", "name"),
    )
    op.create_index("ix_adapters_tenant_id", "adapters", ["tenant_id"])

    op.create_table(
        "adapter_versions",
        _id(),
        sa.Column("adapter_id", sa.String(64), sa.ForeignKey("adapters.id"), nullable=False),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(64), sa.ForeignKey("fine_tuning_jobs.id"), nullable=False),
        sa.Column("fine_tuned_model", sa.String(256), nullable=False),
        sa.Column("base_model", sa.String(256), nullable=False),
        sa.Column("storage_prefix", sa.String(512), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("lineage", sa.JSON(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("stage_reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("adapter_id", "version"),
        sa.UniqueConstraint("job_id"),
        sa.UniqueConstraint("fine_tuned_model"),
    )
    op.create_index("ix_adapter_versions_adapter_id", "adapter_versions", ["adapter_id"])
    op.create_index("ix_adapter_versions_tenant_id", "adapter_versions", ["tenant_id"])
    op.create_index("ix_adapter_versions_stage", "adapter_versions", ["stage"])
    op.create_index("ix_adapter_versions_created_at", "adapter_versions", ["created_at"])


def downgrade() -> None:
    for table in (
        "adapter_versions",
        "adapters",
        "fine_tuning_job_checkpoints",
        "fine_tuning_job_events",
        "fine_tuning_jobs",
    ):
        op.drop_table(table)
