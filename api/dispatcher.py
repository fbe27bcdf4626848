"""Hands a committed order to Temporal: before the 202 ("request" mode), right after it
("background" mode), or not at all ("outbox" mode: the workers' relay starts it). Either way the
outbox entry is already committed, so a failure here only delays the start until the worker's
relay makes it."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from core.contracts import StepPolicy
from core.outages import DATABASE, DATABASE_ERRORS, TEMPORAL, OutageLog, is_database_outage
from core.outbox import StartMarks
from core.relay import start_order
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
        policy: StepPolicy,
    ) -> None:
        self._client = client
        self._task_queue = task_queue
        self._policy = policy
        self._mode = mode
        self._timeout = timeout
        self._in_flight: set[asyncio.Task[bool]] = set()
        # Concurrent starts share one transaction to mark their outbox entries.
        self._marks = StartMarks(sessions)
        self._temporal_outage = OutageLog(
            TEMPORAL, log, meanwhile="the relay starts the orders placed meanwhile"
        )
        self._database_outage = OutageLog(
            DATABASE, log, meanwhile="the relay marks the workflows started meanwhile"
        )

    async def submit(self, order_id: str) -> None:
        annotate_order(order_id)
        if self._mode == "outbox":
            return  # the workers' relay starts it from the committed outbox entry
        if self._mode == "request":
            await self._start(order_id)
            return
        task = asyncio.create_task(self._start(order_id), name=f"start-workflow-{order_id}")
        self._in_flight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[bool]) -> None:
        self._in_flight.discard(task)
        # Nobody awaits a background start: what escaped it (a bug) is reported here.
        if not task.cancelled() and (failure := task.exception()) is not None:
            log.error(
                "background workflow start failed",
                exc_info=failure,
                extra={"task": task.get_name()},
            )

    async def _start(self, order_id: str) -> bool:
        # The order is committed: the database failing while its outbox entry is marked must
        # not turn its 202 into a 500. The entry stays pending, and the relay starts (a no-op
        # when it runs already) and marks it.
        try:
            started = await start_order(
                self._client,
                order_id,
                self._task_queue,
                self._marks,
                outage=self._temporal_outage,
                policy=self._policy,
                rpc_timeout=self._timeout,
            )
        except DATABASE_ERRORS as failure:
            if is_database_outage(failure):
                self._database_outage.failed(failure)
            else:
                log.exception("could not mark the workflow start", extra={"order_id": order_id})
            return False
        self._database_outage.succeeded()
        return started

    async def aclose(self, grace: float = 5.0) -> None:
        """Gives background starts a moment to finish; any left over is the relay's."""
        if not self._in_flight:
            return
        _done, pending = await asyncio.wait(self._in_flight, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("left workflow starts to the relay", extra={"count": len(pending)})
