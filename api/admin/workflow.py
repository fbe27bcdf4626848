"""What Temporal says about an order's workflow for its page: the run's status, the `status`
query, and the steps an operator paused. Asked with a short deadline: the page still renders,
saying why, when Temporal or the worker does not answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.api.enums.v1 import PendingActivityState
from temporalio.api.workflow.v1 import PendingActivityInfo
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.service import RPCError

from core.contracts import STEPS, OrderWorkflowStatus
from core.names import STATUS_QUERY

QUERY_TIMEOUT = timedelta(seconds=3)


@dataclass(frozen=True)
class PausedStep:
    """A step whose activity an operator paused (`temporal activity pause`). The ledger and the
    status query cannot tell it from a step waiting for its next retry; only Temporal knows."""

    activity_id: str
    # The activity's own attempt (the step's is one more after a local first attempt).
    attempt: int
    # False while an attempt that was already running when the pause came is finishing.
    settled: bool
    since: datetime | None
    by: str
    reason: str
    # The step's time budget keeps running while paused; an unpause after this instant makes
    # at most one more attempt before the step is dead-lettered.
    budget_ends: datetime | None


@dataclass(frozen=True)
class WorkflowView:
    status: OrderWorkflowStatus | None
    run_status: str | None
    problem: str | None
    paused: dict[str, PausedStep] = field(default_factory=dict)


def _paused_steps(described: WorkflowExecutionDescription) -> dict[str, PausedStep]:
    """The steps whose pending activity is paused, read from the describe the page makes anyway."""
    paused: dict[str, PausedStep] = {}
    for pending in described.raw_description.pending_activities:
        if pending.paused and pending.activity_type.name in STEPS:
            paused[pending.activity_type.name] = _paused_step(pending)
    return paused


def _paused_step(pending: PendingActivityInfo) -> PausedStep:
    info = pending.pause_info
    who = info.manual if info.HasField("manual") else info.rule
    return PausedStep(
        activity_id=pending.activity_id,
        attempt=pending.attempt,
        settled=pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_PAUSED,
        since=_timestamp(info, "pause_time"),
        by=who.identity,
        reason=who.reason,
        budget_ends=_timestamp(pending, "expiration_time"),
    )


def _timestamp(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    moment: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return moment


async def workflow_view(client: Client, workflow_id: str) -> WorkflowView:
    handle = client.get_workflow_handle(workflow_id)

    async def describe() -> WorkflowExecutionDescription:
        return await handle.describe(rpc_timeout=QUERY_TIMEOUT)

    async def query() -> OrderWorkflowStatus:
        status: OrderWorkflowStatus = await handle.query(
            STATUS_QUERY, result_type=OrderWorkflowStatus, rpc_timeout=QUERY_TIMEOUT
        )
        return status

    limit = QUERY_TIMEOUT.total_seconds() + 2
    described, queried = await asyncio.gather(
        asyncio.wait_for(describe(), limit),
        asyncio.wait_for(query(), limit),
        return_exceptions=True,
    )
    run_status = None
    paused: dict[str, PausedStep] = {}
    if isinstance(described, WorkflowExecutionDescription):
        if described.status is not None:
            run_status = described.status.name.lower()
        paused = _paused_steps(described)
    if isinstance(queried, OrderWorkflowStatus):
        return WorkflowView(queried, run_status, None, paused)
    expected = (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError, TimeoutError)
    if isinstance(queried, expected):
        problem = str(queried) or type(queried).__name__
        return WorkflowView(None, run_status, f"status query unavailable: {problem}", paused)
    raise queried
