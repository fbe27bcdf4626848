"""Dependency outages for real: the link between the API (or the outbox relay) and PostgreSQL
cut with a TCP proxy, and Temporal unreachable. The API answers 503 + Retry-After naming the
dependency and logs one warning per burst; nothing is left half written; a client retrying with
the same key gets its one order and one charge; the relay backs off and resumes."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import make_url, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.intake import OrderIntake
from api.main import create_app
from core.db import create_engine, create_sessionmaker
from core.models import (
    DeadLetter,
    DeadLetterStatus,
    IdempotencyKey,
    KeyState,
    Order,
    PaymentCharge,
    Step,
    WorkflowOutbox,
)
from core.outages import is_temporal_outage
from core.payments import ChargeResult, SandboxGateway
from core.redrives import new_redrive_id
from core.relay import run_relay
from core.settings import Settings
from core.temporal import start_order_workflow
from devsinks.smtp import MailSink
from tests.conftest import free_port
from tests.support import count_rows, new_key, order_body, order_row, wait_until
from tests.tcp_proxy import TcpProxy, tcp_proxy

REDRIVE_COMMANDS = ("pause", "resume", "cancel")
needs_postgres = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"),
    reason="PostgreSQL only (a TCP link to cut): set TEST_DATABASE_URL",
)
Sessions = async_sessionmaker[AsyncSession]
OUTAGE_WARNING = "database unavailable"


@asynccontextmanager
async def database_link(database_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy in front of the test database; yields it and the URL that goes through it."""
    url = make_url(database_url)
    async with tcp_proxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        through = url.set(host=proxy.host, port=proxy.port)
        yield proxy, through.render_as_string(hide_password=False)


@dataclass
class Api:
    app: FastAPI
    http: httpx.AsyncClient


@asynccontextmanager
async def api_through(settings: Settings) -> AsyncIterator[Api]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderflow.test") as c:
            yield Api(app, c)


async def rows_for_key(sessions: Sessions, key: str) -> dict[str, Any]:
    async with sessions() as session:
        held = await session.get(IdempotencyKey, key)
    return {
        "orders": await count_rows(sessions, Order, Order.idempotency_key == key),
        "charges": await count_rows(sessions, PaymentCharge, PaymentCharge.idempotency_key == key),
        "key": held.state if held else None,
    }


def outage_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]


async def post_order(http: httpx.AsyncClient, body: dict[str, Any], key: str) -> httpx.Response:
    return await http.post("/orders", json=body, headers={"Idempotency-Key": key})


async def retry_until_answered(
    http: httpx.AsyncClient,
    body: dict[str, Any],
    key: str,
    *,
    first_wait: int = 0,
    within: float = 60,
) -> tuple[httpx.Response, list[int]]:
    """What a well-behaved client does: the same request with the same key, waiting what each
    503 or 409 says in Retry-After. Returns the final answer and the statuses before it."""
    seen: list[int] = []
    await asyncio.sleep(first_wait)
    async with asyncio.timeout(within):
        while True:
            response = await post_order(http, body, key)
            if response.status_code not in (409, 503):
                return response, seen
            seen.append(response.status_code)
            await asyncio.sleep(int(response.headers["Retry-After"]))


@needs_postgres
async def test_database_cut_is_503_with_retry_after_and_one_warning_per_burst(
    settings: Settings,
    sessions: Sessions,
    worker: Worker,
    mail: MailSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with database_link(settings.DATABASE_URL) as (proxy, url):
        through = settings.model_copy(update={"DATABASE_URL": url})
        async with api_through(through) as api:
            warm = await post_order(api.http, order_body(), new_key())
            assert warm.status_code == 202, warm.text

            await proxy.cut()
            caplog.clear()
            bodies = {new_key(): order_body() for _ in range(12)}
            with caplog.at_level(logging.INFO):
                answers = await asyncio.gather(
                    *(post_order(api.http, body, key) for key, body in bodies.items())
                )
                reads = [await api.http.get(f"/orders/{warm.json()['order_id']}")]
                reads.append(await api.http.get("/dead-letters"))
            for response in [*answers, *reads]:
                assert response.status_code == 503, response.text
                assert int(response.headers["Retry-After"]) >= 1
                assert response.json()["dependency"] == "database"
            # One warning for the burst, and not one traceback.
            assert len(outage_lines(caplog, OUTAGE_WARNING)) == 1
            assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]

            await proxy.restore()
            for key, body in bodies.items():
                again, _ = await retry_until_answered(api.http, body, key)
                assert again.status_code == 202, again.text
            [recovered] = outage_lines(caplog, "database recovered after")
            assert f"after {len(answers) + len(reads)} failures" in recovered.getMessage()

    for key, body in bodies.items():
        assert await rows_for_key(sessions, key) == {
            "orders": 1,
            "charges": 1,
            "key": KeyState.COMPLETED,
        }
        email = body["customer_email"]
        await wait_until(partial(mail.to, email), message="receipt sent")
        assert len(mail.to(email)) == 1


class CutAfterCharge:
    """The sandbox gateway, with the link to the database cut right after the charge commits:
    the database dies mid-request, between the charge and the order's transaction."""

    def __init__(self, sessions: Sessions, proxy: TcpProxy) -> None:
        self._gateway = SandboxGateway(sessions)
        self._proxy = proxy
        self.armed = True

    async def charge(
        self, amount_cents: int, currency: str, token: str, idempotency_key: str
    ) -> ChargeResult:
        result = await self._gateway.charge(amount_cents, currency, token, idempotency_key)
        if self.armed:
            self.armed = False
            await self._proxy.cut()
        return result


@needs_postgres
async def test_database_dying_mid_request_leaves_a_key_the_retry_can_settle(
    settings: Settings, sessions: Sessions, worker: Worker, mail: MailSink
) -> None:
    lease = 3.0
    async with database_link(settings.DATABASE_URL) as (proxy, url):
        through = settings.model_copy(
            update={"DATABASE_URL": url, "IDEMPOTENCY_LEASE_SECONDS": lease}
        )
        async with api_through(through) as api:
            intake: OrderIntake = api.app.state.intake
            api.app.state.intake = OrderIntake(
                api.app.state.sessions,
                CutAfterCharge(api.app.state.sessions, proxy),
                lease=timedelta(seconds=lease),
            )
            assert intake is not api.app.state.intake
            body, key = order_body(), new_key()

            down = await post_order(api.http, body, key)

            assert down.status_code == 503, down.text
            assert down.json()["dependency"] == "database"
            # The key could not be freed (the database was gone), so the client is told to
            # come back when its lease has run out, not sooner.
            assert 1 <= int(down.headers["Retry-After"]) <= lease
            assert await rows_for_key(sessions, key) == {
                "orders": 0,
                "charges": 1,
                "key": KeyState.IN_FLIGHT,
            }

            await proxy.restore()
            again, before = await retry_until_answered(
                api.http, body, key, first_wait=int(down.headers["Retry-After"])
            )
            assert again.status_code == 202, again.text
            # Waiting what the 503 said was enough: the first retry took the expired claim over.
            assert before == [], before

    assert await rows_for_key(sessions, key) == {
        "orders": 1,
        "charges": 1,
        "key": KeyState.COMPLETED,
    }
    await wait_until(lambda: mail.to(body["customer_email"]), message="receipt sent")
    assert len(mail.to(body["customer_email"])) == 1


class CutInsideTheTransaction(SandboxGateway):
    """The sandbox charging on the intake's one transaction, with the link to the database cut
    right after the charge's INSERT, before the key and the order are written."""

    def __init__(self, sessions: Sessions, proxy: TcpProxy) -> None:
        super().__init__(sessions)
        self._proxy = proxy
        self.armed = True

    async def charge_within(
        self,
        connection: AsyncConnection,
        amount_cents: int,
        currency: str,
        token: str,
        idempotency_key: str,
    ) -> ChargeResult:
        charge = await super().charge_within(
            connection, amount_cents, currency, token, idempotency_key
        )
        if self.armed:
            self.armed = False
            await self._proxy.cut()
        return charge


@needs_postgres
async def test_database_dying_inside_the_one_transaction_intake_leaves_nothing(
    settings: Settings, sessions: Sessions, worker: Worker, mail: MailSink
) -> None:
    async with database_link(settings.DATABASE_URL) as (proxy, url):
        through = settings.model_copy(update={"DATABASE_URL": url})
        async with api_through(through) as api:
            api.app.state.intake = OrderIntake(
                api.app.state.sessions,
                CutInsideTheTransaction(api.app.state.sessions, proxy),
                lease=timedelta(seconds=through.IDEMPOTENCY_LEASE_SECONDS),
            )
            body, key = order_body(), new_key()

            down = await post_order(api.http, body, key)

            assert down.status_code == 503, down.text
            assert down.json()["dependency"] == "database"
            assert int(down.headers["Retry-After"]) == 1
            # The charge was written on the transaction that died: nothing of it is left.
            assert await rows_for_key(sessions, key) == {"orders": 0, "charges": 0, "key": None}

            await proxy.restore()
            again, before = await retry_until_answered(
                api.http, body, key, first_wait=int(down.headers["Retry-After"])
            )
            assert again.status_code == 202, again.text
            assert before == [], before

    assert await rows_for_key(sessions, key) == {
        "orders": 1,
        "charges": 1,
        "key": KeyState.COMPLETED,
    }
    await wait_until(lambda: mail.to(body["customer_email"]), message="receipt sent")
    assert len(mail.to(body["customer_email"])) == 1


@needs_postgres
async def test_the_relay_rides_out_a_database_outage(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: Sessions,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with database_link(settings.DATABASE_URL) as (proxy, url):
        engine = create_engine(settings.model_copy(update={"DATABASE_URL": url}))
        through = create_sessionmaker(engine)
        stop = asyncio.Event()
        await proxy.cut(refuse=False)  # accepted and reset: the proxy counts the attempts
        caplog.clear()
        with caplog.at_level(logging.INFO):
            # The relay of the request and background modes: no grace, a pass every 0.05 s.
            quick = settings.model_copy(
                update={
                    "WORKFLOW_START_MODE": "request",
                    "OUTBOX_GRACE_SECONDS": 0,
                    "OUTBOX_SWEEP_INTERVAL_SECONDS": 0.05,
                    "OUTBOX_SWEEP_BATCH": 10,
                }
            )
            relay = asyncio.create_task(run_relay(through, env.client, quick, stop=stop))
            try:
                await wait_until(lambda: len(proxy.reset_attempts) >= 6, message="6 passes")
                attempts = proxy.reset_attempts
                # Each failed pass waits twice as long as the one before: 0.05 + 0.1 + 0.2 +
                # 0.4 + 0.8 s at least between the first and the sixth, where a fixed interval
                # would have taken 0.25 s.
                assert attempts[5] - attempts[0] >= 1.5
                assert not relay.done()
                assert len(outage_lines(caplog, OUTAGE_WARNING)) == 1
                assert not [r for r in caplog.records if r.exc_info]

                order = order_row("relay@example.com")
                async with sessions.begin() as session:
                    session.add(order)
                    await session.flush()
                    session.add(WorkflowOutbox(order_id=order.id))
                await proxy.restore()

                async def started() -> bool:
                    async with sessions() as session:
                        entry = await session.scalar(
                            select(WorkflowOutbox).where(WorkflowOutbox.order_id == order.id)
                        )
                    return entry is not None and entry.started_at is not None

                await wait_until(started, within=60, message="the relay started the workflow")
                described = await env.client.get_workflow_handle(order.id).describe()
                assert described.id == order.id
                assert outage_lines(caplog, "database recovered after")
                assert not relay.done()
            finally:
                stop.set()
                await asyncio.wait_for(relay, 30)
                await engine.dispose()


# --- Temporal unreachable -----------------------------------------------------------------------


async def open_dead_letter(sessions: Sessions) -> DeadLetter:
    """An order parked on its warehouse step, written straight into the database."""
    order = order_row("parked@example.com")
    async with sessions.begin() as session:
        session.add(order)
        await session.flush()
        letter = DeadLetter(
            order_id=order.id,
            step=Step.NOTIFY_WAREHOUSE,
            error_type="WebhookRejected",
            error_message="the warehouse said 500",
            attempts=3,
            workflow_id=order.id,
            run_id="run",
        )
        session.add(letter)
    return letter


def nowhere() -> str:
    """An address where no Temporal server listens."""
    return f"127.0.0.1:{free_port()}"


async def test_a_start_that_outlives_its_rpc_timeout_is_an_outage_not_a_refusal(
    env: WorkflowEnvironment, settings: Settings
) -> None:
    """An overloaded server answers late, not no: the start stays in the outbox and counts in
    the caller's outage burst instead of a "refused" warning per order."""
    with pytest.raises(RPCError) as raised:
        await start_order_workflow(
            env.client,
            f"ord_{uuid.uuid4().hex}",
            settings.TEMPORAL_TASK_QUEUE,
            rpc_timeout=timedelta(microseconds=1),
        )
    assert is_temporal_outage(raised.value), (raised.value.status, raised.value.message)


async def test_readyz_is_503_with_retry_after_when_temporal_is_unreachable(
    settings: Settings,
) -> None:
    async with api_through(settings.model_copy(update={"TEMPORAL_ADDRESS": nowhere()})) as api:
        response = await api.http.get("/readyz")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    body = response.json()
    assert body["ready"] is False
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["temporal"].startswith("unreachable")


@needs_postgres
async def test_readyz_is_503_with_retry_after_while_the_database_is_cut(settings: Settings) -> None:
    """Readiness follows the database: not ready (so a balancer stops sending orders) while
    the link is cut, ready again once it is back; Temporal is checked on its own."""
    async with database_link(settings.DATABASE_URL) as (proxy, url):
        through = settings.model_copy(update={"DATABASE_URL": url})
        async with api_through(through) as api:
            assert (await api.http.get("/readyz")).status_code == 200
            await proxy.cut()
            down = await api.http.get("/readyz")
            alive = await api.http.get("/healthz")
            await proxy.restore()

            async def ready() -> bool:
                return (await api.http.get("/readyz")).status_code == 200

            await wait_until(ready, message="ready once the database is back")
    assert down.status_code == 503, down.text
    assert int(down.headers["Retry-After"]) >= 1
    body = down.json()
    assert body["ready"] is False
    assert body["checks"]["database"].startswith("unreachable")
    assert body["checks"]["temporal"] == "ok"
    # Liveness is the process's own: a database outage must not get the API restarted.
    assert alive.status_code == 200


async def test_dead_letter_commands_redrives_and_cancel_are_503_when_temporal_is_unreachable(
    settings: Settings, sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    letter = await open_dead_letter(sessions)
    unreachable = settings.model_copy(update={"TEMPORAL_ADDRESS": nowhere()})
    with caplog.at_level(logging.INFO):
        async with api_through(unreachable) as api:
            retry = await api.http.post(f"/dead-letters/{letter.id}/retry")
            discard = await api.http.post(
                f"/dead-letters/{letter.id}/discard", json={"reason": "gone"}
            )
            cancel = await api.http.post(f"/orders/{letter.order_id}/cancel")
            # The bulk redrives' endpoints (docs/redrive.md): start, progress and steering.
            redrive = f"/dead-letters/redrives/{new_redrive_id()}"
            bulk = [
                await api.http.post("/dead-letters/retry", json={"per_second": 1}),
                await api.http.get(redrive),
                *[await api.http.post(f"{redrive}/{command}") for command in REDRIVE_COMMANDS],
            ]
    for response in (retry, discard, cancel, *bulk):
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["dependency"] == "temporal"
    assert len(outage_lines(caplog, "temporal unavailable")) == 1
    assert not [r for r in caplog.records if r.exc_info]
    async with sessions() as session:
        unchanged = await session.get(DeadLetter, letter.id)
    assert unchanged is not None and unchanged.status == DeadLetterStatus.OPEN


async def test_a_cut_temporal_link_is_503_not_a_missing_worker_504(
    env: WorkflowEnvironment, settings: Settings, sessions: Sessions
) -> None:
    letter = await open_dead_letter(sessions)
    host, _, port = env.client.service_client.config.target_host.rpartition(":")
    async with tcp_proxy(host, int(port)) as proxy:
        through = settings.model_copy(update={"TEMPORAL_ADDRESS": proxy.address})
        async with api_through(through) as api:
            assert (await api.http.get("/readyz")).status_code == 200
            await proxy.cut()
            retry = await api.http.post(f"/dead-letters/{letter.id}/retry")
            ready = await api.http.get("/readyz")
    assert retry.status_code == 503, retry.text
    assert retry.json()["dependency"] == "temporal"
    assert ready.status_code == 503


# --- what is not an outage ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [RuntimeError("a bug"), ValueError("a bug"), IntegrityError("INSERT", {}, Exception("dup"))],
)
async def test_a_bug_is_still_a_500(settings: Settings, error: Exception) -> None:
    """The outage handlers answer 503 only for outages: anything else keeps its 500."""
    app = create_app(settings)

    async def broken() -> None:
        raise error

    app.add_api_route("/broken", broken)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderflow.test") as c:
            response = await c.get("/broken")
    assert response.status_code == 500
