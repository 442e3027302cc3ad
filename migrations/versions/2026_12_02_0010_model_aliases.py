"""model aliases: other names for a tenant's adapter (the hosted ft: ids it replaced)

Revision ID: 0010_model_aliases
Revises: 0009_checkpoint_files
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_model_aliases"
down_revision: str | None = "0009_checkpoint_files"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_aliases",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("alias", sa.String(length=256), nullable=False),
        sa.Column("adapter_name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "alias"),
    )
    op.create_index("ix_model_aliases_tenant_id", "model_aliases", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_model_aliases_tenant_id", table_name="model_aliases")
    op.drop_table("model_aliases")
