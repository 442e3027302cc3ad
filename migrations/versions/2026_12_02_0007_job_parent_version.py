"""jobs may continue from one of the tenant's adapter versions (continued fine-tuning)

Revision ID: 0007_job_parent_version
Revises: 0006_tenant_limits
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_job_parent_version"
down_revision: str | None = "0006_tenant_limits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.add_column(sa.Column("parent_version_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("parent_version_id")
