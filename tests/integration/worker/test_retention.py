"""Retention: idempotency keys expire after their TTL (a key seen again after it is a new request)
and the cleanup deletes expired keys and started outbox rows in batches, keeping orders, charges,
dead letters and every unstarted outbox row. The clock is the test's: time moves by days without
sleeping. The cleanup's Temporal Schedule is triggered on the session's dev server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import ScheduleActionExecutionStartWorkflow, ScheduleIntervalSpec
from temporalio.testing import WorkflowEnvironment

from api.intake import OrderIntake
from api.schemas import OrderIn
from core.db import create_engine, create_sessionmaker, is_sqlite
from core.models import IdempotencyKey, KeyState, Order, PaymentCharge, WorkflowOutbox, utcnow
from core.payments import ChargeResult, GatewayUnavailable, PaymentGateway, SandboxGateway
from core.retention import Purged, RetentionInput, ensure_retention_schedule, purge_expired
from core.settings import Settings
from tests.conftest import running_worker
from tests.support import NetworkGateway, count_rows, new_key, order_body, wait_until
from workflows.retention import RetentionWorkflow

Sessions = async_sessionmaker[AsyncSession]
TTL = timedelta(hours=24)
OUTBOX_RETENTION = timedelta(hours=1)
RETENTION = RetentionInput(
    key_ttl_seconds=TTL.total_seconds(),
    outbox_retention_seconds=OUTBOX_RETENTION.total_seconds(),
    # Small, so that one cleanup run takes several batches.
    batch=32,
)
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


class Clock:
    """The intake's clock, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def own_sessions(own_database: str) -> AsyncIterator[Sessions]:
    """A database of the test's own, so that table sizes count only this test's rows."""
    engine = create_engine(Settings(DATABASE_URL=own_database, DATABASE_POOL_SIZE=3))
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


def intake_for(sessions: Sessions, clock: Clock, gateway: str = "in database") -> OrderIntake:
    charger: PaymentGateway = (
        SandboxGateway(sessions) if gateway == "in database" else NetworkGateway(sessions)
    )
    return OrderIntake(sessions, charger, timedelta(seconds=30), key_ttl=TTL, clock=clock)


async def table_sizes(sessions: Sessions) -> dict[str, int]:
    return {
        "idempotency_keys": await count_rows(sessions, IdempotencyKey),
        "outbox_started": await count_rows(
            sessions, WorkflowOutbox, WorkflowOutbox.started_at.is_not(None)
        ),
        "outbox_unstarted": await count_rows(
            sessions, WorkflowOutbox, WorkflowOutbox.started_at.is_(None)
        ),
        "orders": await count_rows(sessions, Order),
        "payment_charges": await count_rows(sessions, PaymentCharge),
    }


async def add_keys(
    sessions: Sessions,
    created_at: datetime,
    count: int = 1,
    *,
    locked_until: datetime | None = None,
    state: KeyState = KeyState.COMPLETED,
) -> list[str]:
    """Key rows as the intake leaves them, written straight in with the given age."""
    keys = [new_key() for _ in range(count)]
    async with sessions.begin() as session:
        session.add_all(
            IdempotencyKey(
                key=key,
                request_hash="0" * 64,
                state=state,
                locked_until=locked_until or created_at,
                created_at=created_at,
            )
            for key in keys
        )
    return keys


async def mark_started(sessions: Sessions, order_ids: list[str], at: datetime) -> None:
    async with sessions.begin() as session:
        await session.execute(
            update(WorkflowOutbox)
            .where(WorkflowOutbox.order_id.in_(order_ids))
            .values(started_at=at, start_attempts=1)
        )


async def uses_of(sessions: Sessions, key: str) -> tuple[list[str], int]:
    """The orders placed under this client key, oldest first, and how many charges they made."""
    async with sessions() as session:
        orders = (
            await session.execute(
                select(Order.id, Order.charge_id)
                .where(Order.idempotency_key.startswith(key[:200]))
                .order_by(Order.created_at)
            )
        ).all()
        charges = await session.scalar(
            select(func.count())
            .select_from(PaymentCharge)
            .where(PaymentCharge.id.in_([charge for _, charge in orders]))
        )
    return [order_id for order_id, _ in orders], int(charges or 0)


async def test_the_cleanup_keeps_keys_and_started_outbox_rows_bounded_day_after_day(
    own_sessions: Sessions,
) -> None:
    clock = Clock(T0)
    intake = intake_for(own_sessions, clock)
    per_day, unstarted_per_day, days = 100, 5, 4
    log: list[str] = []
    for day in range(days):
        # A day later than the TTL: yesterday's keys and started rows are all expired.
        clock.now = T0 + day * (TTL + timedelta(hours=1))
        placed = [
            await intake.place(new_key(), OrderIn.model_validate(order_body()))
            for _ in range(per_day)
        ]
        assert all(outcome.status_code == 202 for outcome in placed)
        order_ids = [outcome.new_order_id for outcome in placed if outcome.new_order_id]
        await mark_started(own_sessions, order_ids[unstarted_per_day:], clock.now)

        before = await table_sizes(own_sessions)
        purged = await purge_expired(own_sessions, RETENTION, now=clock.now)
        after = await table_sizes(own_sessions)
        log.append(f"day {day}: before {before} -> after {after}, deleted {purged}")

        expired_before = per_day if day else 0
        started_today = per_day - unstarted_per_day
        assert purged.idempotency_keys == expired_before
        assert purged.outbox_rows == (started_today if day else 0)
        assert not purged.more
        # Bounded: one day's keys and started rows, whatever the number of days.
        assert after["idempotency_keys"] == per_day
        assert after["outbox_started"] == started_today
        # Never touched: the orders waiting for their workflow, the orders and their charges.
        assert after["outbox_unstarted"] == unstarted_per_day * (day + 1)
        assert after["orders"] == after["payment_charges"] == per_day * (day + 1)

        again = await purge_expired(own_sessions, RETENTION, now=clock.now)
        assert (again.idempotency_keys, again.outbox_rows) == (0, 0), "idempotent"
    print("\n".join(log))


@pytest.mark.parametrize("gateway", ["in database", "across the network"])
async def test_a_key_replays_inside_its_ttl_and_is_a_new_request_after_it(
    own_sessions: Sessions, gateway: str
) -> None:
    clock = Clock(T0)
    intake = intake_for(own_sessions, clock, gateway)
    key, order = new_key(), OrderIn.model_validate(order_body())
    other = OrderIn.model_validate(order_body())

    first = await intake.place(key, order)
    assert first.status_code == 202 and first.new_order_id

    clock.now = T0 + TTL - timedelta(seconds=1)
    replay = await intake.place(key, order)
    assert replay.status_code == 202 and replay.new_order_id is None
    assert replay.body["order_id"] == first.new_order_id
    assert (await intake.place(key, other)).status_code == 422
    # The cleanup at the same moment keeps a key inside its TTL.
    await purge_expired(own_sessions, RETENTION, now=clock.now)
    assert (await intake.place(key, order)).body["order_id"] == first.new_order_id

    # Past the TTL: a new request, even with another body; the gateway charges it anew (the
    # charge is keyed by this new use, not by the first one, which the gateway still holds).
    clock.now = T0 + TTL + timedelta(seconds=1)
    second = await intake.place(key, other)
    assert second.status_code == 202 and second.new_order_id
    assert second.new_order_id != first.new_order_id
    clock.now += timedelta(minutes=5)
    replay = await intake.place(key, other)
    assert replay.new_order_id is None and replay.body["order_id"] == second.new_order_id
    # A key taken over for a new use is inside its TTL again: the cleanup keeps it.
    assert (await purge_expired(own_sessions, RETENTION, now=clock.now)).idempotency_keys == 0

    # The cleanup deletes the row once this use expired too; the key then starts a third use.
    clock.now = T0 + 3 * TTL
    assert (await purge_expired(own_sessions, RETENTION, now=clock.now)).idempotency_keys == 1
    third = await intake.place(key, order)
    assert third.status_code == 202 and third.new_order_id
    assert (await intake.place(key, order)).body["order_id"] == third.new_order_id

    orders, charges = await uses_of(own_sessions, key)
    assert orders == [first.new_order_id, second.new_order_id, third.new_order_id]
    assert charges == 3, "each use of the key charged once"
    async with own_sessions() as session:
        charge_ids = (
            await session.scalars(select(Order.charge_id).where(Order.id.in_(orders)))
        ).all()
    assert len(set(charge_ids)) == 3
    print(f"{gateway}: {len(orders)} orders, {charges} charges for one key used three times")


async def test_a_key_lost_inside_its_ttl_is_still_answered_from_its_order(
    own_sessions: Sessions,
) -> None:
    """The row of a key inside its TTL can vanish (the release interleaving); the order under
    the key is the same use, not a reuse, so it is the answer and nothing is charged."""
    clock = Clock(T0)
    intake = intake_for(own_sessions, clock)
    key, order = new_key(), OrderIn.model_validate(order_body())
    first = await intake.place(key, order)
    async with own_sessions.begin() as session:
        held = await session.get(IdempotencyKey, key)
        assert held is not None
        await session.delete(held)

    clock.now = T0 + TTL - timedelta(minutes=1)
    again = await intake.place(key, order)

    assert again.status_code == 202 and again.body["order_id"] == first.new_order_id
    assert await uses_of(own_sessions, key) == ([first.new_order_id], 1)


@pytest.mark.parametrize("gateway", ["in database", "across the network"])
async def test_concurrent_reuses_of_an_expired_key_charge_once(
    own_sessions: Sessions, gateway: str
) -> None:
    clock = Clock(T0)
    intake = intake_for(own_sessions, clock, gateway)
    key, order = new_key(), OrderIn.model_validate(order_body())
    first = await intake.place(key, order)

    clock.now = T0 + TTL + timedelta(minutes=1)
    outcomes = await asyncio.gather(*(intake.place(key, order) for _ in range(8)))

    assert {outcome.status_code for outcome in outcomes} <= {202, 409}
    created = [outcome.new_order_id for outcome in outcomes if outcome.new_order_id]
    assert len(created) == 1
    assert await uses_of(own_sessions, key) == ([first.new_order_id, created[0]], 2)


class LosesOneAnswer:
    """Charges, then loses the answer once, as a gateway timeout does: the charge happened but
    the intake cannot know it, frees the key and tells the client to retry."""

    def __init__(self, sessions: Sessions) -> None:
        self._sandbox = SandboxGateway(sessions)
        self.lose_next = False

    async def charge(
        self, amount_cents: int, currency: str, token: str, idempotency_key: str
    ) -> ChargeResult:
        charged = await self._sandbox.charge(amount_cents, currency, token, idempotency_key)
        if self.lose_next:
            self.lose_next = False
            raise GatewayUnavailable("the answer was lost")
        return charged


async def test_a_retry_of_a_reused_key_after_an_unknown_outcome_charges_once(
    own_sessions: Sessions,
) -> None:
    clock = Clock(T0)
    gateway = LosesOneAnswer(own_sessions)
    intake = OrderIntake(own_sessions, gateway, timedelta(seconds=30), key_ttl=TTL, clock=clock)
    key, order = new_key(), OrderIn.model_validate(order_body())
    first = await intake.place(key, order)

    clock.now = T0 + TTL + timedelta(minutes=1)
    gateway.lose_next = True
    lost = await intake.place(key, order)
    assert lost.status_code == 503
    # The retry presents the new use's charge key again, so the gateway replays that charge.
    retried = await intake.place(key, order)

    assert retried.status_code == 202 and retried.new_order_id
    assert await uses_of(own_sessions, key) == ([first.new_order_id, retried.new_order_id], 2)
    assert await count_rows(own_sessions, PaymentCharge) == 2


async def test_concurrent_cleanups_delete_each_row_once_and_keep_the_live_ones(
    own_sessions: Sessions,
) -> None:
    now = utcnow()
    old, fresh = now - TTL - timedelta(minutes=1), now - timedelta(minutes=1)
    await add_keys(own_sessions, old, 150)
    await add_keys(own_sessions, fresh, 20)
    # In flight with a live lease, though older than the TTL: its holder is still at work.
    await add_keys(
        own_sessions, old, state=KeyState.IN_FLIGHT, locked_until=now + timedelta(seconds=30)
    )

    runs = await asyncio.gather(
        *(purge_expired(own_sessions, RETENTION, now=now) for _ in range(3))
    )

    assert sum(run.idempotency_keys for run in runs) == 150
    assert await count_rows(own_sessions, IdempotencyKey) == 21
    print(f"3 concurrent cleanups deleted {[run.idempotency_keys for run in runs]} keys")


async def test_a_cleanup_run_stops_after_its_batches_and_says_there_is_more(
    own_sessions: Sessions,
) -> None:
    now = utcnow()
    await add_keys(own_sessions, now - TTL - timedelta(hours=1), 100)
    small = RetentionInput(TTL.total_seconds(), OUTBOX_RETENTION.total_seconds(), 30, 2)

    first = await purge_expired(own_sessions, small, now=now)
    assert (first.idempotency_keys, first.more) == (60, True)
    second = await purge_expired(own_sessions, small, now=now)
    assert (second.idempotency_keys, second.more) == (40, False)


async def test_one_cleanup_run_goes_on_until_the_tables_are_clean(
    env: WorkflowEnvironment, settings: Settings, own_database: str
) -> None:
    """More expired rows than one activity's batches take are all deleted by the same run, so
    the cleanup keeps up with a shop whatever its rate, not 1 activity per interval."""
    own = settings.model_copy(update={"DATABASE_URL": own_database})
    engine = create_engine(own)
    sessions = create_sessionmaker(engine)
    try:
        now = utcnow()
        await add_keys(sessions, now - TTL - timedelta(hours=1), 100)
        live = await add_keys(sessions, now, 5)
        small = RetentionInput(TTL.total_seconds(), OUTBOX_RETENTION.total_seconds(), 30, 2)
        async with running_worker(env.client, own, sessions):
            handle = await env.client.start_workflow(
                RetentionWorkflow.run,
                small,
                id=f"retention-run-{uuid.uuid4().hex[:12]}",
                task_queue=own.TEMPORAL_TASK_QUEUE,
            )
            purged = await handle.result()
        assert (purged.idempotency_keys, purged.more) == (100, False)
        assert await count_rows(sessions, IdempotencyKey) == len(live)
        purges = [
            event
            async for event in handle.fetch_history_events()
            if event.HasField("activity_task_scheduled_event_attributes")
        ]
        # 60 rows per activity (2 batches of 30): 60, then 40 and clean.
        assert len(purges) == 2
    finally:
        await engine.dispose()


async def test_the_schedule_is_created_once_and_its_run_cleans_up(
    env: WorkflowEnvironment, settings: Settings, own_database: str
) -> None:
    own = settings.model_copy(
        update={"DATABASE_URL": own_database, "RETENTION_INTERVAL_SECONDS": 3600.0}
    )
    engine = create_engine(own)
    sessions = create_sessionmaker(engine)
    schedule_id = f"retention-{uuid.uuid4().hex[:12]}"
    handle = env.client.get_schedule_handle(schedule_id)
    try:
        now = utcnow()
        [expired] = await add_keys(sessions, now - TTL - timedelta(hours=1))
        [live] = await add_keys(sessions, now)
        await ensure_retention_schedule(
            env.client, own, schedule_id=schedule_id, task_queue=own.TEMPORAL_TASK_QUEUE
        )
        # Again, as every worker start does: updated in place, not refused or doubled.
        await ensure_retention_schedule(
            env.client, own, schedule_id=schedule_id, task_queue=own.TEMPORAL_TASK_QUEUE
        )
        described = await handle.describe()
        assert described.schedule.spec.intervals == [ScheduleIntervalSpec(every=timedelta(hours=1))]
        assert described.schedule.policy.catchup_window == timedelta(hours=1)

        async with running_worker(env.client, own, sessions):
            await handle.trigger()

            async def gone() -> bool:
                async with sessions() as session:
                    return await session.get(IdempotencyKey, expired) is None

            await wait_until(gone, message="the scheduled run deleting the expired key")
            async with sessions() as session:
                assert await session.get(IdempotencyKey, live) is not None

            async def finished() -> str | None:
                actions = (await handle.describe()).info.recent_actions
                started = actions[-1].action if actions else None
                if isinstance(started, ScheduleActionExecutionStartWorkflow):
                    return started.workflow_id
                return None

            run_id = await wait_until(finished, message="the schedule's recorded action")
            result = await env.client.get_workflow_handle(str(run_id), result_type=Purged).result()
            assert result.idempotency_keys == 1

        # An operator's pause survives the next worker start's update.
        await handle.pause(note="paused by the operator")
        await ensure_retention_schedule(
            env.client, own, schedule_id=schedule_id, task_queue=own.TEMPORAL_TASK_QUEUE
        )
        state = (await handle.describe()).schedule.state
        assert state.paused and state.note == "paused by the operator"
    finally:
        await handle.delete()
        await engine.dispose()


async def test_a_key_being_taken_over_is_skipped_by_the_cleanup_not_waited_for(
    own_sessions: Sessions, own_database: str
) -> None:
    """A request that holds an expired key's row lock is starting a new use of it: the cleanup
    skips that row instead of waiting for it or deleting it under the request."""
    if is_sqlite(own_database):
        pytest.skip("PostgreSQL only: SQLite has no row locks, BEGIN IMMEDIATE serialises")
    now = utcnow()
    taken, idle = await add_keys(own_sessions, now - TTL - timedelta(hours=1), 2)
    async with own_sessions.begin() as session:
        held = await session.get(IdempotencyKey, taken, with_for_update=True)
        assert held is not None
        async with asyncio.timeout(10):
            purged = await purge_expired(own_sessions, RETENTION, now=now)
        held.created_at = now  # the new use begins

    assert purged.idempotency_keys == 1
    assert await count_rows(own_sessions, IdempotencyKey, IdempotencyKey.key == idle) == 0
    assert await count_rows(own_sessions, IdempotencyKey, IdempotencyKey.key == taken) == 1
    assert (await purge_expired(own_sessions, RETENTION, now=now)).idempotency_keys == 0
