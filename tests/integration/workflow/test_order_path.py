"""The order path end to end on real components: API, Temporal dev server, SMTP, HTTP receiver."""

from __future__ import annotations

from dataclasses import replace

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.converter import DataConverter
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.receipt import ReceiptActivities
from activities.retry import Backoff
from activities.smtp import SmtpMailer
from core.contracts import OrderWorkflowInput, StepInput, StepResult
from core.models import Order, PaymentCharge
from core.policy import step_policy
from core.settings import Settings
from core.signing import SIGNATURE_HEADER
from core.states import StepOutcome
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import WEBHOOK_SECRET, api_client, running_worker
from tests.support import (
    new_key,
    order_body,
    place_order,
    wait_for_order_status,
    wait_for_workflow_closed,
    wait_until,
)


async def order_status(api: httpx.AsyncClient, order_id: str) -> str:
    response = await api.get(f"/orders/{order_id}")
    assert response.status_code == 200
    return str(response.json()["status"])


async def test_happy_path_sends_one_receipt_and_one_signed_webhook(
    api: httpx.AsyncClient,
    worker: Worker,
    env: WorkflowEnvironment,
    mail: MailSink,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    body = order_body()
    response = await api.post("/orders", json=body, headers={"Idempotency-Key": new_key()})

    assert response.status_code == 202
    accepted = response.json()
    order_id = accepted["order_id"]
    assert accepted == {"order_id": order_id, "workflow_id": order_id, "status": "processing"}
    assert response.headers["Location"] == f"/orders/{order_id}"

    await wait_until(lambda: _is(api, order_id, "completed"), message="order completed")
    receipts = mail.to(body["customer_email"])
    assert len(receipts) == 1
    assert order_id in receipts[0].message_id
    assert "26.99 USD" in receipts[0].message.get_content()
    deliveries = warehouse.deliveries_for(order_id)
    assert len(deliveries) == 1
    assert deliveries[0].signature_valid
    assert deliveries[0].idempotency_key == f"{order_id}:notify_warehouse"
    assert deliveries[0].body["amount_cents"] == 2699

    described = await env.client.get_workflow_handle(order_id).describe()
    assert described.workflow_type == "OrderWorkflow"
    async with sessions() as session:
        order = await session.get(Order, order_id)
        assert order is not None and order.amount_cents == 2699
        charges = await session.scalar(
            select(func.count())
            .select_from(PaymentCharge)
            .where(PaymentCharge.id == order.charge_id)
        )
        assert charges == 1
    assert SIGNATURE_HEADER and WEBHOOK_SECRET  # the receiver verified with the shared secret


async def test_a_first_try_order_costs_eight_events_one_workflow_task_and_no_activity_task(
    env: WorkflowEnvironment, settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """What docs/benchmarks.md and docs/capacity.md count on, read from the order's real
    history: the policy arrives in the input, and both steps' first attempts run as local
    activities inside the first workflow task."""
    local_first = settings.model_copy(
        update={"WORKFLOW_START_MODE": "request", "STEP_FIRST_ATTEMPT": "local"}
    )
    async with running_worker(env.client, local_first, sessions), api_client(local_first) as api:
        order_id = await place_order(api)
        await wait_for_order_status(api, order_id, "completed")
        await wait_for_workflow_closed(env.client, order_id)

    history = await env.client.get_workflow_handle(order_id).fetch_history()
    kinds = [
        EventType.Name(event.event_type).removeprefix("EVENT_TYPE_") for event in history.events
    ]
    assert kinds == [
        "WORKFLOW_EXECUTION_STARTED",
        "WORKFLOW_TASK_SCHEDULED",
        "WORKFLOW_TASK_STARTED",
        "WORKFLOW_TASK_COMPLETED",
        # Both steps' first attempts: local activities.
        "MARKER_RECORDED",
        "MARKER_RECORDED",
        # OrderStatus: completed.
        "UPSERT_WORKFLOW_SEARCH_ATTRIBUTES",
        "WORKFLOW_EXECUTION_COMPLETED",
    ], kinds
    started = history.events[0].workflow_execution_started_event_attributes
    (carried,) = await DataConverter.default.decode(started.input.payloads, [OrderWorkflowInput])
    assert carried == OrderWorkflowInput(order_id, step_policy(local_first))


async def _is(api: httpx.AsyncClient, order_id: str, status: str) -> bool:
    return await order_status(api, order_id) == status


async def test_webhook_that_fails_twice_is_delivered_on_the_third_attempt(
    api: httpx.AsyncClient, worker: Worker, warehouse: WarehouseReceiver
) -> None:
    warehouse.faults.configure(fail_next=2, status=500)
    order_id = await place_order(api)

    order = await wait_for_order_status(api, order_id, "completed")

    assert [d.answered for d in warehouse.deliveries_for(order_id)] == [500, 500, 202]
    steps = {step["step"]: step for step in order["steps"]}
    assert steps["notify_warehouse"]["status"] == "succeeded"
    assert steps["notify_warehouse"]["attempts"] == 3
    assert steps["send_receipt"]["attempts"] == 1


async def test_receipt_retried_after_its_email_was_sent_does_not_send_it_again(
    api: httpx.AsyncClient,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    mail: MailSink,
) -> None:
    # No worker on this test's queue: the order's workflow waits, and the test runs the activity.
    body = order_body()
    order_id = await place_order(api, body)
    receipts = ReceiptActivities(
        sessions,
        SmtpMailer(settings.SMTP_HOST, settings.SMTP_PORT, settings.SMTP_TIMEOUT_SECONDS),
        Backoff(settings),
        settings,
    )
    activities = ActivityEnvironment()

    first = await activities.run(receipts.send_receipt, StepInput(order_id))
    # Temporal delivers the same task again, as after a lost completion or a worker crash.
    activities.info = replace(activities.info, attempt=2)
    second = await activities.run(receipts.send_receipt, StepInput(order_id))

    assert first == StepResult(order_id, "send_receipt", StepOutcome.PERFORMED)
    assert second == StepResult(order_id, "send_receipt", StepOutcome.ALREADY_DONE)
    assert len(mail.to(body["customer_email"])) == 1
