"""No order without its workflow: the outbox entry commits with the order, a start that fails
after the commit still answers 202, and the worker's relay starts the workflow later."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import (
    Client,
    Interceptor,
    OutboundInterceptor,
    StartWorkflowInput,
    WorkflowHandle,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from core.db import create_engine, create_sessionmaker
from core.models import WorkflowOutbox, utcnow
from core.relay import RELAY_CONCURRENCY, relay_once, run_relay, workflow_task_backlog
from core.settings import Settings
from core.temporal import connect_temporal
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, free_port, running_worker
from tests.support import (
    count_rows,
    new_key,
    order_body,
    order_row,
    place_order,
    unique_email,
    wait_for_order_status,
    wait_until,
)


@pytest.fixture
def unreachable(settings: Settings) -> Settings:
    """The test's settings with Temporal at a closed port: every start fails after the commit."""
    return settings.model_copy(update={"TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})


async def outbox_entry(
    sessions: async_sessionmaker[AsyncSession], order_id: str
) -> WorkflowOutbox | None:
    async with sessions() as session:
        return await session.get(WorkflowOutbox, order_id)


async def place_pending_orders(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], count: int
) -> list[str]:
    """Orders whose workflow start failed after the commit (their outbox entry is pending)."""
    async with api_client(settings) as api:
        order_ids = [await place_order(api) for _ in range(count)]

    async def all_failed_once() -> bool:
        entries = [await outbox_entry(sessions, order_id) for order_id in order_ids]
        return all(e is not None and e.start_attempts >= 1 for e in entries)

    # In background mode the failed start is recorded after the 202.
    await wait_until(all_failed_once, within=30, message="the failed starts recorded")
    return order_ids


async def pending_start_attempts(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Start attempts over every entry still pending, whichever test placed it."""
    async with sessions() as session:
        total = await session.scalar(
            select(func.sum(WorkflowOutbox.start_attempts)).where(
                WorkflowOutbox.started_at.is_(None)
            )
        )
    return int(total or 0)


async def workflow_exists(client: Client, order_id: str) -> bool:
    try:
        await client.get_workflow_handle(order_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


@asynccontextmanager
async def worker_process(
    sessions: async_sessionmaker[AsyncSession], client: Client, settings: Settings
) -> AsyncIterator[None]:
    """What `python worker.py` runs: the worker and its relay on one client, so the relay's eager
    starts (outbox mode) reach this worker."""
    async with running_worker(client, settings, sessions):
        relay = asyncio.create_task(run_relay(sessions, client, settings))
        try:
            yield
        finally:
            relay.cancel()
            with suppress(asyncio.CancelledError):
                await relay


def assert_followed_up_once(
    mail: MailSink, warehouse: WarehouseReceiver, order_id: str, email: str
) -> None:
    """One receipt (its stable Message-ID) and one accepted webhook: nothing lost, nothing twice."""
    assert [m.message_id for m in mail.to(email)] == [
        f"<{order_id}.send_receipt@orderflow.localhost>"
    ]
    assert [d.answered for d in warehouse.deliveries_for(order_id)] == [202]


class RecordStarts(Interceptor):
    """Notes every workflow start a client sends, to tell which relay started an order, and how
    many starts were in flight as each began (itself included), to tell how a pass overlaps
    them."""

    def __init__(self) -> None:
        self.workflow_ids: list[str] = []
        self.in_flight_at_start: list[int] = []
        self.in_flight = 0

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _StartRecorder(next, self)


class _StartRecorder(OutboundInterceptor):
    def __init__(self, next: OutboundInterceptor, record: RecordStarts) -> None:
        super().__init__(next)
        self._record = record

    async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
        self._record.workflow_ids.append(input.id)
        self._record.in_flight += 1
        self._record.in_flight_at_start.append(self._record.in_flight)
        try:
            return await super().start_workflow(input)
        finally:
            self._record.in_flight -= 1


@pytest.mark.parametrize("mode", ["request", "background"])
async def test_failed_start_after_commit_answers_202_and_the_relay_completes_the_order(
    mode: str,
    settings: Settings,
    unreachable: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    mail: MailSink,
    warehouse: WarehouseReceiver,
) -> None:
    down = unreachable.model_copy(update={"WORKFLOW_START_MODE": mode})
    body = order_body()
    async with api_client(down) as api:
        response = await api.post("/orders", json=body, headers={"Idempotency-Key": new_key()})
    assert response.status_code == 202, response.text
    order_id = response.json()["order_id"]

    async def start_failed() -> WorkflowOutbox | None:
        entry = await outbox_entry(sessions, order_id)
        return entry if entry is not None and entry.start_attempts == 1 else None

    entry = await wait_until(start_failed, within=30, message="the failed start recorded")
    assert entry.started_at is None
    assert "connect" in (entry.last_error or "").lower()
    assert not await workflow_exists(env.client, order_id)

    # Temporal is reachable again: a worker with its relay finishes the order.
    async with worker_process(sessions, env.client, settings), api_client(settings) as api:
        await wait_for_order_status(api, order_id, "completed")

    entry = await outbox_entry(sessions, order_id)
    assert entry is not None and entry.started_at is not None
    assert entry.start_attempts == 2
    assert_followed_up_once(mail, warehouse, order_id, body["customer_email"])


async def test_a_temporal_outage_is_one_warning_in_the_api_and_one_in_the_relay(
    unreachable: Settings,
    sessions: async_sessionmaker[AsyncSession],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every start that Temporal being down defers is counted into its burst's one warning, in
    the API's dispatcher and in the relay's loop, not logged once per order and per pass."""

    def outage_warnings(logger: str) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == logger and r.getMessage().startswith("temporal unavailable")
        ]

    caplog.clear()
    with caplog.at_level(logging.INFO):
        await place_pending_orders(unreachable, sessions, 3)
        assert len(outage_warnings("api.dispatcher")) == 1

        down = await connect_temporal(unreachable, lazy=True)
        outbox = unreachable.model_copy(
            update={
                "WORKFLOW_START_MODE": "outbox",
                "OUTBOX_RELAY_INTERVAL_SECONDS": 0.05,
                "OUTBOX_SWEEP_INTERVAL_SECONDS": 0.05,
            }
        )
        tried_before = await pending_start_attempts(sessions)
        stop = asyncio.Event()
        relay = asyncio.create_task(run_relay(sessions, down, outbox, stop=stop))
        try:

            async def three_passes_failed() -> bool:
                return await pending_start_attempts(sessions) >= tried_before + 3

            await wait_until(three_passes_failed, message="three passes' failed starts")
        finally:
            stop.set()
            await asyncio.wait_for(relay, 30)
        assert len(outage_warnings("core.relay")) == 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_background_start_answers_202_and_the_order_completes(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    mail: MailSink,
    warehouse: WarehouseReceiver,
) -> None:
    background = settings.model_copy(update={"WORKFLOW_START_MODE": "background"})
    body = order_body()
    async with running_worker(env.client, background, sessions), api_client(background) as api:
        response = await api.post("/orders", json=body, headers={"Idempotency-Key": new_key()})
        assert response.status_code == 202, response.text
        order_id = response.json()["order_id"]
        await wait_for_order_status(api, order_id, "completed")

    entry = await outbox_entry(sessions, order_id)
    assert entry is not None and entry.started_at is not None and entry.start_attempts == 1
    assert len(mail.to(body["customer_email"])) == 1
    assert len(warehouse.deliveries_for(order_id)) == 1


async def test_relay_waits_out_the_grace_period_and_stops_at_a_failing_start(
    settings: Settings,
    unreachable: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    order_ids = await place_pending_orders(unreachable, sessions, 3)

    # Within the grace period the request may still be starting it: the relay leaves it be.
    within_grace = await relay_once(
        sessions, env.client, settings.TEMPORAL_TASK_QUEUE, grace=timedelta(hours=1), batch=100
    )
    assert within_grace.started == 0
    assert not any([await workflow_exists(env.client, order_id) for order_id in order_ids])

    # Temporal still down: one failed start ends the pass instead of timing out every entry.
    down = await connect_temporal(unreachable, lazy=True)
    tried_before = await pending_start_attempts(sessions)
    relayed = await relay_once(
        sessions, down, settings.TEMPORAL_TASK_QUEUE, grace=timedelta(0), batch=100
    )
    assert relayed.started == 0
    assert await pending_start_attempts(sessions) == tried_before + 1

    await relay_once(
        sessions, env.client, settings.TEMPORAL_TASK_QUEUE, grace=timedelta(0), batch=100
    )
    assert all([await workflow_exists(env.client, order_id) for order_id in order_ids])


async def test_concurrent_relays_start_every_order_and_split_the_batch_on_postgresql(
    settings: Settings,
    unreachable: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    order_ids = await place_pending_orders(unreachable, sessions, 12)
    recorders = [RecordStarts(), RecordStarts()]
    clients = [await connect_temporal(settings, interceptors=[r]) for r in recorders]

    await asyncio.gather(
        *(
            relay_once(
                sessions, client, settings.TEMPORAL_TASK_QUEUE, grace=timedelta(0), batch=100
            )
            for client in clients
        )
    )

    starts = {
        order_id: sum(r.workflow_ids.count(order_id) for r in recorders) for order_id in order_ids
    }
    assert all(count >= 1 for count in starts.values()), starts
    async with sessions() as session:
        entries = (
            await session.scalars(
                select(WorkflowOutbox).where(WorkflowOutbox.order_id.in_(order_ids))
            )
        ).all()
    assert all(e.started_at is not None for e in entries)
    assert all([await workflow_exists(env.client, order_id) for order_id in order_ids])
    if sessions.kw["bind"].dialect.name == "postgresql":
        # FOR UPDATE SKIP LOCKED: each order was claimed, and started, by one relay only.
        assert set(starts.values()) == {1}, starts


async def test_outbox_mode_answers_202_without_temporal_and_the_relay_completes_the_order(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    mail: MailSink,
    warehouse: WarehouseReceiver,
) -> None:
    outbox = settings.model_copy(update={"WORKFLOW_START_MODE": "outbox"})
    body = order_body()
    async with api_client(outbox) as api:
        response = await api.post("/orders", json=body, headers={"Idempotency-Key": new_key()})
    assert response.status_code == 202, response.text
    order_id = response.json()["order_id"]

    # No relay runs yet, and the API (shut down above, so nothing of it is still in flight)
    # never tried: the order waits in the outbox.
    entry = await outbox_entry(sessions, order_id)
    assert entry is not None
    assert (entry.started_at, entry.start_attempts, entry.last_error) == (None, 0, None)
    assert not await workflow_exists(env.client, order_id)

    # The worker process: the worker and its relay on the same client (eager starts).
    async with worker_process(sessions, env.client, outbox), api_client(outbox) as api:
        await wait_for_order_status(api, order_id, "completed")

        async def marked_started() -> WorkflowOutbox | None:
            entry = await outbox_entry(sessions, order_id)
            return entry if entry is not None and entry.started_at is not None else None

        entry = await wait_until(marked_started, message="the relay's start marked")

    assert entry.start_attempts == 1
    assert entry.last_error is None
    assert_followed_up_once(mail, warehouse, order_id, body["customer_email"])


async def test_outbox_mode_takes_orders_while_temporal_is_unreachable_and_never_tries_it(
    unreachable: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    down = unreachable.model_copy(update={"WORKFLOW_START_MODE": "outbox"})
    async with api_client(down) as api:
        began = time.monotonic()
        order_id = await place_order(api)
        took = time.monotonic() - began
    # Loose on purpose (a refused connection fails fast too); the entry below is the proof.
    assert took < down.WORKFLOW_START_TIMEOUT_SECONDS, took

    # The API has shut down, so any start of its own would have finished: there was none.
    entry = await outbox_entry(sessions, order_id)
    assert entry is not None
    assert (entry.started_at, entry.start_attempts, entry.last_error) == (None, 0, None)
    assert not await workflow_exists(env.client, order_id)


async def test_one_relay_pass_starts_a_large_batch_in_concurrent_waves_and_marks_every_entry(
    settings: Settings,
    unreachable: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    order_ids = await place_pending_orders(unreachable, sessions, 40)
    recorder = RecordStarts()
    client = await connect_temporal(settings, interceptors=[recorder])
    # Other tests' entries may be pending too, and the fewest attempts go first: a batch of every
    # pending entry makes sure this one pass reaches all 40.
    pending = await count_rows(sessions, WorkflowOutbox, WorkflowOutbox.started_at.is_(None))
    assert pending >= 40

    relayed = await relay_once(
        sessions, client, settings.TEMPORAL_TASK_QUEUE, grace=timedelta(0), batch=pending
    )

    assert relayed.started >= 40
    assert all(recorder.workflow_ids.count(order_id) == 1 for order_id in order_ids)
    # The first start alone (the second began after it ended), then waves of RELAY_CONCURRENCY.
    assert recorder.in_flight_at_start[:2] == [1, 1], recorder.in_flight_at_start
    assert max(recorder.in_flight_at_start) == RELAY_CONCURRENCY, recorder.in_flight_at_start
    async with sessions() as session:
        entries = (
            await session.scalars(
                select(WorkflowOutbox).where(WorkflowOutbox.order_id.in_(order_ids))
            )
        ).all()
    assert len(entries) == 40
    # One failed start (the API's) and this pass's.
    assert all(e.started_at is not None and e.start_attempts == 2 for e in entries)
    assert all([await workflow_exists(env.client, order_id) for order_id in order_ids])


async def test_the_relay_leaves_entries_in_the_outbox_while_the_servers_backlog_is_full(
    settings: Settings,
    unreachable: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await place_pending_orders(unreachable, sessions, 3)
    queue = settings.TEMPORAL_TASK_QUEUE  # no worker polls it: every start waits there
    still_pending = WorkflowOutbox.started_at.is_(None)
    pending = await count_rows(sessions, WorkflowOutbox, still_pending)

    relayed = await relay_once(
        sessions, env.client, queue, grace=timedelta(0), batch=pending, max_backlog=2
    )
    assert relayed.started == 2
    assert await count_rows(sessions, WorkflowOutbox, still_pending) == pending - 2

    async def backlog_is_full() -> bool:
        return await workflow_task_backlog(env.client, queue) == 2

    await wait_until(backlog_is_full, within=15, message="the server reports a backlog of 2")
    backlog_full = await relay_once(
        sessions, env.client, queue, grace=timedelta(0), batch=pending, max_backlog=2
    )
    assert backlog_full.started == 0
    assert await count_rows(sessions, WorkflowOutbox, still_pending) == pending - 2


async def test_a_start_that_finds_the_workflow_closed_counts_as_started_and_runs_nothing_again(
    settings: Settings, env: WorkflowEnvironment, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """An order's workflow that already closed (completed, or terminated by hand) is never run
    again: a second start (the API died between its start and its mark, so the relay starts it
    again) finds it under REJECT_DUPLICATE and counts it started."""
    request = settings.model_copy(update={"WORKFLOW_START_MODE": "request"})
    async with running_worker(env.client, request, sessions), api_client(request) as api:
        completed = await place_order(api)
        await wait_for_order_status(api, completed, "completed")
        await env.client.get_workflow_handle(completed).result()
    # No worker from here on: this order's workflow waits until it is terminated.
    async with api_client(request) as api:
        terminated = await place_order(api)
    await env.client.get_workflow_handle(terminated).terminate("an operator's decision")

    closed = {completed: "COMPLETED", terminated: "TERMINATED"}
    first_runs = {order_id: await runs_of(env.client, order_id) for order_id in closed}
    async with sessions.begin() as session:
        await session.execute(
            update(WorkflowOutbox)
            .where(WorkflowOutbox.order_id.in_(list(closed)))
            .values(started_at=None)
        )
    recorder = RecordStarts()
    client = await connect_temporal(settings, interceptors=[recorder])
    pending = await count_rows(sessions, WorkflowOutbox, WorkflowOutbox.started_at.is_(None))

    await relay_once(
        sessions, client, settings.TEMPORAL_TASK_QUEUE, grace=timedelta(0), batch=pending
    )

    for order_id, status in closed.items():
        assert recorder.workflow_ids.count(order_id) == 1
        entry = await outbox_entry(sessions, order_id)
        assert entry is not None and entry.started_at is not None and entry.last_error is None
        assert await runs_of(env.client, order_id) == first_runs[order_id]
        [(_, run_status)] = first_runs[order_id]
        assert run_status == status


async def runs_of(client: Client, workflow_id: str) -> list[tuple[str, str]]:
    """Every run of the workflow ID: (run ID, status)."""
    return [
        (execution.run_id, execution.status.name if execution.status else "")
        async for execution in client.list_workflows(f'WorkflowId = "{workflow_id}"')
    ]


@asynccontextmanager
async def outbox_of_its_own(own_database: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A database of the test's own, so the relay sees only the entries the test wrote."""
    engine = create_engine(Settings(DATABASE_URL=own_database))
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


async def pending_entries(
    sessions: async_sessionmaker[AsyncSession], start_attempts: list[int]
) -> list[str]:
    """Orders whose outbox entries wait, oldest first, with these failed start attempts."""
    orders = [order_row(unique_email()) for _ in start_attempts]
    now = utcnow()
    async with sessions.begin() as session:
        session.add_all(orders)
        await session.flush()
        session.add_all(
            WorkflowOutbox(
                order_id=order.id,
                created_at=now - timedelta(minutes=len(orders) - age),
                start_attempts=attempts,
            )
            for age, (order, attempts) in enumerate(zip(orders, start_attempts, strict=True))
        )
    return [order.id for order in orders]


async def test_the_relay_starts_the_entries_with_the_fewest_failed_starts_first(
    settings: Settings, env: WorkflowEnvironment, own_database: str
) -> None:
    """An entry whose start keeps failing cannot hold the others back, however old it is."""
    async with outbox_of_its_own(own_database) as sessions:
        oldest, middle, newest = await pending_entries(sessions, [5, 0, 1])
        recorder = RecordStarts()
        client = await connect_temporal(settings, interceptors=[recorder])
        for _ in range(3):
            relayed = await relay_once(
                sessions, client, settings.TEMPORAL_TASK_QUEUE, grace=timedelta(0), batch=1
            )
            assert (relayed.found, relayed.started) == (1, 1)
    assert recorder.workflow_ids == [middle, newest, oldest]


async def test_a_full_batch_is_followed_by_the_next_pass_at_once(
    settings: Settings, env: WorkflowEnvironment, own_database: str
) -> None:
    """Five entries, two a pass, an hour between sweeps: three passes start them all now."""
    relay = settings.model_copy(
        update={
            "WORKFLOW_START_MODE": "request",
            "OUTBOX_GRACE_SECONDS": 0,
            "OUTBOX_SWEEP_BATCH": 2,
            "OUTBOX_SWEEP_INTERVAL_SECONDS": 3600,
        }
    )
    async with outbox_of_its_own(own_database) as sessions:
        order_ids = await pending_entries(sessions, [0] * 5)
        stop = asyncio.Event()
        relaying = asyncio.create_task(run_relay(sessions, env.client, relay, stop=stop))
        try:

            async def all_started() -> bool:
                pending = WorkflowOutbox.started_at.is_(None)
                return await count_rows(sessions, WorkflowOutbox, pending) == 0

            await wait_until(all_started, within=15, message="every entry started")
        finally:
            stop.set()
            await asyncio.wait_for(relaying, 30)
    assert all([await workflow_exists(env.client, order_id) for order_id in order_ids])
