"""evals, eval runs and output items, shadow samples; adapter policy, canary start, shadow

Revision ID: 0011_evals
Revises: 0010_model_aliases
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_evals"
down_revision: str | None = "0010_model_aliases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.Column:
    return sa.Column("id", sa.String(length=64), nullable=False)


def _tenant() -> sa.Column:
    return sa.Column("tenant_id", sa.String(length=64), nullable=False)


def _created() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "evals",
        _id(),
        _tenant(),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("data_source_config", sa.JSON(), nullable=False),
        sa.Column("testing_criteria", sa.JSON(), nullable=False),
        sa.Column("eval_metadata", sa.JSON(), nullable=True),
        sa.Column("adapter_name", sa.String(length=64), nullable=True),
        _created(),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("tenant_id", "adapter_name", "created_at"):
        op.create_index(f"ix_evals_{column}", "evals", [column])
    op.create_table(
        "eval_runs",
        _id(),
        sa.Column("eval_id", sa.String(length=64), nullable=False),
        _tenant(),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("adapter_version_id", sa.String(length=64), nullable=True),
        sa.Column("data_source", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("result_counts", sa.JSON(), nullable=False),
        sa.Column("per_criteria", sa.JSON(), nullable=False),
        sa.Column("usage", sa.JSON(), nullable=False),
        sa.Column("run_metadata", sa.JSON(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        _created(),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["eval_id"], ["evals.id"]),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("eval_id", "tenant_id", "adapter_version_id", "status", "created_at"):
        op.create_index(f"ix_eval_runs_{column}", "eval_runs", [column])
    op.create_table(
        "eval_output_items",
        _id(),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("eval_id", sa.String(length=64), nullable=False),
        _tenant(),
        sa.Column("datasource_item_id", sa.Integer(), nullable=False),
        sa.Column("datasource_item", sa.JSON(), nullable=False),
        sa.Column("results", sa.JSON(), nullable=False),
        sa.Column("sample", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=8), nullable=False),
        _created(),
        sa.ForeignKeyConstraint(["run_id"], ["eval_runs.id"]),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "datasource_item_id"),
    )
    for column in ("run_id", "tenant_id"):
        op.create_index(f"ix_eval_output_items_{column}", "eval_output_items", [column])
    op.create_table(
        "shadow_samples",
        _id(),
        _tenant(),
        sa.Column("adapter_id", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.String(length=64), nullable=False),
        sa.Column("production_version_id", sa.String(length=64), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("production_output", sa.Text(), nullable=False),
        sa.Column("shadow_output", sa.Text(), nullable=True),
        sa.Column("shadow_latency_ms", sa.Float(), nullable=True),
        sa.Column("shadow_error", sa.Text(), nullable=True),
        sa.Column("results", sa.JSON(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=True),
        _created(),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"]),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("tenant_id", "adapter_id", "version_id", "created_at"):
        op.create_index(f"ix_shadow_samples_{column}", "shadow_samples", [column])
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("canary_started_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("shadow_version_id", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column("shadow_percent", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("policy", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        for column in ("policy", "shadow_percent", "shadow_version_id", "canary_started_at"):
            batch.drop_column(column)
    for table in ("shadow_samples", "eval_output_items", "eval_runs", "evals"):
        op.drop_table(table)
