"""The transactional outbox's writes after the commit: an order's entry ("start its workflow")
commits with the order, and whoever starts the workflow (the API's dispatcher, or the worker's
relay: core/relay.py) marks it started, or counts the failed start and keeps why. Entries are
marked, never deleted here; the retention cleanup deletes the started ones later."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.models import WorkflowOutbox, utcnow


class OutboxMarks(Protocol):
    """Where a start's outcome is marked: at once, in a batch, or in the caller's transaction."""

    async def started(self, order_id: str) -> None: ...

    async def failed(self, order_id: str, error: str) -> None: ...


async def mark_started(session: AsyncSession, order_ids: Sequence[str]) -> None:
    await session.execute(
        update(WorkflowOutbox)
        .where(WorkflowOutbox.order_id.in_(order_ids), WorkflowOutbox.started_at.is_(None))
        .values(started_at=utcnow(), start_attempts=WorkflowOutbox.start_attempts + 1),
        execution_options={"synchronize_session": False},
    )


async def mark_failed(session: AsyncSession, order_id: str, error: str) -> None:
    await session.execute(
        update(WorkflowOutbox)
        .where(WorkflowOutbox.order_id == order_id)
        .values(start_attempts=WorkflowOutbox.start_attempts + 1, last_error=error[:2000])
    )


class StartMarks:
    """The API's marks. Started entries are marked in batches: one transaction for every start
    that finished while the previous batch was being written, instead of one per order. Under
    load that takes a write transaction off most requests; alone, an order is marked at once. A
    failed start is rare, and marked in a transaction of its own."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        # The batch still taking order IDs, and the task that will write it.
        self._gathering: tuple[list[str], asyncio.Task[None]] | None = None
        self._last: asyncio.Task[None] | None = None

    async def started(self, order_id: str) -> None:
        """Returns once the entry is marked, or raises what writing its batch raised."""
        if self._gathering is None or self._gathering[1].done():
            order_ids: list[str] = []
            batch = asyncio.create_task(
                self._write(order_ids, after=self._last), name="outbox-start-marks"
            )
            # A failure is raised to the batch's waiters; this keeps asyncio from reporting it
            # once more as never retrieved when every one of them had stopped waiting.
            batch.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._gathering = (order_ids, batch)
            self._last = batch
        order_ids, batch = self._gathering
        order_ids.append(order_id)
        # Shielded: a request that stops waiting must not cancel the others' batch.
        await asyncio.shield(batch)

    async def failed(self, order_id: str, error: str) -> None:
        async with self._sessions.begin() as session:
            await mark_failed(session, order_id, error)

    async def _write(self, order_ids: list[str], *, after: asyncio.Task[None] | None) -> None:
        if after is not None:
            # One batch at a time; how the previous one ended is its own waiters' to hear.
            await asyncio.wait({after})
        self._gathering = None  # the starts finishing from now on gather for the next batch
        async with self._sessions.begin() as session:
            await mark_started(session, order_ids)
