"""Duplicate requests across processes, settled by the database: two real API processes (uvicorn)
against one database, the connection pool's settings and pre-ping, and the intake's fencing."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import partial

import httpx
import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.intake import IntakeOutcome, Lease, OrderIntake
from api.schemas import OrderIn
from core.contracts import STEPS
from core.db import create_engine, create_sessionmaker, is_sqlite
from core.ledger import record_success
from core.models import (
    IdempotencyKey,
    KeyState,
    Order,
    OrderStatus,
    OrderStep,
    PaymentCharge,
    utcnow,
)
from core.payments import InDatabaseGateway, SandboxGateway
from core.settings import Settings
from devsinks.smtp import MailSink
from tests.conftest import ROOT, WEBHOOK_SECRET, free_port
from tests.support import NetworkGateway, new_key, order_body, order_row, wait_until

ON_POSTGRES = bool(os.environ.get("TEST_DATABASE_URL"))
needs_postgres = pytest.mark.skipif(
    not ON_POSTGRES, reason="PostgreSQL only: set TEST_DATABASE_URL (.ci/run does)"
)
API_KEY = "multi-process-test-key"
KEYS_PER_RUN = 4
REQUESTS_PER_KEY = 12


def api_process_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """What an operator would export for `uvicorn api.main:app`: the test's database, Temporal
    server and task queue, and any `overrides`."""
    env = {
        **os.environ,
        "ORDERFLOW_ENV": "test",
        "DATABASE_URL": settings.DATABASE_URL,
        "DATABASE_POOL_SIZE": "4",
        "DATABASE_MAX_OVERFLOW": "4",
        "TEMPORAL_ADDRESS": settings.TEMPORAL_ADDRESS,
        "TEMPORAL_TASK_QUEUE": settings.TEMPORAL_TASK_QUEUE,
        # As the test's own: its in-process worker runs no relay.
        "WORKFLOW_START_MODE": settings.WORKFLOW_START_MODE,
        "WEBHOOK_SIGNING_SECRET": WEBHOOK_SECRET,
        "API_KEYS": API_KEY,
        "LOG_LEVEL": "WARNING",
    }
    env.pop("TEST_DATABASE_URL", None)
    env.update(overrides)
    return env


@asynccontextmanager
async def api_processes(
    settings: Settings, count: int, **overrides: str
) -> AsyncIterator[list[str]]:
    """`count` API processes on free ports; yields their base URLs once each answers /healthz."""
    procs: list[tuple[asyncio.subprocess.Process, str]] = []
    try:
        for _ in range(count):
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1"),
                *("--port", str(port), "--log-level", "warning"),
                cwd=ROOT,
                env=api_process_env(settings, **overrides),
            )
            procs.append((proc, f"http://127.0.0.1:{port}"))
        async with httpx.AsyncClient(timeout=5) as probe:
            for proc, url in procs:
                await wait_until(
                    partial(_healthy, probe, proc, url), within=60, message=f"API at {url}"
                )
        yield [url for _proc, url in procs]
    finally:
        for proc, _url in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc, _url in procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout=20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _healthy(probe: httpx.AsyncClient, proc: asyncio.subprocess.Process, url: str) -> bool:
    assert proc.returncode is None, f"API process at {url} exited with {proc.returncode}"
    try:
        return (await probe.get(f"{url}/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def _duplicates_across_two_processes(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    mail: MailSink,
) -> None:
    bodies = {new_key(): order_body() for _ in range(KEYS_PER_RUN)}
    async with (
        api_processes(settings, 2) as urls,
        httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as http,
    ):

        async def post(url: str, key: str) -> httpx.Response:
            return await http.post(
                f"{url}/orders", json=bodies[key], headers={"Idempotency-Key": key}
            )

        # Every key's duplicates alternate between the processes, all in flight at once.
        calls = [(key, post(urls[i % 2], key)) for key in bodies for i in range(REQUESTS_PER_KEY)]
        responses = await asyncio.gather(*(call for _key, call in calls))

        order_ids: dict[str, str] = {}
        for (key, _call), response in zip(calls, responses, strict=True):
            if response.status_code == 409:
                assert int(response.headers["Retry-After"]) >= 1
                continue
            assert response.status_code == 202, response.text
            order_id = response.json()["order_id"]
            assert order_ids.setdefault(key, order_id) == order_id
            assert response.headers["Location"] == f"/orders/{order_id}"
        # Once the first request finished, each process replays the same order.
        for key in bodies:
            for url in urls:
                again = await post(url, key)
                assert again.status_code == 202
                assert (
                    order_ids.setdefault(key, again.json()["order_id"]) == again.json()["order_id"]
                )

    async with sessions() as session:
        for key, order_id in order_ids.items():
            orders = await session.scalars(select(Order).where(Order.idempotency_key == key))
            assert [order.id for order in orders] == [order_id]
            charges = await session.scalar(
                select(func.count())
                .select_from(PaymentCharge)
                .where(PaymentCharge.idempotency_key == key)
            )
            assert charges == 1
            held = await session.get(IdempotencyKey, key)
            assert held is not None and held.state == KeyState.COMPLETED
            assert held.order_id == order_id

    for key, order_id in order_ids.items():
        described = await env.client.get_workflow_handle(order_id).describe()
        assert described.workflow_type == "OrderWorkflow"
        await wait_until(
            partial(mail.to, bodies[key]["customer_email"]), within=30, message="receipt sent"
        )
    query = f'TaskQueue = "{settings.TEMPORAL_TASK_QUEUE}"'
    await wait_until(
        lambda: _count_workflows(env, query, len(order_ids)),
        within=30,
        message="the workflows listed",
    )
    started = [w.id async for w in env.client.list_workflows(query)]
    assert sorted(started) == sorted(order_ids.values())
    for key in bodies:
        assert len(mail.to(bodies[key]["customer_email"])) == 1


async def _count_workflows(env: WorkflowEnvironment, query: str, at_least: int) -> bool:
    return (await env.client.count_workflows(query)).count >= at_least


@needs_postgres
async def test_two_api_processes_on_postgresql_charge_and_start_each_order_once(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    worker: Worker,
    mail: MailSink,
) -> None:
    assert not is_sqlite(settings.DATABASE_URL)
    await _duplicates_across_two_processes(settings, env, sessions, mail)


@pytest.mark.skipif(ON_POSTGRES, reason="SQLite variant; this run is on PostgreSQL")
async def test_two_api_processes_on_sqlite_charge_and_start_each_order_once(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    worker: Worker,
    mail: MailSink,
) -> None:
    assert is_sqlite(settings.DATABASE_URL)
    await _duplicates_across_two_processes(settings, env, sessions, mail)


def _intake(sessions: async_sessionmaker[AsyncSession], lease: float = 30.0) -> OrderIntake:
    return OrderIntake(sessions, SandboxGateway(sessions), lease=timedelta(seconds=lease))


async def test_a_request_whose_lease_ran_out_cannot_free_the_key_its_successor_holds(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    intake = _intake(sessions)
    key, fingerprint = new_key(), "f" * 64
    first = await intake._claim(key, fingerprint)
    assert isinstance(first, Lease)
    async with sessions.begin() as session:
        held = await session.get(IdempotencyKey, key)
        assert held is not None
        held.locked_until = utcnow() - timedelta(seconds=1)  # the first holder stalled
    successor = await intake._claim(key, fingerprint)
    assert isinstance(successor, Lease) and successor != first

    await intake._release(key, first)  # e.g. the stalled request's gateway call failed at last
    busy = await intake._claim(key, fingerprint)
    assert isinstance(busy, IntakeOutcome) and busy.status_code == 409

    await intake._release(key, successor)
    async with sessions() as session:
        assert await session.get(IdempotencyKey, key) is None


async def test_an_order_whose_key_completion_was_lost_is_answered_from_the_order(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    intake = _intake(sessions)
    key, order = new_key(), OrderIn.model_validate(order_body())
    placed = await intake.place(key, order)
    assert placed.status_code == 202 and placed.new_order_id
    # The interleaving that loses it: the key row was freed while its holder committed the order.
    async with sessions.begin() as session:
        await session.execute(delete(IdempotencyKey).where(IdempotencyKey.key == key))

    again = await intake.place(key, order)

    assert again.status_code == 202 and again.new_order_id is None
    assert again.body["order_id"] == placed.new_order_id
    async with sessions() as session:
        held = await session.get(IdempotencyKey, key)
        assert held is not None and held.state == KeyState.COMPLETED
        assert held.order_id == placed.new_order_id
        charges = await session.scalar(
            select(func.count())
            .select_from(PaymentCharge)
            .where(PaymentCharge.idempotency_key == key)
        )
        assert charges == 1


@pytest.mark.parametrize("gateway", ["in database", "across the network"])
async def test_concurrent_duplicates_in_one_process_make_one_charge_and_one_order(
    sessions: async_sessionmaker[AsyncSession], gateway: str
) -> None:
    charger = SandboxGateway(sessions) if gateway == "in database" else NetworkGateway(sessions)
    assert isinstance(charger, InDatabaseGateway) == (gateway == "in database")
    intake = OrderIntake(sessions, charger, lease=timedelta(seconds=30))
    key, order = new_key(), OrderIn.model_validate(order_body())

    outcomes = await asyncio.gather(*(intake.place(key, order) for _ in range(REQUESTS_PER_KEY)))

    assert {outcome.status_code for outcome in outcomes} <= {202, 409}
    created = [outcome.new_order_id for outcome in outcomes if outcome.new_order_id]
    assert len(created) == 1
    replayed = await intake.place(key, order)
    assert replayed.status_code == 202 and replayed.new_order_id is None
    assert replayed.body["order_id"] == created[0]
    async with sessions() as session:
        orders = await session.scalars(select(Order.id).where(Order.idempotency_key == key))
        assert list(orders) == created
        charges = await session.scalar(
            select(func.count())
            .select_from(PaymentCharge)
            .where(PaymentCharge.idempotency_key == key)
        )
        assert charges == 1
        held = await session.get(IdempotencyKey, key)
        assert held is not None and held.state == KeyState.COMPLETED
        assert held.order_id == created[0]


def test_pool_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://orderflow@127.0.0.1:5432/orderflow")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "7")
    monkeypatch.setenv("DATABASE_MAX_OVERFLOW", "3")
    monkeypatch.setenv("DATABASE_POOL_TIMEOUT_SECONDS", "4.5")
    engine = create_engine(Settings())
    pool = engine.sync_engine.pool
    assert pool.size() == 7  # type: ignore[attr-defined]
    assert pool._max_overflow == 3  # type: ignore[attr-defined]
    assert pool._timeout == 4.5  # type: ignore[attr-defined]
    assert pool._pre_ping


@needs_postgres
async def test_pre_ping_replaces_a_connection_the_server_dropped(database_url: str) -> None:
    engine = create_engine(Settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE=1))
    admin = create_engine(Settings(DATABASE_URL=database_url))
    sessions = create_sessionmaker(engine)
    try:
        async with sessions() as session:
            first_pid = await session.scalar(text("SELECT pg_backend_pid()"))
        # The pooled connection dies under us (a server restart, a failover, an idle timeout).
        async with admin.connect() as connection:
            await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first_pid})
        async with sessions() as session:
            second_pid = await session.scalar(text("SELECT pg_backend_pid()"))
        assert second_pid != first_pid
    finally:
        await engine.dispose()
        await admin.dispose()


@needs_postgres
async def test_steps_succeeding_at_once_both_count_towards_the_order_status(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """Two steps recorded in overlapping transactions: the second refresh waits for the first's
    lock on the order, then must see the first's committed step (READ COMMITTED reads it in a
    statement that starts after the wait), so the order ends completed."""
    order = order_row("buyer@example.com")
    order_id = order.id
    async with sessions.begin() as session:
        session.add(order)
        await session.flush()
        session.add_all([OrderStep(order_id=order_id, step=step) for step in STEPS])
    first, second = STEPS
    async with sessions() as holding, sessions() as waiting:
        await record_success(holding, order_id, first, 1, {})
        pid = await waiting.scalar(text("SELECT pg_backend_pid()"))
        blocked = asyncio.create_task(record_success(waiting, order_id, second, 1, {}))

        async def waits_for_the_lock() -> bool:
            async with sessions() as probe:
                state = await probe.scalar(
                    text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": pid},
                )
            return bool(state == "Lock")

        await wait_until(waits_for_the_lock, within=30, message="second refresh waits")
        await holding.commit()
        await blocked
        await waiting.commit()
    async with sessions() as session:
        stored = await session.get(Order, order_id)
        assert stored is not None
        assert stored.status == OrderStatus.COMPLETED
