"""The database tables: orders, the idempotency keys that guard intake, the per-step state and
the dead letters an operator reviews."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# The states live where the workflow's code can import them without SQLAlchemy; the tables store
# them, and the rest of the tree keeps importing them from here.
from core.states import DeadLetterResolution as DeadLetterResolution
from core.states import DeadLetterStatus as DeadLetterStatus
from core.states import KeyState as KeyState
from core.states import OrderStatus as OrderStatus
from core.states import Step as Step
from core.states import StepStatus as StepStatus

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Stores UTC and always hands back an aware datetime (SQLite alone would drop the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime(),
        dict[str, Any]: JSON,
        list[dict[str, Any]]: JSON,
    }


class IdempotencyKey(Base):
    """One row per `Idempotency-Key` header: who holds it and the answer to replay."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=KeyState.IN_FLIGHT)
    locked_until: Mapped[datetime]
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None]
    order_id: Mapped[str | None] = mapped_column(String(40))
    # When this use of the key began: it replays its answer until IDEMPOTENCY_KEY_TTL_SECONDS
    # after, then the key starts a new use (and the cleanup may delete the row).
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # The key the charge and the order carry when it differs from `key`: a key used again after
    # it expired (see api.intake); NULL means `key` itself.
    charge_key: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)


class PaymentCharge(Base):
    """The sandbox gateway's own ledger; a real gateway keeps this on its side."""

    __tablename__ = "payment_charges"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    amount_cents: Mapped[int]
    currency: Mapped[str] = mapped_column(String(3))
    succeeded: Mapped[bool] = mapped_column(Boolean)
    decline_reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    customer_email: Mapped[str] = mapped_column(String(320))
    currency: Mapped[str] = mapped_column(String(3))
    amount_cents: Mapped[int]
    items: Mapped[list[dict[str, Any]]]
    charge_id: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default=OrderStatus.PROCESSING)
    cancelled_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WorkflowOutbox(Base):
    """Committed with its order: "this order's workflow must be started". Marked once started,
    and deleted by the retention cleanup OUTBOX_RETENTION_SECONDS after that."""

    __tablename__ = "workflow_outbox"

    order_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    start_attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index(
            "ix_workflow_outbox_pending",
            "created_at",
            sqlite_where=text("started_at IS NULL"),
            postgresql_where=text("started_at IS NULL"),
        ),
        # The retention cleanup's scan: started rows, oldest first.
        Index(
            "ix_workflow_outbox_started",
            "started_at",
            sqlite_where=text("started_at IS NOT NULL"),
            postgresql_where=text("started_at IS NOT NULL"),
        ),
    )


class OrderStep(Base):
    """The state of one follow-up of one order; its primary key is the side effect's unique key."""

    __tablename__ = "order_steps"

    order_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default=StepStatus.PENDING)
    # Every attempt this step made, across redrives.
    attempts: Mapped[int] = mapped_column(default=0)
    # Attempts in the current occurrence (Temporal's attempt counter restarts at each redrive).
    occurrence_attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # What the downstream said when it accepted the effect (Message-ID, HTTP status).
    outcome: Mapped[dict[str, Any] | None]
    succeeded_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # The last claim of the step (core/ledger.py): its token, the attempt and worker (pid@host)
    # that took it, when, and until when it is live. The claim stays on the row once the step
    # succeeded: it names the attempt that recorded the effect.
    claim_token: Mapped[str | None] = mapped_column(String(32))
    claim_attempt: Mapped[str | None] = mapped_column(String(40))
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_at: Mapped[datetime | None]
    claimed_until: Mapped[datetime | None]
    # The attempt whose outcome the row recorded last, and how it failed, so that a second run of
    # that attempt answers as the first did without calling the downstream again.
    recorded_attempt: Mapped[str | None] = mapped_column(String(40))
    last_error_type: Mapped[str | None] = mapped_column(String(200))
    last_error_permanent: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )


class InterruptedClaim(Base):
    """A claim that ended without recording an outcome: taken over once its lease ran out (its
    worker died, lost its database, or outlived the lease), or given back by a run cut short.
    Its attempt may have performed the effect: the one window that remains (docs/workflow.md)."""

    __tablename__ = "interrupted_claims"

    token: Mapped[str] = mapped_column(String(32), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(40), ForeignKey("orders.id", ondelete="CASCADE"))
    step: Mapped[str] = mapped_column(String(40))
    attempt: Mapped[str] = mapped_column(String(40))
    # The SDK's worker identity, pid@host.
    worker: Mapped[str] = mapped_column(String(255))
    claimed_at: Mapped[datetime]
    claimed_until: Mapped[datetime]
    # ClaimEnd: taken_over or released.
    ended: Mapped[str] = mapped_column(String(16))
    ended_at: Mapped[datetime]

    __table_args__ = (Index("ix_interrupted_claims_order_id", "order_id"),)


class DeadLetter(Base):
    """One occurrence of a step that gave up; kept after it is resolved or discarded."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(String(40), ForeignKey("orders.id", ondelete="CASCADE"))
    step: Mapped[str] = mapped_column(String(40))
    occurrence: Mapped[int] = mapped_column(default=1)
    status: Mapped[str] = mapped_column(String(16), default=DeadLetterStatus.OPEN)
    error_type: Mapped[str] = mapped_column(String(200))
    error_message: Mapped[str] = mapped_column(Text)
    permanent: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int]
    workflow_id: Mapped[str] = mapped_column(String(255))
    run_id: Mapped[str] = mapped_column(String(64))
    first_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    resolved_at: Mapped[datetime | None]
    # Why this occurrence closed (DeadLetterResolution); NULL while open or retrying.
    resolution: Mapped[str | None] = mapped_column(String(20))
    discarded_by: Mapped[str | None] = mapped_column(String(200))
    discard_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # A redelivered record_dead_letter finds its own row instead of writing a second one.
        UniqueConstraint("order_id", "step", "occurrence", name="uq_dead_letters_occurrence"),
        Index("ix_dead_letters_status_step", "status", "step"),
        Index("ix_dead_letters_order_id", "order_id"),
    )
