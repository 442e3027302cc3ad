"""registry stages and canary, audit log, usage records

Revision ID: 0004_registry_audit_usage
Revises: 0003_jobs_and_adapters
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_registry_audit_usage"
down_revision: str | None = "0003_jobs_and_adapters"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
PRODUCTION = sa.text("stage = 'production'")


def upgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("canary_version_id", sa.String(64), nullable=True))
        batch.add_column(
            sa.Column("canary_percent", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("adapter_versions") as batch:
        batch.add_column(sa.Column("serial", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("promoted_at", TS, nullable=True))
        batch.create_unique_constraint("uq_adapter_versions_serial", ["serial"])
    op.create_index(
        "uq_adapter_versions_one_production",
        "adapter_versions",
        ["adapter_id"],
        unique=True,
        sqlite_where=PRODUCTION,
        postgresql_where=PRODUCTION,
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("actor_key_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(32), nullable=False),
        sa.Column("target_id", sa.String(128), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=True),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
    )
    for column in ("actor_key_id", "action", "target_id", "tenant_id", "created_at"):
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column])
    op.create_table(
        "usage_records",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("adapter_version_id", sa.String(64), nullable=True),
        sa.Column("base_model", sa.String(256), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    for column in ("tenant_id", "adapter_version_id", "created_at"):
        op.create_index(f"ix_usage_records_{column}", "usage_records", [column])


def downgrade() -> None:
    op.drop_table("usage_records")
    op.drop_table("audit_log")
    op.drop_index("uq_adapter_versions_one_production", table_name="adapter_versions")
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_constraint("uq_adapter_versions_serial", type_="unique")
        batch.drop_column("promoted_at")
        batch.drop_column("serial")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("canary_percent")
        batch.drop_column("canary_version_id")
