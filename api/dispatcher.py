"""Hands a committed order to Temporal: before the 202 ("request" mode), right after it
("background" mode), or not at all ("outbox" mode: the workers' relay starts it). Either way the
outbox entry is already committed, so a failure here only delays the start until the worker's
sweeper makes it."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from core.outbox import StartMarks, dispatch
from core.tracing import annotate_order

log = logging.getLogger(__name__)


class WorkflowDispatcher:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        client: Client,
        task_queue: str,
        *,
        mode: str,
        timeout: timedelta,
    ) -> None:
        self._sessions = sessions
        self._client = client
        self._task_queue = task_queue
        self._mode = mode
        self._timeout = timeout
        self._in_flight: set[asyncio.Task[bool]] = set()
        # Concurrent starts share one transaction to mark their outbox entries.
        self._marks = StartMarks(sessions)

    async def submit(self, order_id: str) -> None:
        annotate_order(order_id)
        if self._mode == "outbox":
            return  # the workers' relay starts it from the committed outbox entry
        if self._mode == "request":
            await self._start(order_id)
            return
        task = asyncio.create_task(self._start(order_id), name=f"start-workflow-{order_id}")
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _start(self, order_id: str) -> bool:
        # The order is committed: whatever fails here (Temporal, or the database while marking
        # the outbox) must not turn its 202 into a 500. The entry stays pending for the sweeper.
        try:
            return await dispatch(
                self._sessions,
                self._client,
                order_id,
                self._task_queue,
                marks=self._marks,
                rpc_timeout=self._timeout,
            )
        except Exception:
            log.exception("could not dispatch the workflow start", extra={"order_id": order_id})
            return False

    async def aclose(self, grace: float = 5.0) -> None:
        """Gives background starts a moment to finish; any left over is the sweeper's."""
        if not self._in_flight:
            return
        _done, pending = await asyncio.wait(self._in_flight, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("left workflow starts to the sweeper", extra={"count": len(pending)})
