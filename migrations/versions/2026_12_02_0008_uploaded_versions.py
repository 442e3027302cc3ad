"""adapter versions may come from an upload, not a job (bring your own adapter)

Revision ID: 0008_uploaded_versions
Revises: 0007_job_parent_version
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_uploaded_versions"
down_revision: str | None = "0007_job_parent_version"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.alter_column("job_id", existing_type=sa.String(length=64), nullable=True)


def downgrade() -> None:
    # Uploaded versions have no job: they cannot survive the older schema.
    op.execute("DELETE FROM adapter_versions WHERE job_id IS NULL")
    with op.batch_alter_table("adapter_versions") as batch:
        batch.alter_column("job_id", existing_type=sa.String(length=64), nullable=False)
