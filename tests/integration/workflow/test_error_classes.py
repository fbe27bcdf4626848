"""Error classes on real components: what is retried and what is parked at once.

SMTP 4xx and connection errors are retried; SMTP 5xx for a recipient is permanent. The webhook
retries 408, 429 and 5xx and treats any other 4xx as permanent. A permanent failure is
dead-lettered at its first attempt and marked `permanent`."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from core.models import DeadLetter, OrderStep
from core.settings import Settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, free_port, running_worker
from tests.support import order_body, place_order, unique_email, wait_for_order_status, wait_until


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


async def test_smtp_4xx_is_retried_then_sent(
    worker: Worker, api: httpx.AsyncClient, mail: MailSink
) -> None:
    mail.faults.configure(fail_next=1, status=451)
    body = order_body()
    order_id = await place_order(api, body)

    order = await wait_for_order_status(api, order_id, "completed")
    assert step_of(order, "send_receipt")["attempts"] == 2
    assert len(mail.to(body["customer_email"])) == 1


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
