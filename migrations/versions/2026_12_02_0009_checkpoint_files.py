"""checkpoints record their adapter files' digests, so they can be served by name

Revision ID: 0009_checkpoint_files
Revises: 0008_uploaded_versions
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_checkpoint_files"
down_revision: str | None = "0008_uploaded_versions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_job_checkpoints") as batch:
        batch.add_column(sa.Column("files", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_job_checkpoints") as batch:
        batch.drop_column("files")
