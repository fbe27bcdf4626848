"""retention: idempotency_keys.charge_key, and the indexes the cleanup scans

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("charge_key", sa.String(length=255), nullable=True))
        batch_op.create_index("ix_idempotency_keys_created_at", ["created_at"], unique=False)
    with op.batch_alter_table("workflow_outbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_workflow_outbox_started",
            ["started_at"],
            unique=False,
            sqlite_where=sa.text("started_at IS NOT NULL"),
            postgresql_where=sa.text("started_at IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("workflow_outbox", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_workflow_outbox_started",
            sqlite_where=sa.text("started_at IS NOT NULL"),
            postgresql_where=sa.text("started_at IS NOT NULL"),
        )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_idempotency_keys_created_at")
        batch_op.drop_column("charge_key")
