"""The transactional outbox: an order's row and "start its workflow" commit together, and
whoever starts the workflow (the request, or the sweeper after a crash or an outage) marks it.

Starting twice is harmless (the workflow ID is the order ID, USE_EXISTING), so the sweeper may run
in every worker process. On PostgreSQL a sweep claims its batch with FOR UPDATE SKIP LOCKED so two
sweepers split the work instead of both starting it; SQLite has no row locks, and holding its
database-wide write lock across Temporal calls would stall intake, so there concurrent sweepers may
both start an order, which the workflow ID makes a no-op."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Select, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

from core.models import WorkflowOutbox, utcnow
from core.outages import DATABASE, OutageLog, is_database_outage
from core.settings import Settings
from core.temporal import start_order_workflow

log = logging.getLogger(__name__)

SWEEP_START_TIMEOUT = timedelta(seconds=5)
# Starts a sweep keeps in flight at once: enough to hide the round trip, few enough not to
# crowd the worker's own polls on the same connection.
RELAY_CONCURRENCY = 16
# While the database is down a sweep waits twice as long after each failure, up to this.
MAX_OUTAGE_BACKOFF = timedelta(seconds=30)


async def dispatch(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    order_id: str,
    task_queue: str,
    *,
    marks: StartMarks,
    rpc_timeout: timedelta | None = None,
) -> bool:
    """Starts the order's workflow and marks its outbox entry; False leaves it to the sweeper.
    A successful start is marked through `marks`, together with the others finishing meanwhile."""
    error = await _start(client, order_id, task_queue, rpc_timeout)
    if error is None:
        await marks.mark(order_id)
        return True
    async with sessions.begin() as session:
        await _mark_failed(session, order_id, error)
    return False


class StartMarks:
    """Marks started outbox entries in batches: one transaction for every start that finished
    while the previous batch was being written, instead of one per order. Under load that takes
    a write transaction off most requests; alone, an order is marked at once."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._writer: asyncio.Task[None] | None = None

    def mark(self, order_id: str) -> asyncio.Future[None]:
        """Resolves once the entry is marked (or raises what the marking raised)."""
        future = self._waiting.get(order_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[order_id] = future
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="outbox-start-marks")
        return future

    async def _write(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, {}
            try:
                async with self._sessions.begin() as session:
                    await _mark_started(session, list(batch))
            except Exception as failure:
                for future in batch.values():
                    if not future.done():
                        future.set_exception(failure)
                continue
            for future in batch.values():
                if not future.done():
                    future.set_result(None)


async def _start(
    client: Client,
    order_id: str,
    task_queue: str,
    rpc_timeout: timedelta | None,
    eager: bool = False,
) -> str | None:
    """Starts the workflow; returns why it could not, or None once it runs (or ran)."""
    try:
        await start_order_workflow(
            client, order_id, task_queue, rpc_timeout=rpc_timeout, eager=eager
        )
    except Exception as failure:  # any failure means "not started yet"; the sweeper retries
        error = f"{type(failure).__name__}: {failure}"
        log.warning(
            "workflow start deferred to the sweeper", extra={"order_id": order_id, "error": error}
        )
        return error
    return None


async def _mark_failed(session: AsyncSession, order_id: str, error: str) -> None:
    await session.execute(
        update(WorkflowOutbox)
        .where(WorkflowOutbox.order_id == order_id)
        .values(start_attempts=WorkflowOutbox.start_attempts + 1, last_error=error[:2000])
    )


async def _mark_started(session: AsyncSession, order_ids: Sequence[str]) -> None:
    await session.execute(
        update(WorkflowOutbox)
        .where(WorkflowOutbox.order_id.in_(order_ids), WorkflowOutbox.started_at.is_(None))
        .values(started_at=utcnow(), start_attempts=WorkflowOutbox.start_attempts + 1),
        execution_options={"synchronize_session": False},
    )


def _pending(grace: timedelta, batch: int) -> Select[str]:
    # Fewest attempts first, so an entry that keeps failing cannot hold the others back.
    return (
        select(WorkflowOutbox.order_id)
        .where(WorkflowOutbox.started_at.is_(None), WorkflowOutbox.created_at <= utcnow() - grace)
        .order_by(WorkflowOutbox.start_attempts, WorkflowOutbox.created_at)
        .limit(batch)
    )


@dataclass(frozen=True)
class Sweep:
    found: int
    started: int
    # Entries left for a later sweep because the server's backlog was full.
    held: int = 0


async def sweep_once(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    task_queue: str,
    *,
    grace: timedelta,
    batch: int,
    rpc_timeout: timedelta = SWEEP_START_TIMEOUT,
    max_backlog: int = 0,
) -> int:
    """Starts the workflows that nobody confirmed within the grace period; returns how many this
    sweep started."""
    sweep = await _sweep(
        sessions,
        client,
        task_queue,
        grace,
        batch,
        rpc_timeout,
        eager=False,
        max_backlog=max_backlog,
    )
    return sweep.started


async def _sweep(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    task_queue: str,
    grace: timedelta,
    batch: int,
    rpc_timeout: timedelta,
    *,
    eager: bool,
    max_backlog: int = 0,
) -> Sweep:
    async with sessions.begin() as session:
        if session.get_bind().dialect.name != "sqlite":
            # The claim lasts until this transaction ends; a second sweeper skips these rows.
            claimed = (
                await session.scalars(_pending(grace, batch).with_for_update(skip_locked=True))
            ).all()
            admitted = await _admit(client, task_queue, claimed, max_backlog)
            started, failed = await _start_in_waves(
                client, admitted, task_queue, rpc_timeout, eager
            )
            await _mark_all(session, started, failed)
            return Sweep(len(claimed), len(started), len(claimed) - len(admitted))
        order_ids = (await session.scalars(_pending(grace, batch))).all()

    admitted = await _admit(client, task_queue, order_ids, max_backlog)
    started, failed = await _start_in_waves(client, admitted, task_queue, rpc_timeout, eager)
    if started or failed:
        async with sessions.begin() as session:
            await _mark_all(session, started, failed)
    return Sweep(len(order_ids), len(started), len(order_ids) - len(admitted))


async def _admit(
    client: Client, task_queue: str, order_ids: Sequence[str], max_backlog: int
) -> Sequence[str]:
    """The entries to start now: with `max_backlog`, only as many as keep the server's backlog
    of workflow tasks on the queue under it. A task the server can hand straight to a waiting
    poller costs it far less than one it must store and fetch again, and orders waiting in the
    outbox cost it nothing."""
    if not max_backlog or not order_ids:
        return order_ids
    backlog = await workflow_task_backlog(client, task_queue)
    if backlog is None:
        return order_ids
    return order_ids[: max(0, max_backlog - backlog)]


async def workflow_task_backlog(client: Client, task_queue: str) -> int | None:
    """The server's approximate count of workflow tasks waiting on the queue, or None when it
    does not say (an older server, or no permission to describe the queue)."""
    try:
        described = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                report_stats=True,
            ),
            timeout=SWEEP_START_TIMEOUT,
        )
    except RPCError:
        return None
    if not described.HasField("stats"):
        return None
    return int(described.stats.approximate_backlog_count)


async def _start_in_waves(
    client: Client,
    order_ids: Sequence[str],
    task_queue: str,
    rpc_timeout: timedelta,
    eager: bool,
) -> tuple[list[str], dict[str, str]]:
    """Starts the first order alone, then the rest RELAY_CONCURRENCY at a time; stops after the
    first wave in which a start failed: Temporal is most likely unreachable, and every other
    start would only wait out its own timeout."""
    started: list[str] = []
    failed: dict[str, str] = {}
    waves = [order_ids[:1]] + [
        order_ids[i : i + RELAY_CONCURRENCY] for i in range(1, len(order_ids), RELAY_CONCURRENCY)
    ]
    for wave in waves:
        errors = await asyncio.gather(
            *(_start(client, order_id, task_queue, rpc_timeout, eager) for order_id in wave)
        )
        for order_id, error in zip(wave, errors, strict=True):
            if error is None:
                started.append(order_id)
            else:
                failed[order_id] = error
        if failed:
            break
    return started, failed


async def _mark_all(session: AsyncSession, started: list[str], failed: dict[str, str]) -> None:
    if started:
        await _mark_started(session, started)
    for order_id, error in failed.items():
        await _mark_failed(session, order_id, error)


async def run_sweeper(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    task_queue: str,
    *,
    grace: timedelta,
    interval: timedelta,
    batch: int,
    failure_interval: timedelta | None = None,
    eager: bool = False,
    max_backlog: int = 0,
    stop: asyncio.Event | None = None,
) -> None:
    """Sweeps every interval until `stop` is set, at once again after a full batch, and after
    `failure_interval` (default: the interval) when a start failed. A sweep in progress finishes
    first, because cancelling one mid-query breaks its database connection (asyncpg logs it).

    With no grace and a short interval this is the relay of WORKFLOW_START_MODE=outbox: the
    only thing that starts workflows.

    A database outage ends no loop: it is logged once, the sweeps back off (doubling up to
    MAX_OUTAGE_BACKOFF) and go back to their pace at the first one that gets through."""
    stop = stop or asyncio.Event()
    outage = OutageLog(DATABASE, log, meanwhile="the outbox sweeper backs off until it is back")
    while not stop.is_set():
        wait = interval
        try:
            sweep = await _sweep(
                sessions,
                client,
                task_queue,
                grace,
                batch,
                SWEEP_START_TIMEOUT,
                eager=eager,
                max_backlog=max_backlog,
            )
            outage.succeeded()
            if sweep.started and grace:  # a relay (no grace) starting workflows is routine
                log.info("sweeper started workflows", extra={"count": sweep.started})
            if sweep.started < sweep.found - sweep.held:
                wait = failure_interval or interval
            elif sweep.found == batch and not sweep.held:
                continue
        except Exception as failure:
            wait = failure_interval or interval
            if is_database_outage(failure):
                outage.failed(failure)
                wait = min(MAX_OUTAGE_BACKOFF, wait * 2 ** min(outage.failures - 1, 16))
            else:
                log.exception("outbox sweep failed; trying again next interval")
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait.total_seconds())


async def run_configured_sweeper(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """The worker process's sweeper as the settings ask for it. In "outbox" mode it is the relay:
    no grace, the short relay interval, and eager starts (the worker's own client polls the task
    queue, so the first workflow task comes back with the start instead of through a poll)."""
    relay = settings.WORKFLOW_START_MODE == "outbox"
    sweep_interval = timedelta(seconds=settings.OUTBOX_SWEEP_INTERVAL_SECONDS)
    await run_sweeper(
        sessions,
        client,
        settings.TEMPORAL_TASK_QUEUE,
        grace=timedelta(seconds=0 if relay else settings.OUTBOX_GRACE_SECONDS),
        interval=(
            timedelta(seconds=settings.OUTBOX_RELAY_INTERVAL_SECONDS) if relay else sweep_interval
        ),
        failure_interval=sweep_interval,
        batch=settings.OUTBOX_SWEEP_BATCH,
        eager=relay,
        max_backlog=settings.OUTBOX_RELAY_MAX_BACKLOG if relay else 0,
        stop=stop,
    )
