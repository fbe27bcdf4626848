"""The per-step ledger every side effect shares: read whether it already happened, record an
attempt that failed, and record success only after the downstream accepted the effect."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.contracts import StepInput, overall_status
from core.db import read_session
from core.models import (
    DeadLetter,
    DeadLetterResolution,
    DeadLetterStatus,
    Order,
    OrderStep,
    StepStatus,
    utcnow,
)

ACTIVE_DEAD_LETTER = (DeadLetterStatus.OPEN, DeadLetterStatus.RETRYING)
# For bulk UPDATEs whose rows no object in the session holds: skips matching them in Python.
NO_SYNC = {"synchronize_session": False}


# The statements every step attempt runs, built once: building a statement costs more CPU than
# running it (SQLAlchemy caches the compiled form, not the construction). Their parameters are
# named b_* so that none is mistaken for a column to SET.
STEP_ROW = (
    select(Order, OrderStep)
    .join(OrderStep, OrderStep.order_id == Order.id)
    .where(Order.id == bindparam("b_order_id"), OrderStep.step == bindparam("b_step"))
)
STEP_SUCCEEDED = (
    update(OrderStep)
    .where(OrderStep.order_id == bindparam("b_order_id"), OrderStep.step == bindparam("b_step"))
    .values(
        status=StepStatus.SUCCEEDED,
        attempts=OrderStep.attempts + 1,
        occurrence_attempts=bindparam("b_attempt"),
        outcome=bindparam("b_outcome", type_=OrderStep.outcome.type),
        succeeded_at=bindparam("b_now", type_=OrderStep.succeeded_at.type),
        updated_at=bindparam("b_now", type_=OrderStep.updated_at.type),
    )
)
# A step has an open or retrying dead letter only while its row says dead_lettered (the letter
# and that status are written in one transaction): any other row has none to resolve.
FIRST_SUCCESS = STEP_SUCCEEDED.where(OrderStep.status != StepStatus.DEAD_LETTERED)
ORDER_STATUS_FOR_UPDATE = (
    select(Order.status, Order.cancelled_at)
    .where(Order.id == bindparam("b_order_id"))
    .with_for_update()
)
STEP_STATUSES = select(OrderStep.status).where(OrderStep.order_id == bindparam("b_order_id"))


def effect_key(order_id: str, step: str) -> str:
    """The stable key a downstream uses to drop a repeat of the same effect."""
    return f"{order_id}:{step}"


async def load_step(session: AsyncSession, order_id: str, step: str) -> tuple[Order, OrderStep]:
    row = (await session.execute(STEP_ROW, {"b_order_id": order_id, "b_step": step})).first()
    if row is None:
        raise LookupError(f"order {order_id} has no step {step}")
    return row[0], row[1]


async def begin_attempt(
    sessions: async_sessionmaker[AsyncSession], input: StepInput, step: str, attempt: int
) -> tuple[Order, OrderStep]:
    """What every step attempt does first: a redrive's first attempt marks its dead letter
    `retrying`; then the order and the step's ledger row are read, read-only, so on SQLite the
    read neither waits for writers nor holds them up."""
    if input.redrive_of is not None and attempt == 1:
        async with sessions.begin() as session:
            await mark_redrive_started(session, input.redrive_of)
    async with read_session(sessions) as session:
        return await load_step(session, input.order_id, step)


async def mark_redrive_started(session: AsyncSession, dead_letter_id: int) -> None:
    await session.execute(
        update(DeadLetter)
        .where(DeadLetter.id == dead_letter_id, DeadLetter.status == DeadLetterStatus.OPEN)
        .values(status=DeadLetterStatus.RETRYING, updated_at=utcnow())
    )


async def record_failed_attempt(
    sessions: async_sessionmaker[AsyncSession], order_id: str, step: str, attempt: int, error: str
) -> None:
    async with sessions.begin() as session:
        await session.execute(
            update(OrderStep)
            .where(OrderStep.order_id == order_id, OrderStep.step == step)
            .values(
                attempts=OrderStep.attempts + 1,
                occurrence_attempts=attempt,
                last_error=error[:2000],
                updated_at=utcnow(),
            )
        )


async def record_success(
    session: AsyncSession, order_id: str, step: str, attempt: int, outcome: dict[str, Any]
) -> None:
    now = utcnow()
    params = {
        "b_order_id": order_id,
        "b_step": step,
        "b_attempt": attempt,
        "b_outcome": outcome,
        "b_now": now,
    }
    # A first-time success has no dead letter to resolve, which spares a statement.
    first_time = await session.execute(FIRST_SUCCESS, params, execution_options=NO_SYNC)
    if _rowcount(first_time) == 1:
        await refresh_order_status(session, order_id)
        return
    await session.execute(STEP_SUCCEEDED, params, execution_options=NO_SYNC)
    await session.execute(
        update(DeadLetter)
        .where(
            DeadLetter.order_id == order_id,
            DeadLetter.step == step,
            DeadLetter.status.in_(ACTIVE_DEAD_LETTER),
        )
        .values(
            status=DeadLetterStatus.RESOLVED,
            resolution=DeadLetterResolution.SUCCEEDED,
            resolved_at=now,
            updated_at=now,
        ),
        execution_options=NO_SYNC,
    )
    await refresh_order_status(session, order_id)


async def set_step_status(session: AsyncSession, order_id: str, step: str, status: str) -> None:
    await session.execute(
        update(OrderStep)
        .where(OrderStep.order_id == order_id, OrderStep.step == step)
        .values(status=status, updated_at=utcnow())
    )
    await refresh_order_status(session, order_id)


async def refresh_order_status(session: AsyncSession, order_id: str) -> str:
    """Derives the order's status from its steps, so the row never disagrees with them."""
    # Two statements, not one join: on PostgreSQL (READ COMMITTED) the steps must be read after
    # the order's lock is granted, so a concurrent refresh's committed step is seen; a joined
    # SELECT ... FOR UPDATE would read them from its snapshot taken before it waited.
    # Columns, not the Order entity: this runs on every step success, and building the entity
    # (its JSON items included) and flushing it cost more than the statements themselves.
    order = (await session.execute(ORDER_STATUS_FOR_UPDATE, {"b_order_id": order_id})).first()
    if order is None:
        raise LookupError(f"order {order_id} does not exist")
    statuses = (await session.scalars(STEP_STATUSES, {"b_order_id": order_id})).all()
    status = overall_status(statuses, cancelled=order.cancelled_at is not None)
    if order.status != status:
        # Default synchronisation: an Order a caller holds in this session sees the new status.
        await session.execute(
            update(Order).where(Order.id == order_id).values(status=status, updated_at=utcnow())
        )
    return status


def _rowcount(result: Any) -> int:
    return int(result.rowcount)
