"""usage_logs.uid: a unique id per usage row, so a batch written twice (a commit whose
acknowledgement was lost, a spool replayed after a crash) still leaves one row per call.

Rows written before this revision keep a NULL uid (NULLs never collide in a unique index).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("usage_logs", sa.Column("uid", sa.String(length=32), nullable=True))
    op.create_index("ix_usage_logs_uid", "usage_logs", ["uid"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_usage_logs_uid", table_name="usage_logs")
    with op.batch_alter_table("usage_logs") as batch:
        batch.drop_column("uid")
