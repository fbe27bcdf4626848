"""An order's status, derived from its steps: whoever changes a step's status refreshes the
order's in the same transaction, so the row never disagrees with its steps. The ledger and the
dead letters both change steps; this is what they share, so neither has to import the other's
whole module to keep the order right."""

from __future__ import annotations

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.contracts import overall_status
from core.models import Order, OrderStep, utcnow

# Built once: this runs on every step success, and building a statement costs more CPU than
# running it (SQLAlchemy caches the compiled form, not the construction).
ORDER_STATUS_FOR_UPDATE = (
    select(Order.status, Order.cancelled_at)
    .where(Order.id == bindparam("b_order_id"))
    .with_for_update()
)
STEP_STATUSES = select(OrderStep.status).where(OrderStep.order_id == bindparam("b_order_id"))


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
    # On the connection, as Core: the ORM's execution path costs more than these reads. Core
    # does not autoflush, so what the caller changed in the session is flushed first.
    await session.flush()
    connection = await session.connection()
    order = (await connection.execute(ORDER_STATUS_FOR_UPDATE, {"b_order_id": order_id})).first()
    if order is None:
        raise LookupError(f"order {order_id} does not exist")
    statuses = (await connection.execute(STEP_STATUSES, {"b_order_id": order_id})).scalars().all()
    status = overall_status(statuses, cancelled=order.cancelled_at is not None)
    if order.status != status:
        # Default synchronisation: an Order a caller holds in this session sees the new status.
        await session.execute(
            update(Order).where(Order.id == order_id).values(status=status, updated_at=utcnow())
        )
    return status
