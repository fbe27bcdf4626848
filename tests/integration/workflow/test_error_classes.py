"""Error classes on real components: what is retried and what is parked at once.

SMTP 4xx (at RCPT or after DATA) and connection errors are retried; SMTP 5xx (for a recipient or
after DATA) is permanent. The webhook retries network errors (a refused or reset connection), a
warehouse that does not answer within WEBHOOK_TIMEOUT_SECONDS, 408, 429 and 5xx, and treats any
other 4xx as permanent. A permanent failure is dead-lettered at its first attempt and marked
`permanent`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from core.models import DeadLetter, InterruptedClaim, OrderStep
from core.settings import Settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import (
    WEBHOOK_SECRET,
    WarehouseServer,
    api_client,
    free_port,
    running_worker,
    serving_warehouse,
)
from tests.support import order_body, place_order, unique_email, wait_for_order_status, wait_until
from tests.tcp_proxy import tcp_proxy


async def dead_letters(
    sessions: async_sessionmaker[AsyncSession], order_id: str
) -> list[DeadLetter]:
    async with sessions() as session:
        return list(
            (await session.scalars(select(DeadLetter).where(DeadLetter.order_id == order_id))).all()
        )


def step_of(order: dict[str, Any], name: str) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [s for s in order["steps"] if s["step"] == name]
    [step] = steps
    return step


@dataclass(frozen=True)
class Ledger:
    """What the ledger kept of a step's attempts: its status, how many, the last one whose
    outcome it recorded, that attempt's error type, and the claims interrupted on the way."""

    status: str
    attempts: int
    recorded_attempt: str | None
    error_type: str | None
    permanent: bool
    interrupted: int


async def ledger_of(sessions: async_sessionmaker[AsyncSession], order_id: str, step: str) -> Ledger:
    async with sessions() as session:
        row = await session.get(OrderStep, (order_id, step))
        interrupted = await session.scalar(
            select(func.count())
            .select_from(InterruptedClaim)
            .where(InterruptedClaim.order_id == order_id, InterruptedClaim.step == step)
        )
    assert row is not None
    return Ledger(
        row.status,
        row.attempts,
        row.recorded_attempt,
        row.last_error_type,
        row.last_error_permanent,
        int(interrupted or 0),
    )


async def step_row(
    sessions: async_sessionmaker[AsyncSession], order_id: str, step: str
) -> OrderStep | None:
    async with sessions() as session:
        return await session.get(OrderStep, (order_id, step))


class BusyMailbox(MailSink):
    """A mail server that answers 450 (mailbox busy, try later) at RCPT, `busy` times."""

    def __init__(self, busy: int) -> None:
        super().__init__()
        self.busy = busy

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if self.busy > 0:
            self.busy -= 1
            return "450 4.2.1 mailbox busy, try again later"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


class SilentWarehouse(WarehouseReceiver):
    """A warehouse that takes the first `silent` deliveries and never answers them (until
    released), then answers as the dev receiver does. Every delivery's arrival is noted."""

    def __init__(self, silent: int) -> None:
        super().__init__(WEBHOOK_SECRET.encode())
        self.silent = silent
        self.arrivals: list[float] = []
        self.released = asyncio.Event()

    async def receive(self, request: Any) -> Any:
        self.arrivals.append(time.monotonic())
        if self.silent > 0:
            self.silent -= 1
            await self.released.wait()
        return await super().receive(request)


async def test_smtp_4xx_is_retried_then_sent(
    worker: Worker, api: httpx.AsyncClient, mail: MailSink
) -> None:
    mail.faults.configure(fail_next=1, status=451)
    body = order_body()
    order_id = await place_order(api, body)

    order = await wait_for_order_status(api, order_id, "completed")
    assert step_of(order, "send_receipt")["attempts"] == 2
    assert len(mail.to(body["customer_email"])) == 1


async def test_smtp_4xx_at_rcpt_is_retried_then_sent(
    settings: Settings, env: WorkflowEnvironment, sessions: async_sessionmaker[AsyncSession]
) -> None:
    busy = BusyMailbox(busy=1)
    port = free_port()
    controller = Controller(busy, hostname="127.0.0.1", port=port)
    controller.start()
    on_busy = settings.model_copy(update={"SMTP_PORT": port})
    body = order_body()
    try:
        async with running_worker(env.client, on_busy, sessions), api_client(on_busy) as api:
            order_id = await place_order(api, body)
            order = await wait_for_order_status(api, order_id, "completed")
    finally:
        controller.stop()

    assert step_of(order, "send_receipt")["attempts"] == 2
    # Attempt 1 failed (recorded, the claim given back), attempt 2 recorded the receipt.
    assert await ledger_of(sessions, order_id, "send_receipt") == Ledger(
        "succeeded", 2, "0.2", "MailboxBusy", False, 0
    )
    assert len(busy.to(body["customer_email"])) == 1
    assert await dead_letters(sessions, order_id) == []


async def test_smtp_5xx_after_data_is_dead_lettered_at_once(
    worker: Worker,
    api: httpx.AsyncClient,
    mail: MailSink,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    body = order_body()
    # The recipient is taken; the message itself is refused for good once sent.
    mail.faults.configure(fail_next=1, status=554)
    order_id = await place_order(api, body)

    order = await wait_for_order_status(api, order_id, "needs_attention")
    [letter] = await dead_letters(sessions, order_id)
    assert (letter.step, letter.permanent, letter.attempts) == ("send_receipt", True, 1)
    assert letter.error_type == "MailboxRejected"
    assert "554" in letter.error_message
    assert await ledger_of(sessions, order_id, "send_receipt") == Ledger(
        "dead_lettered", 1, "0.1", "MailboxRejected", True, 0
    )
    assert mail.to(body["customer_email"]) == []
    assert step_of(order, "notify_warehouse")["status"] == "succeeded"


async def test_smtp_connection_error_is_retried_until_the_server_is_back(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    port = free_port()
    patient = settings.model_copy(update={"SMTP_PORT": port, "RETRY_MAX_ATTEMPTS": 200})
    body = order_body()
    async with running_worker(env.client, patient, sessions), api_client(patient) as api:
        order_id = await place_order(api, body)

        async def refused_twice() -> bool:
            async with sessions() as session:
                step = await session.get(OrderStep, (order_id, "send_receipt"))
            return step is not None and step.attempts >= 2

        await wait_until(refused_twice, within=30, message="two refused connections")
        async with sessions() as session:
            step = await session.get(OrderStep, (order_id, "send_receipt"))
        assert step is not None and "SMTP unreachable" in (step.last_error or "")

        # The mail server comes up on that port; the next retry gets through.
        late = MailSink()
        controller = Controller(late, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            await wait_for_order_status(api, order_id, "completed")
        finally:
            controller.stop()

    assert len(late.to(body["customer_email"])) == 1
    assert await dead_letters(sessions, order_id) == []


async def test_smtp_550_for_the_recipient_is_dead_lettered_at_once(
    worker: Worker,
    api: httpx.AsyncClient,
    mail: MailSink,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    email = unique_email()
    mail.faults.configure(reject_recipients=[email])
    order_id = await place_order(api, order_body(email))

    order = await wait_for_order_status(api, order_id, "needs_attention")
    [letter] = await dead_letters(sessions, order_id)
    assert letter.step == "send_receipt"
    assert letter.permanent
    assert letter.error_type == "MailboxRejected"
    assert letter.attempts == 1
    assert "550" in letter.error_message
    assert step_of(order, "send_receipt")["attempts"] == 1
    assert mail.to(email) == []
    # The other step goes on regardless.
    assert step_of(order, "notify_warehouse")["status"] == "succeeded"
    assert len(warehouse.deliveries_for(order_id)) == 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_webhook_transient_statuses_are_retried(
    status: int, worker: Worker, api: httpx.AsyncClient, warehouse: WarehouseReceiver
) -> None:
    warehouse.faults.configure(fail_next=1, status=status)
    order_id = await place_order(api)

    order = await wait_for_order_status(api, order_id, "completed")
    assert [d.answered for d in warehouse.deliveries_for(order_id)] == [status, 202]
    assert step_of(order, "notify_warehouse")["attempts"] == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 422, 425])
async def test_webhook_other_4xx_are_permanent(
    status: int,
    worker: Worker,
    api: httpx.AsyncClient,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    warehouse.faults.configure(fail_next=1, status=status)
    order_id = await place_order(api)

    await wait_for_order_status(api, order_id, "needs_attention")
    [letter] = await dead_letters(sessions, order_id)
    assert (letter.step, letter.permanent, letter.attempts) == ("notify_warehouse", True, 1)
    assert letter.error_type == "WarehouseRejected"
    assert [d.answered for d in warehouse.deliveries_for(order_id)] == [status]


@pytest.mark.parametrize("refuse", [True, False], ids=["refused", "reset"])
async def test_webhook_network_errors_are_retried_until_the_warehouse_is_back(
    refuse: bool,
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    warehouse_server: WarehouseServer,
) -> None:
    """The link to the warehouse refuses new connections, or accepts and resets them."""
    receiver = warehouse_server.receiver
    receiver.faults.reset()
    url = httpx.URL(warehouse_server.url)
    assert url.port is not None
    async with tcp_proxy("127.0.0.1", url.port) as link:
        through = settings.model_copy(
            update={
                "WAREHOUSE_WEBHOOK_URL": str(url.copy_with(port=link.port)),
                "RETRY_MAX_ATTEMPTS": 200,
            }
        )
        async with running_worker(env.client, through, sessions), api_client(through) as api:
            await link.cut(refuse=refuse)
            order_id = await place_order(api)

            async def failed_twice() -> OrderStep | None:
                step = await step_row(sessions, order_id, "notify_warehouse")
                return step if step is not None and step.attempts >= 2 else None

            step = await wait_until(failed_twice, within=30, message="two failed deliveries")
            assert "warehouse unreachable" in (step.last_error or ""), step.last_error
            assert receiver.deliveries_for(order_id) == []
            await link.restore()
            order = await wait_for_order_status(api, order_id, "completed")

    # Every failed attempt was recorded (as the step's last error, until the success).
    ledger = await ledger_of(sessions, order_id, "notify_warehouse")
    attempts = step_of(order, "notify_warehouse")["attempts"]
    assert ledger == Ledger(
        "succeeded", attempts, f"0.{attempts}", "WarehouseUnavailable", False, 0
    ), ledger
    assert [d.answered for d in receiver.deliveries_for(order_id)] == [202]
    assert await dead_letters(sessions, order_id) == []


async def test_webhook_that_outlives_its_timeout_is_retried(
    settings: Settings, env: WorkflowEnvironment, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The first delivery reaches a warehouse that never answers it: the attempt gives up after
    WEBHOOK_TIMEOUT_SECONDS (long before the attempt's own timeout), and the retry is taken."""
    silent = SilentWarehouse(silent=1)
    async with serving_warehouse(silent) as url:
        impatient = settings.model_copy(
            update={
                "WAREHOUSE_WEBHOOK_URL": url,
                "WEBHOOK_TIMEOUT_SECONDS": 0.5,
                "STEP_ATTEMPT_TIMEOUT_SECONDS": 30.0,
            }
        )
        try:
            async with (
                running_worker(env.client, impatient, sessions),
                api_client(impatient) as api,
            ):
                order_id = await place_order(api)
                order = await wait_for_order_status(api, order_id, "completed")
        finally:
            silent.released.set()

    first, second = silent.arrivals
    # The webhook's timeout ended the first attempt, plus at most the backoff before the retry.
    assert 0.5 <= second - first < 0.5 + impatient.RETRY_MAX_INTERVAL_SECONDS + 2, silent.arrivals
    assert await ledger_of(sessions, order_id, "notify_warehouse") == Ledger(
        "succeeded", 2, "0.2", "WarehouseUnavailable", False, 0
    )
    assert step_of(order, "notify_warehouse")["attempts"] == 2
    assert [d.answered for d in silent.deliveries_for(order_id)] == [202]
