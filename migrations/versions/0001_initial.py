"""orders, idempotency keys, steps, outbox and dead letters

Revision ID: 0001
Revises:
Create Date: 2026-11-28 10:24:27.889091
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.models

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("locked_until", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.JSON(), nullable=True),
        sa.Column("order_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_idempotency_keys")),
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("customer_email", sa.String(length=320), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("items", sa.JSON(), nullable=False),
        sa.Column("charge_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("cancelled_at", core.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("created_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orders")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_orders_idempotency_key")),
    )
    op.create_table(
        "payment_charges",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("succeeded", sa.Boolean(), nullable=False),
        sa.Column("decline_reason", sa.String(length=200), nullable=True),
        sa.Column("created_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_charges")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_payment_charges_idempotency_key")),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("order_id", sa.String(length=40), nullable=False),
        sa.Column("step", sa.String(length=40), nullable=False),
        sa.Column("occurrence", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error_type", sa.String(length=200), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("permanent", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("workflow_id", sa.String(length=255), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("first_attempt_at", core.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("created_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", core.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("discarded_by", sa.String(length=200), nullable=True),
        sa.Column("discard_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_dead_letters_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        sa.UniqueConstraint("order_id", "step", "occurrence", name="uq_dead_letters_occurrence"),
    )
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.create_index("ix_dead_letters_order_id", ["order_id"], unique=False)
        batch_op.create_index("ix_dead_letters_status_step", ["status", "step"], unique=False)

    op.create_table(
        "order_steps",
        sa.Column("order_id", sa.String(length=40), nullable=False),
        sa.Column("step", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("occurrence_attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.Column("succeeded_at", core.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_order_steps_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("order_id", "step", name=op.f("pk_order_steps")),
    )
    op.create_table(
        "workflow_outbox",
        sa.Column("order_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", core.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("started_at", core.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("start_attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_workflow_outbox_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("order_id", name=op.f("pk_workflow_outbox")),
    )
    with op.batch_alter_table("workflow_outbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_workflow_outbox_pending",
            ["created_at"],
            unique=False,
            sqlite_where=sa.text("started_at IS NULL"),
            postgresql_where=sa.text("started_at IS NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("workflow_outbox", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_workflow_outbox_pending",
            sqlite_where=sa.text("started_at IS NULL"),
            postgresql_where=sa.text("started_at IS NULL"),
        )

    op.drop_table("workflow_outbox")
    op.drop_table("order_steps")
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.drop_index("ix_dead_letters_status_step")
        batch_op.drop_index("ix_dead_letters_order_id")

    op.drop_table("dead_letters")
    op.drop_table("payment_charges")
    op.drop_table("orders")
    op.drop_table("idempotency_keys")
