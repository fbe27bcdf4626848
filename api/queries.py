"""The reads behind the API's routes and the review page's pages, so no route holds SQL. The
dead letters' own listing is the operator's (`core/dead_letters.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.models import DeadLetter, DeadLetterStatus, Order, OrderStep


async def order_with_steps(
    session: AsyncSession, order_id: str
) -> tuple[Order, Sequence[OrderStep]] | None:
    """The order and its ledger rows in step order, or None if there is no such order."""
    order = await session.get(Order, order_id)
    if order is None:
        return None
    steps = (
        await session.scalars(
            select(OrderStep).where(OrderStep.order_id == order_id).order_by(OrderStep.step)
        )
    ).all()
    return order, steps


@dataclass(frozen=True)
class OpenGroup:
    """Open dead letters that share a step and an error type: one cause to triage."""

    step: str
    error_type: str
    count: int
    oldest: datetime | None


async def open_groups(session: AsyncSession) -> list[OpenGroup]:
    rows = (
        await session.execute(
            select(
                DeadLetter.step,
                DeadLetter.error_type,
                func.count(),
                func.min(DeadLetter.created_at),
            )
            .where(DeadLetter.status == DeadLetterStatus.OPEN)
            .group_by(DeadLetter.step, DeadLetter.error_type)
        )
    ).all()
    return [OpenGroup(step, error_type, count, oldest) for step, error_type, count, oldest in rows]


async def find_order_ids(session: AsyncSession, wanted: str) -> Sequence[str]:
    """`wanted` if it is an order's ID; else up to two IDs containing it, so a caller can tell
    "exactly one" from "several"."""
    if await session.get(Order, wanted) is not None:
        return [wanted]
    fragment = wanted.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return (
        await session.scalars(
            select(Order.id).where(Order.id.like(f"%{fragment}%", escape="\\")).limit(2)
        )
    ).all()
