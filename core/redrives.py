"""Bulk redrives: the dataclasses RedriveWorkflow takes and answers, and the operator's side of
one (start it, read its progress, pause, resume or cancel it). The API, the CLI and the review
page all go through here; the redrive itself is a workflow, so it outlives the process that
started it and goes on after a worker restart.

A redrive takes the open dead letters that match its filter when it starts (letters opened later,
such as the next occurrence of one it redrove, are not its business), and sends each parked
order's workflow its `retry_step` update, at most `per_second` a second."""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError, RPCStatusCode

from core.outages import is_temporal_outage
from core.temporal import ensure_server_reachable, temporal_unavailable

REDRIVE_WORKFLOW = "RedriveWorkflow"
REDRIVE_ID_PREFIX = "redrive-"
REDRIVE_ID = re.compile(rf"^{REDRIVE_ID_PREFIX}[0-9a-f]{{32}}$")
PROGRESS_QUERY = "progress"
PAUSE, RESUME, CANCEL = "pause", "resume", "cancel"
# Where a redrive is: finding its letters, sending, paused, waiting for the outcomes of what it
# sent, or over (finished, or cancelled by an operator).
LISTING, SENDING, PAUSED, WAITING, FINISHED, CANCELLED = (
    "listing",
    "sending",
    "paused",
    "waiting_for_outcomes",
    "finished",
    "cancelled",
)
OVER = frozenset({FINISHED, CANCELLED})
# Letters per page the workflow reads, and its history length after which it continues as new:
# what the workflow holds and records stays bounded however many letters match.
PAGE_SIZE = 100
CONTINUE_AFTER_EVENTS = 4000
# A query or update is answered by a worker; with none polling, the caller is told instead.
ANSWER_TIMEOUT = timedelta(seconds=10)
# How the server says a query found no worker to answer it (a worker killed a moment ago still
# holds the workflow's sticky queue until the server gives up on it).
UNANSWERED = frozenset({RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED})


@dataclass(frozen=True)
class RedriveFilter:
    step: str | None = None
    error_type: str | None = None
    order_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RedriveCounts:
    total: int = 0
    sent: int = 0
    resolved: int = 0
    failed_again: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class RedriveCarry:
    """What one run of the workflow hands the next when it continues as new."""

    cursor: int
    last_id: int
    counts: RedriveCounts
    # Letters sent whose outcome is not known yet.
    pending: list[int]
    paused: bool
    started_at: float
    next_due: float
    last_skips: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RedriveInput:
    filter: RedriveFilter
    per_second: float
    # At most this many letters (the oldest that match); None: all of them.
    limit: int | None = None
    page_size: int = PAGE_SIZE
    continue_after_events: int = CONTINUE_AFTER_EVENTS
    carried: RedriveCarry | None = None


@dataclass(frozen=True)
class RedriveProgress:
    redrive_id: str
    state: str
    total: int
    sent: int
    resolved: int
    failed_again: int
    skipped: int
    per_second: float
    filter: RedriveFilter
    started_at: float
    finished_at: float | None = None
    # The latest few letters skipped, each with why ("dead letter 7: ... is resolved").
    last_skips: list[str] = field(default_factory=list)


# The activities' inputs and answers.


@dataclass(frozen=True)
class SnapshotInput:
    filter: RedriveFilter
    limit: int | None


@dataclass(frozen=True)
class Snapshot:
    total: int
    # The highest letter ID the redrive takes: letters opened after it started are not its own.
    last_id: int


@dataclass(frozen=True)
class PageInput:
    filter: RedriveFilter
    after_id: int
    last_id: int
    size: int


@dataclass(frozen=True)
class Page:
    dead_letter_ids: list[int]


@dataclass(frozen=True)
class SendInput:
    redrive_id: str
    dead_letter_id: int


@dataclass(frozen=True)
class SendResult:
    sent: bool
    # Why it was skipped (the letter was no longer open, its workflow refused or closed).
    reason: str = ""


@dataclass(frozen=True)
class OutcomesInput:
    dead_letter_ids: list[int]


@dataclass(frozen=True)
class Outcomes:
    resolved: list[int]
    failed_again: list[int]


def retry_update_id(redrive_id: str, dead_letter_id: int) -> str:
    """The ID of the `retry_step` update a redrive sends for a letter: the same on every attempt,
    so Temporal takes a repeated send as the same update, and a retried send can find in the
    order's history whether the first one got there."""
    return f"{redrive_id}/dead-letter-{dead_letter_id}"


# --- the operator's side ------------------------------------------------------------------------


class RedriveNotFound(LookupError):
    pass


class RedriveRefused(Exception):
    """The redrive cannot take this command now (it is over)."""


class RedriveUnconfirmed(Exception):
    """No worker answered in time; a command may still be applied once one polls."""


def new_redrive_id() -> str:
    return f"{REDRIVE_ID_PREFIX}{uuid.uuid4().hex}"


async def start_redrive(
    client: Client,
    task_queue: str,
    where: RedriveFilter,
    *,
    per_second: float,
    limit: int | None = None,
    page_size: int = PAGE_SIZE,
    continue_after_events: int = CONTINUE_AFTER_EVENTS,
    redrive_id: str | None = None,
) -> str:
    """Starts a redrive on the orders' task queue; returns its ID (also its workflow ID). A
    given `redrive_id` that is still running refuses the start (WorkflowAlreadyStartedError)."""
    redrive_id = redrive_id or new_redrive_id()
    try:
        await client.start_workflow(
            REDRIVE_WORKFLOW,
            RedriveInput(
                filter=where,
                per_second=per_second,
                limit=limit,
                page_size=page_size,
                continue_after_events=continue_after_events,
            ),
            id=redrive_id,
            task_queue=task_queue,
            static_summary=_summary(where, per_second),
        )
    except Exception as failure:
        if not is_temporal_outage(failure):
            raise
        raise temporal_unavailable(failure) from failure
    return redrive_id


async def redrive_progress(client: Client, redrive_id: str) -> RedriveProgress:
    """Where the redrive is: asked of the workflow while it runs, read from its result after."""
    handle = _handle(client, redrive_id)
    try:
        described = await handle.describe(rpc_timeout=ANSWER_TIMEOUT)
        if described.status == WorkflowExecutionStatus.COMPLETED:
            return await handle.result(rpc_timeout=ANSWER_TIMEOUT)
        async with asyncio.timeout(ANSWER_TIMEOUT.total_seconds() + 2):
            progress: RedriveProgress = await handle.query(
                PROGRESS_QUERY, result_type=RedriveProgress, rpc_timeout=ANSWER_TIMEOUT
            )
        return progress
    except (TimeoutError, WorkflowQueryFailedError, RPCError) as silence:
        if isinstance(silence, RPCError) and silence.status not in UNANSWERED:
            raise _translated(silence, redrive_id) from silence
        await ensure_server_reachable(client, silence)
        raise RedriveUnconfirmed(
            f"no worker answered for redrive {redrive_id} within "
            f"{ANSWER_TIMEOUT.total_seconds():g} s: is a worker running?"
        ) from silence


async def pause_redrive(client: Client, redrive_id: str) -> RedriveProgress:
    """No more sends until resumed (a send already under way completes)."""
    return await _command(client, redrive_id, PAUSE)


async def resume_redrive(client: Client, redrive_id: str) -> RedriveProgress:
    return await _command(client, redrive_id, RESUME)


async def cancel_redrive(client: Client, redrive_id: str) -> RedriveProgress:
    """Stops the redrive for good: nothing more is sent, the letters not reached stay open."""
    return await _command(client, redrive_id, CANCEL)


async def _command(client: Client, redrive_id: str, update: str) -> RedriveProgress:
    handle = _handle(client, redrive_id)
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT.total_seconds()):
            progress: RedriveProgress = await handle.execute_update(
                update, result_type=RedriveProgress
            )
        return progress
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as silence:
        await ensure_server_reachable(client, silence)
        raise RedriveUnconfirmed(
            f"{update} of redrive {redrive_id} was not confirmed within "
            f"{ANSWER_TIMEOUT.total_seconds():g} s: is a worker running? It may still be "
            "applied when one is back."
        ) from silence
    except WorkflowUpdateFailedError as failure:
        reason = getattr(failure.cause, "message", None) or str(failure.cause)
        raise RedriveRefused(f"redrive {redrive_id} refused {update}: {reason}") from failure
    except RPCError as failure:
        raise _translated(failure, redrive_id) from failure


def _handle(client: Client, redrive_id: str) -> WorkflowHandle[object, RedriveProgress]:
    # Only redrive IDs: this must not become a way to query or update any workflow.
    if not REDRIVE_ID.match(redrive_id):
        raise RedriveNotFound(f"{redrive_id!r} is not a redrive ID")
    return client.get_workflow_handle(redrive_id, result_type=RedriveProgress)


def _translated(failure: RPCError, redrive_id: str) -> Exception:
    if is_temporal_outage(failure):
        return temporal_unavailable(failure)
    if failure.status == RPCStatusCode.NOT_FOUND:
        if "completed" in failure.message or "closed" in failure.message:
            return RedriveRefused(f"redrive {redrive_id} is over: {failure.message}")
        return RedriveNotFound(f"redrive {redrive_id} not found")
    return RedriveRefused(f"redrive {redrive_id}: {failure.message}")


def _summary(where: RedriveFilter, per_second: float) -> str:
    return f"redrive of {describe_filter(where)} at {per_second:g}/s"


def describe_filter(where: RedriveFilter) -> str:
    parts = [f"step {where.step}"] if where.step else []
    if where.error_type:
        parts.append(f"error {where.error_type}")
    if where.order_ids:
        parts.append(f"{len(where.order_ids)} order(s)")
    return "open dead letters" + (f" ({', '.join(parts)})" if parts else "")
