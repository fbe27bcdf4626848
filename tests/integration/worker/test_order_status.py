"""The order's row keeps the status its steps give it: refreshing it in the transaction that
changed a step writes what the steps and the cancel derive, against the real database. The
derivation's whole table is tests/unit/test_order_status.py's."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.models import Order, OrderStep, utcnow
from core.order_status import refresh_order_status, set_step_status
from core.states import OrderStatus, Step, StepStatus
from tests.support import order_row, unique_email

Sessions = async_sessionmaker[AsyncSession]
RECEIPT, WAREHOUSE = Step.SEND_RECEIPT.value, Step.NOTIFY_WAREHOUSE.value


async def new_order(
    sessions: Sessions, receipt: str, warehouse: str, cancelled_at: datetime | None = None
) -> str:
    order = order_row(unique_email())
    order.cancelled_at = cancelled_at
    async with sessions() as session, session.begin():
        session.add(order)
        await session.flush()
        session.add_all(
            [
                OrderStep(order_id=order.id, step=RECEIPT, status=receipt),
                OrderStep(order_id=order.id, step=WAREHOUSE, status=warehouse),
            ]
        )
    return order.id


async def stored_status(sessions: Sessions, order_id: str) -> str:
    async with sessions() as session:
        return (await session.scalars(select(Order.status).where(Order.id == order_id))).one()


@pytest.mark.parametrize(
    ("receipt", "warehouse", "cancelled", "status"),
    [
        (StepStatus.PENDING, StepStatus.PENDING, False, OrderStatus.PROCESSING),
        (StepStatus.SUCCEEDED, StepStatus.SUCCEEDED, False, OrderStatus.COMPLETED),
        (StepStatus.SUCCEEDED, StepStatus.DISCARDED, False, OrderStatus.COMPLETED),
        (StepStatus.SUCCEEDED, StepStatus.DEAD_LETTERED, False, OrderStatus.NEEDS_ATTENTION),
        (StepStatus.SUCCEEDED, StepStatus.SKIPPED, True, OrderStatus.CANCELLED),
        (StepStatus.DEAD_LETTERED, StepStatus.SKIPPED, True, OrderStatus.NEEDS_ATTENTION),
    ],
)
async def test_refreshing_writes_what_the_steps_and_the_cancel_derive(
    sessions: Sessions, receipt: str, warehouse: str, cancelled: bool, status: OrderStatus
) -> None:
    order_id = await new_order(sessions, receipt, warehouse, utcnow() if cancelled else None)
    async with sessions() as session, session.begin():
        assert await refresh_order_status(session, order_id) == status
    assert await stored_status(sessions, order_id) == status


async def test_a_step_changed_changes_the_order_in_the_same_transaction(
    sessions: Sessions,
) -> None:
    order_id = await new_order(sessions, StepStatus.SUCCEEDED, StepStatus.PENDING)
    async with sessions() as session, session.begin():
        held = await session.get(Order, order_id)
        assert held is not None and held.status == OrderStatus.PROCESSING
        await set_step_status(session, order_id, WAREHOUSE, StepStatus.DEAD_LETTERED)
        # An Order the caller holds in the session sees the new status before the commit.
        assert held.status == OrderStatus.NEEDS_ATTENTION
    assert await stored_status(sessions, order_id) == OrderStatus.NEEDS_ATTENTION
    async with sessions() as session, session.begin():
        await set_step_status(session, order_id, WAREHOUSE, StepStatus.DISCARDED)
    assert await stored_status(sessions, order_id) == OrderStatus.COMPLETED


async def test_a_rolled_back_step_change_leaves_the_order_as_it_was(sessions: Sessions) -> None:
    order_id = await new_order(sessions, StepStatus.SUCCEEDED, StepStatus.PENDING)
    with pytest.raises(RuntimeError):
        async with sessions() as session, session.begin():
            await set_step_status(session, order_id, WAREHOUSE, StepStatus.SUCCEEDED)
            raise RuntimeError("the transaction fails after the step changed")
    assert await stored_status(sessions, order_id) == OrderStatus.PROCESSING


async def test_refreshing_an_order_that_does_not_exist_says_so(sessions: Sessions) -> None:
    async with sessions() as session, session.begin():
        with pytest.raises(LookupError, match="no-such-order"):
            await refresh_order_status(session, "no-such-order")
