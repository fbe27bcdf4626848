"""Bulk retries started from the review page. The page needs two things of them, `start` and
`running`; the lifespan builds one `BulkRedrives` and closes it on shutdown. Another
implementation (a durable workflow) can take its place behind those two methods."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from core.dead_letters import DeadLetterFilter, DeadLetterOperator
from core.models import DeadLetterStatus

log = logging.getLogger(__name__)

# A recovered receiver sees at most this many redriven orders a second (each redrive is two side
# effects at most), and one click moves at most BULK_LIMIT.
BULK_PER_SECOND = 5.0
BULK_LIMIT = 1000

# A group of open dead letters: (step, error type).
Group = tuple[str, str]


class BulkRedrives:
    """Runs each bulk retry in the background of this API process, paced by
    DeadLetterOperator.retry_matching, so the browser gets its answer at once. One per group at
    a time; a second click while one runs is refused instead of doubling the pace."""

    def __init__(self, operator: DeadLetterOperator) -> None:
        self._operator = operator
        self._running: dict[Group, asyncio.Task[Any]] = {}

    def running(self) -> set[Group]:
        """The groups whose redrive has not finished."""
        return {group for group, task in self._running.items() if not task.done()}

    def start(self, step: str, error_type: str) -> bool:
        """Starts redriving the group's open letters; False if its redrive is still running."""
        group = (step, error_type)
        if group in self.running():
            return False
        where = DeadLetterFilter(status=DeadLetterStatus.OPEN, step=step, error_type=error_type)
        work = self._operator.retry_matching(where, per_second=BULK_PER_SECOND, limit=BULK_LIMIT)
        task = asyncio.create_task(work, name=f"admin bulk retry {group}")
        self._running[group] = task
        task.add_done_callback(lambda done: self._finished(group, done))
        return True

    async def aclose(self) -> None:
        """Stops the redrives still running: the engine and client they use are closing."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _finished(self, group: Group, task: asyncio.Task[Any]) -> None:
        if self._running.get(group) is task:
            del self._running[group]
        if not task.cancelled() and task.exception() is not None:
            log.error("bulk retry of %s failed", group, exc_info=task.exception())
