"""The transactional outbox: an order's row and "start its workflow" commit together, and
whoever starts the workflow (the request, or the sweeper after a crash or an outage) marks it."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from core.models import WorkflowOutbox, utcnow
from core.temporal import start_order_workflow

log = logging.getLogger(__name__)


async def dispatch(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    order_id: str,
    task_queue: str,
    *,
    rpc_timeout: timedelta | None = None,
) -> bool:
    """Starts the order's workflow and marks its outbox entry; False leaves it to the sweeper."""
    try:
        await start_order_workflow(client, order_id, task_queue, rpc_timeout=rpc_timeout)
    except Exception as failure:  # any failure means "not started yet"; the sweeper retries
        log.warning(
            "workflow start deferred to the sweeper",
            extra={"order_id": order_id, "error": f"{type(failure).__name__}: {failure}"},
        )
        async with sessions.begin() as session:
            await session.execute(
                update(WorkflowOutbox)
                .where(WorkflowOutbox.order_id == order_id)
                .values(
                    start_attempts=WorkflowOutbox.start_attempts + 1,
                    last_error=f"{type(failure).__name__}: {failure}"[:2000],
                )
            )
        return False
    async with sessions.begin() as session:
        await session.execute(
            update(WorkflowOutbox)
            .where(WorkflowOutbox.order_id == order_id, WorkflowOutbox.started_at.is_(None))
            .values(started_at=utcnow(), start_attempts=WorkflowOutbox.start_attempts + 1)
        )
    return True


async def sweep_once(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    task_queue: str,
    *,
    grace: timedelta,
    batch: int,
) -> int:
    """Starts the workflows that nobody confirmed within the grace period; returns how many."""
    cutoff = utcnow() - grace
    async with sessions() as session:
        order_ids = (
            await session.scalars(
                select(WorkflowOutbox.order_id)
                .where(WorkflowOutbox.started_at.is_(None), WorkflowOutbox.created_at <= cutoff)
                .order_by(WorkflowOutbox.created_at)
                .limit(batch)
            )
        ).all()
    started = 0
    for order_id in order_ids:
        if await dispatch(sessions, client, order_id, task_queue, rpc_timeout=timedelta(seconds=5)):
            started += 1
    return started


async def run_sweeper(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    task_queue: str,
    *,
    grace: timedelta,
    interval: timedelta,
    batch: int,
) -> None:
    while True:
        try:
            started = await sweep_once(sessions, client, task_queue, grace=grace, batch=batch)
            if started:
                log.info("sweeper started workflows", extra={"count": started})
        except Exception:
            log.exception("outbox sweep failed; trying again next interval")
        await asyncio.sleep(interval.total_seconds())
