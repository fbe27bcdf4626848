"""The relay: takes orders from the outbox to Temporal. `start_order` is the one start path, an
order's workflow started and its outbox entry marked: the API's dispatcher calls it right after
the commit, and the worker's relay loop (`run_relay`) for every entry nobody started. In "outbox"
mode the loop starts every order, at once; in the other modes it starts the orders whose start
from the API failed (Temporal down, the API killed), once they are older than a grace period.

Starting twice is harmless (the workflow ID is the order ID, USE_EXISTING), so the relay may run
in every worker process. On PostgreSQL a pass claims its batch with FOR UPDATE SKIP LOCKED so two
relays split the work instead of both starting it; SQLite has no row locks, and holding its
database-wide write lock across Temporal calls would stall intake, so there concurrent relays may
both start an order, which the workflow ID makes a no-op.

Outages are logged once per burst (core/outages.py): Temporal being down defers every start of
the burst, and the database being down pauses the loop, which backs off until it is back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

from core.contracts import StepPolicy
from core.models import WorkflowOutbox, utcnow
from core.outages import (
    DATABASE,
    DATABASE_ERRORS,
    TEMPORAL,
    OutageLog,
    is_database_outage,
    is_temporal_outage,
)
from core.outbox import OutboxMarks, mark_failed, mark_started
from core.policy import step_policy
from core.settings import Settings
from core.temporal import start_order_workflow

log = logging.getLogger(__name__)

RELAY_START_TIMEOUT = timedelta(seconds=5)
# Starts a pass keeps in flight at once: enough to hide the round trip, few enough not to
# crowd the worker's own polls on the same connection.
RELAY_CONCURRENCY = 16
# While the database is down the loop waits twice as long after each failed pass, up to this.
MAX_OUTAGE_BACKOFF = timedelta(seconds=30)
TEMPORAL_MEANWHILE = "the relay leaves workflow starts in the outbox until it is back"
# What a call to Temporal raises when it did not go through; see from_temporal.
TEMPORAL_CALL_ERRORS = (RPCError, RuntimeError)


async def start_order(
    client: Client,
    order_id: str,
    task_queue: str,
    marks: OutboxMarks,
    *,
    outage: OutageLog,
    policy: StepPolicy | None = None,
    rpc_timeout: timedelta | None = None,
    eager: bool = False,
) -> bool:
    """Starts the order's workflow and marks its outbox entry through `marks`; False when
    Temporal did not take the start, which leaves the entry pending for the relay's next pass.
    `outage` is the caller's Temporal burst: a start that fails because Temporal is down is
    counted there, not logged on its own."""
    try:
        await start_order_workflow(
            client, order_id, task_queue, policy=policy, rpc_timeout=rpc_timeout, eager=eager
        )
    except TEMPORAL_CALL_ERRORS as failure:
        if not from_temporal(failure):
            raise
        error = f"{type(failure).__name__}: {failure}"
        if is_temporal_outage(failure):
            outage.failed(failure)
        else:
            log.warning(
                "workflow start refused; left in the outbox",
                extra={"order_id": order_id, "error": error},
            )
        await marks.failed(order_id, error)
        return False
    outage.succeeded()
    await marks.started(order_id)
    return True


def from_temporal(failure: BaseException) -> bool:
    """Whether a TEMPORAL_CALL_ERRORS came from Temporal (an RPC error, or a lazy client that
    never reached the server), not from a bug of ours."""
    return isinstance(failure, RPCError) or is_temporal_outage(failure)


@dataclass
class _PassMarks:
    """One pass's outcomes, written together in the pass's own transaction (on PostgreSQL the
    one that holds the claim)."""

    started_ids: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    async def started(self, order_id: str) -> None:
        self.started_ids.append(order_id)

    async def failed(self, order_id: str, error: str) -> None:
        self.errors[order_id] = error

    async def write(self, session: AsyncSession) -> None:
        if self.started_ids:
            await mark_started(session, self.started_ids)
        for order_id, error in self.errors.items():
            await mark_failed(session, order_id, error)


@dataclass(frozen=True)
class RelayPass:
    found: int
    started: int
    # Entries left for a later pass because the server's backlog was full.
    held: int = 0
    # The pass looked at nothing: this process's worker had no room.
    saturated: bool = False


def _pending(grace: timedelta, batch: int) -> Select[str]:
    # Fewest attempts first, so an entry that keeps failing cannot hold the others back.
    return (
        select(WorkflowOutbox.order_id)
        .where(WorkflowOutbox.started_at.is_(None), WorkflowOutbox.created_at <= utcnow() - grace)
        .order_by(WorkflowOutbox.start_attempts, WorkflowOutbox.created_at)
        .limit(batch)
    )


async def relay_once(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    task_queue: str,
    *,
    grace: timedelta,
    batch: int,
    rpc_timeout: timedelta = RELAY_START_TIMEOUT,
    eager: bool = False,
    max_backlog: int = 0,
    outage: OutageLog | None = None,
    worker_room: Callable[[], int] | None = None,
    policy: StepPolicy | None = None,
) -> RelayPass:
    """One pass: starts the workflows of up to `batch` entries that nobody confirmed within
    `grace`, and marks them: no more than `worker_room` says this process's worker would take
    now (core/admission.py; the backlog the server reports does not see the tasks a worker
    holds), and with `max_backlog` no more than keeps the server's backlog under it."""
    outage = outage or OutageLog(TEMPORAL, log, meanwhile=TEMPORAL_MEANWHILE)
    room = worker_room() if worker_room is not None else batch
    if room <= 0:
        return RelayPass(0, 0, 0, saturated=True)
    marks = _PassMarks()
    async with sessions.begin() as session:
        if session.get_bind().dialect.name != "sqlite":
            # The claim lasts until this transaction ends; a second relay skips these rows.
            claimed = (
                await session.scalars(_pending(grace, batch).with_for_update(skip_locked=True))
            ).all()
            admitted = await _admit(client, task_queue, claimed, max_backlog, room)
            await _start_in_waves(
                client, admitted, task_queue, marks, outage, rpc_timeout, eager, policy
            )
            await marks.write(session)
            return RelayPass(len(claimed), len(marks.started_ids), len(claimed) - len(admitted))
        order_ids = (await session.scalars(_pending(grace, batch))).all()

    admitted = await _admit(client, task_queue, order_ids, max_backlog, room)
    await _start_in_waves(client, admitted, task_queue, marks, outage, rpc_timeout, eager, policy)
    if marks.started_ids or marks.errors:
        async with sessions.begin() as session:
            await marks.write(session)
    return RelayPass(len(order_ids), len(marks.started_ids), len(order_ids) - len(admitted))


async def _admit(
    client: Client, task_queue: str, order_ids: Sequence[str], max_backlog: int, room: int
) -> Sequence[str]:
    """The entries to start now: with `max_backlog`, only as many as keep the server's backlog
    of workflow tasks on the queue under it, and this worker's slots (`room`) busy. A task the
    server can hand straight to a waiting poller costs it far less than one it must store and
    fetch again, and orders waiting in the outbox cost it nothing."""
    if not max_backlog or not order_ids:
        return order_ids[:room]
    backlog = await workflow_task_backlog(client, task_queue)
    if backlog is None:
        return order_ids[:room]
    return order_ids[: min(max(0, max_backlog - backlog), room)]


async def workflow_task_backlog(client: Client, task_queue: str) -> int | None:
    """The server's approximate count of workflow tasks waiting on the queue, or None when it
    does not say (an older server, no permission to describe the queue, or no answer: the
    starts that follow find out, and count the outage)."""
    try:
        described = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                report_stats=True,
            ),
            timeout=RELAY_START_TIMEOUT,
        )
    except TEMPORAL_CALL_ERRORS as failure:
        if not from_temporal(failure):
            raise
        return None
    if not described.HasField("stats"):
        return None
    return int(described.stats.approximate_backlog_count)


async def _start_in_waves(
    client: Client,
    order_ids: Sequence[str],
    task_queue: str,
    marks: _PassMarks,
    outage: OutageLog,
    rpc_timeout: timedelta,
    eager: bool,
    policy: StepPolicy | None,
) -> None:
    """Starts the first order alone, then the rest RELAY_CONCURRENCY at a time; stops after the
    first wave in which a start failed: Temporal is most likely unreachable, and every other
    start would only wait out its own timeout."""
    waves = [order_ids[:1]] + [
        order_ids[i : i + RELAY_CONCURRENCY] for i in range(1, len(order_ids), RELAY_CONCURRENCY)
    ]
    for wave in waves:
        await asyncio.gather(
            *(
                start_order(
                    client,
                    order_id,
                    task_queue,
                    marks,
                    outage=outage,
                    policy=policy,
                    rpc_timeout=rpc_timeout,
                    eager=eager,
                )
                for order_id in wave
            )
        )
        if marks.errors:
            break


async def run_relay(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    worker_room: Callable[[], int] | None = None,
) -> None:
    """The worker's relay loop, until `stop` is set. A pass in progress finishes first, because
    cancelling one mid-query breaks its database connection (asyncpg logs it).

    In "outbox" mode it is the only thing that starts workflows: no grace, a pass every
    OUTBOX_RELAY_INTERVAL_SECONDS, at most OUTBOX_RELAY_MAX_BACKLOG tasks waiting on the server
    and no more than this process's worker has room for (`worker_room`), and eager starts
    (the worker's own client polls the task queue, so the first workflow task comes back with
    the start instead of through a poll). In the other modes it is the safety
    net: entries older than OUTBOX_GRACE_SECONDS, a pass every OUTBOX_SWEEP_INTERVAL_SECONDS.
    Either way a full batch is followed by the next pass at once, and a pass in which a start
    failed by one after OUTBOX_SWEEP_INTERVAL_SECONDS.

    A database outage ends no loop: it is logged once, the passes back off (doubling up to
    MAX_OUTAGE_BACKOFF) and go back to their pace at the first one that gets through."""
    stop = stop or asyncio.Event()
    outbox_mode = settings.WORKFLOW_START_MODE == "outbox"
    grace = timedelta(seconds=0 if outbox_mode else settings.OUTBOX_GRACE_SECONDS)
    failure_interval = timedelta(seconds=settings.OUTBOX_SWEEP_INTERVAL_SECONDS)
    interval = (
        timedelta(seconds=settings.OUTBOX_RELAY_INTERVAL_SECONDS)
        if outbox_mode
        else failure_interval
    )
    batch = settings.OUTBOX_SWEEP_BATCH
    policy = step_policy(settings)
    database = OutageLog(DATABASE, log, meanwhile="the relay backs off until it is back")
    temporal = OutageLog(TEMPORAL, log, meanwhile=TEMPORAL_MEANWHILE)
    while not stop.is_set():
        wait = interval
        try:
            relayed = await relay_once(
                sessions,
                client,
                settings.TEMPORAL_TASK_QUEUE,
                grace=grace,
                batch=batch,
                eager=outbox_mode,
                max_backlog=settings.OUTBOX_RELAY_MAX_BACKLOG if outbox_mode else 0,
                outage=temporal,
                # The safety net's starts are few, and go wherever a worker polls.
                worker_room=worker_room if outbox_mode else None,
                policy=policy,
            )
            database.succeeded()
            if relayed.started and grace:  # in outbox mode starting workflows is routine
                log.info("relay started workflows", extra={"count": relayed.started})
            if relayed.started < relayed.found - relayed.held:
                wait = failure_interval
            elif relayed.found == batch and not relayed.held:
                continue
        except DATABASE_ERRORS as failure:
            wait = failure_interval
            if is_database_outage(failure):
                database.failed(failure)
                wait = min(MAX_OUTAGE_BACKOFF, wait * 2 ** min(database.failures - 1, 16))
            else:
                log.exception("relay pass failed; trying again next interval")
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait.total_seconds())
