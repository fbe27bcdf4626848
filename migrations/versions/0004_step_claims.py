"""step claims: order_steps holds the last claim of the step and the outcome of the attempt it
recorded last; interrupted_claims keeps the claims that ended without an outcome

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("order_steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claim_token", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("claim_attempt", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=255), nullable=True))
        batch_op.add_column(
            sa.Column("claimed_at", core.models.UtcDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("claimed_until", core.models.UtcDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("recorded_attempt", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("last_error_type", sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column(
                "last_error_permanent", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
    op.create_table(
        "interrupted_claims",
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("order_id", sa.String(length=40), nullable=False),
        sa.Column("step", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.String(length=40), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("claimed_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("claimed_until", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("ended", sa.String(length=16), nullable=False),
        sa.Column("ended_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_interrupted_claims_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_interrupted_claims")),
    )
    with op.batch_alter_table("interrupted_claims", schema=None) as batch_op:
        batch_op.create_index("ix_interrupted_claims_order_id", ["order_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("interrupted_claims", schema=None) as batch_op:
        batch_op.drop_index("ix_interrupted_claims_order_id")
    op.drop_table("interrupted_claims")
    with op.batch_alter_table("order_steps", schema=None) as batch_op:
        batch_op.drop_column("last_error_permanent")
        batch_op.drop_column("last_error_type")
        batch_op.drop_column("recorded_attempt")
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("claimed_at")
        batch_op.drop_column("claimed_by")
        batch_op.drop_column("claim_attempt")
        batch_op.drop_column("claim_token")
