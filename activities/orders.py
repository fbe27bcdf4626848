"""Changes to the order itself that its workflow decides on: recording a cancellation."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from core.cancellation import CANCELLABLE_STEPS, CancelVerdict, cancel_verdict
from core.contracts import CancelOrderInput, CancelOrderResult
from core.dead_letters import discard_active
from core.models import Order, OrderStep, utcnow
from core.order_status import refresh_order_status
from core.states import CancelOutcome, StepStatus


class OrderActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    @activity.defn(name="cancel_order")
    async def cancel_order(self, input: CancelOrderInput) -> CancelOrderResult:
        """Records the cancel unless the warehouse already accepted the order. Idempotent."""
        async with self._sessions.begin() as session:
            order = await session.get(Order, input.order_id, with_for_update=True)
            if order is None:
                raise LookupError(f"order {input.order_id} does not exist")
            steps = (
                await session.scalars(
                    select(OrderStep).where(
                        OrderStep.order_id == order.id, OrderStep.step.in_(CANCELLABLE_STEPS)
                    )
                )
            ).all()
            verdict = cancel_verdict(order, steps)
            if verdict == CancelVerdict.ALREADY_CANCELLED:
                return CancelOrderResult(order.id, CancelOutcome.CANCELLED)
            if verdict == CancelVerdict.TOO_LATE:
                return CancelOrderResult(order.id, CancelOutcome.TOO_LATE)
            order.cancelled_at = utcnow()
            for step in steps:
                if step.status in (StepStatus.PENDING, StepStatus.DEAD_LETTERED):
                    step.status = StepStatus.SKIPPED
            reason = f"order cancelled{': ' + input.reason if input.reason else ''}"
            await discard_active(
                session, order.id, CANCELLABLE_STEPS, reason=reason, actor=input.actor
            )
            await session.flush()
            await refresh_order_status(session, order.id)
            return CancelOrderResult(order.id, CancelOutcome.CANCELLED)
