"""Bulk retries started from the review page, each a RedriveWorkflow. A group's redrive takes an
ID derived from the group, so Temporal itself refuses a second one while the first runs, whichever
API process the click reaches, and the page asks Temporal which groups are being redriven."""

from __future__ import annotations

import asyncio
import hashlib

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from core.redrives import REDRIVE_ID_PREFIX, RedriveFilter, start_redrive

# A recovered receiver sees at most this many redriven orders a second (each redrive is two side
# effects at most), and one click moves at most BULK_LIMIT.
BULK_PER_SECOND = 5.0
BULK_LIMIT = 1000

# A group of open dead letters: (step, error type).
Group = tuple[str, str]


def group_redrive_id(step: str, error_type: str) -> str:
    digest = hashlib.sha256(f"{step}\0{error_type}".encode()).hexdigest()
    return f"{REDRIVE_ID_PREFIX}{digest[:32]}"


class PageRedrives:
    def __init__(self, client: Client, task_queue: str) -> None:
        self._client = client
        self._task_queue = task_queue

    async def start(self, step: str, error_type: str) -> str | None:
        """Starts redriving the group's open letters; None while its redrive still runs."""
        try:
            return await start_redrive(
                self._client,
                self._task_queue,
                RedriveFilter(step=step, error_type=error_type, order_ids=[]),
                per_second=BULK_PER_SECOND,
                limit=BULK_LIMIT,
                redrive_id=group_redrive_id(step, error_type),
            )
        except WorkflowAlreadyStartedError:
            return None

    async def running(self, groups: list[Group]) -> set[Group]:
        """The groups whose redrive has not finished. A page that cannot ask Temporal still
        shows the letters; it just marks no group as being redriven."""
        statuses = await asyncio.gather(*(self._status(group) for group in groups))
        return {
            group
            for group, status in zip(groups, statuses, strict=True)
            if status == WorkflowExecutionStatus.RUNNING
        }

    async def _status(self, group: Group) -> WorkflowExecutionStatus | None:
        handle = self._client.get_workflow_handle(group_redrive_id(*group))
        try:
            return (await handle.describe()).status
        except RPCError:
            return None
