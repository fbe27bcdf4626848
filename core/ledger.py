"""The per-step ledger every side effect shares: read whether it already happened, record an
attempt that failed, and record success only after the downstream accepted the effect."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.contracts import StepInput
from core.db import read_session
from core.dead_letters import mark_retrying, resolve_redriven
from core.models import Order, OrderStep, StepStatus, utcnow
from core.order_status import refresh_order_status

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
            await mark_retrying(session, input.redrive_of)
    async with read_session(sessions) as session:
        return await load_step(session, input.order_id, step)


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
    await resolve_redriven(session, order_id, step, now)
    await refresh_order_status(session, order_id)


def _rowcount(result: Any) -> int:
    return int(result.rowcount)
