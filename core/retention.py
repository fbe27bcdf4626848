"""Retention: what the database forgets, and when. Idempotency keys go once their TTL is over (a
key seen again after that is a new request anyway), started outbox rows once their retention is
over (an unstarted one is never touched: it is an order waiting for its workflow). Orders, their
steps, charges and dead letters are the business record and are kept; Temporal forgets closed
workflows after the namespace's retention period (deploy/temporal/setup-namespace.sh).

The cleanup runs as a Temporal Schedule (RetentionWorkflow), created or updated by every worker at
start. Each DELETE takes at most one batch, in its own short transaction, so a run never holds a
long lock; it is idempotent, and runs from several processes at once split the rows between them
(PostgreSQL: FOR UPDATE SKIP LOCKED) or queue behind each other (SQLite: BEGIN IMMEDIATE)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Delete, and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from core.models import Base, IdempotencyKey, KeyState, WorkflowOutbox
from core.settings import Settings

log = logging.getLogger(__name__)

RETENTION_SCHEDULE_ID = "orderflow-retention"
RETENTION_WORKFLOW = "RetentionWorkflow"
# One activity deletes at most this many batches per table, so it ends well inside its timeout;
# the workflow runs it again while a table has more.
MAX_BATCHES_PER_RUN = 100
# Temporal's smallest catch-up window.
MIN_CATCHUP_WINDOW = timedelta(seconds=10)


@dataclass(frozen=True)
class RetentionInput:
    key_ttl_seconds: float
    outbox_retention_seconds: float
    batch: int
    max_batches: int = MAX_BATCHES_PER_RUN


@dataclass(frozen=True)
class Purged:
    idempotency_keys: int
    outbox_rows: int
    # True when a table still had expired rows after max_batches: the next run goes on.
    more: bool = False


def retention_input(settings: Settings) -> RetentionInput:
    return RetentionInput(
        key_ttl_seconds=settings.IDEMPOTENCY_KEY_TTL_SECONDS,
        outbox_retention_seconds=settings.OUTBOX_RETENTION_SECONDS,
        batch=settings.RETENTION_BATCH,
    )


def _expired_keys(now: datetime, ttl: timedelta) -> ColumnElement[bool]:
    # A key within its TTL, or one whose holder still has a live lease, is never deleted.
    return and_(
        IdempotencyKey.created_at <= now - ttl,
        or_(IdempotencyKey.state == KeyState.COMPLETED, IdempotencyKey.locked_until <= now),
    )


def _expired_outbox(now: datetime, retention: timedelta) -> ColumnElement[bool]:
    return and_(
        WorkflowOutbox.started_at.is_not(None), WorkflowOutbox.started_at <= now - retention
    )


def _delete_batch(
    session: AsyncSession,
    model: type[Base],
    column: InstrumentedAttribute[str],
    expired: ColumnElement[bool],
    batch: int,
) -> Delete:
    """DELETE ... WHERE pk IN (up to `batch` expired rows, found through the index on their
    time; the DELETE then reaches each by its primary key). On PostgreSQL the rows are locked as
    they are chosen: one a request holds (a key being taken over for a new use) is skipped, and
    one a request changed just before is checked afresh against the condition by the lock."""
    chosen = select(column).where(expired).limit(batch)
    if session.get_bind().dialect.name != "sqlite":
        chosen = chosen.with_for_update(skip_locked=True)
    return delete(model).where(column.in_(chosen.scalar_subquery()))


async def _purge_table(
    sessions: async_sessionmaker[AsyncSession],
    model: type[Base],
    column: InstrumentedAttribute[str],
    expired: ColumnElement[bool],
    batch: int,
    max_batches: int,
) -> tuple[int, bool]:
    total = 0
    for _ in range(max_batches):
        async with sessions.begin() as session:
            result = await session.execute(
                _delete_batch(session, model, column, expired, batch),
                execution_options={"synchronize_session": False},
            )
        deleted = int(getattr(result, "rowcount", 0) or 0)
        total += deleted
        if deleted < batch:
            return total, False
    return total, True


async def purge_expired(
    sessions: async_sessionmaker[AsyncSession], retention: RetentionInput, *, now: datetime
) -> Purged:
    """Deletes the idempotency keys and started outbox rows whose time is over at `now`."""
    keys, more_keys = await _purge_table(
        sessions,
        IdempotencyKey,
        IdempotencyKey.key,
        _expired_keys(now, timedelta(seconds=retention.key_ttl_seconds)),
        retention.batch,
        retention.max_batches,
    )
    outbox, more_outbox = await _purge_table(
        sessions,
        WorkflowOutbox,
        WorkflowOutbox.order_id,
        _expired_outbox(now, timedelta(seconds=retention.outbox_retention_seconds)),
        retention.batch,
        retention.max_batches,
    )
    return Purged(keys, outbox, more_keys or more_outbox)


def retention_schedule(settings: Settings, schedule_id: str, task_queue: str | None) -> Schedule:
    interval = settings.RETENTION_INTERVAL_SECONDS
    return Schedule(
        action=ScheduleActionStartWorkflow(
            RETENTION_WORKFLOW,
            retention_input(settings),
            # The schedule appends each run's time to this.
            id=schedule_id,
            task_queue=task_queue or settings.TEMPORAL_TASK_QUEUE,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=interval))]),
        # A run still going when the next is due makes that one pointless: skip it. Runs missed
        # while Temporal was down are not made up one by one: the next run deletes it all.
        policy=SchedulePolicy(
            overlap=ScheduleOverlapPolicy.SKIP,
            catchup_window=max(MIN_CATCHUP_WINDOW, timedelta(seconds=interval)),
        ),
    )


async def ensure_retention_schedule(
    client: Client,
    settings: Settings,
    *,
    schedule_id: str = RETENTION_SCHEDULE_ID,
    task_queue: str | None = None,
) -> None:
    """Creates the cleanup's schedule, or brings an existing one to the current settings: every
    worker calls it at start, and the last one started wins, which is the newest deploy. An
    operator's pause (and its note) is kept."""
    schedule = retention_schedule(settings, schedule_id, task_queue)
    try:
        await client.create_schedule(schedule_id, schedule)
        log.info("retention schedule %s created", schedule_id)
    except ScheduleAlreadyRunningError:

        def replace(current: ScheduleUpdateInput) -> ScheduleUpdate:
            schedule.state = current.description.schedule.state
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(schedule_id).update(replace)
