"""Cancelling an order: `POST /orders/{id}/cancel` signals its workflow, which records the cancel
and skips the warehouse notification unless the warehouse already accepted the order."""

from __future__ import annotations

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment

from core.contracts import OrderWorkflowStatus
from core.models import Order
from core.settings import Settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import running_worker
from tests.support import order_body, place_order, wait_for_order_status

STEP = "notify_warehouse"


async def test_cancel_before_the_follow_ups_ran_skips_the_warehouse(
    api: httpx.AsyncClient,
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
    mail: MailSink,
) -> None:
    body = order_body()
    # No worker polls the task queue yet: the workflow exists but has run nothing.
    order_id = await place_order(api, body)
    cancelled = await api.post(f"/orders/{order_id}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json() == {"order_id": order_id, "status": "cancelling"}

    async with running_worker(env.client, settings, sessions):
        result = await env.client.get_workflow_handle(
            order_id, result_type=OrderWorkflowStatus
        ).result()
    assert result.status == "cancelled"
    assert result.steps[STEP].status == "skipped"
    assert warehouse.deliveries_for(order_id) == []
    # The card was charged, so the customer still gets the receipt.
    assert len(mail.to(body["customer_email"])) == 1
    order = await wait_for_order_status(api, order_id, "cancelled")
    assert order["cancelled_at"] is not None
    assert {s["step"]: s["status"] for s in order["steps"]}[STEP] == "skipped"
    # Idempotent: the same answer again, nothing new happens.
    again = await api.post(f"/orders/{order_id}/cancel")
    assert again.status_code == 202 and again.json()["status"] == "cancelled"


async def test_cancel_after_the_warehouse_accepted_is_too_late(
    api: httpx.AsyncClient, worker: object, warehouse: WarehouseReceiver
) -> None:
    order_id = await place_order(api)
    await wait_for_order_status(api, order_id, "completed")
    refused = await api.post(f"/orders/{order_id}/cancel")
    assert refused.status_code == 409
    assert "warehouse" in refused.json()["detail"]
    assert (await api.post("/orders/ord_does_not_exist/cancel")).status_code == 404
    assert len(warehouse.deliveries_for(order_id)) == 1


async def test_cancel_of_a_parked_order_discards_its_warehouse_dead_letter(
    api: httpx.AsyncClient,
    worker: object,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=503)
    order_id = await place_order(api)
    await wait_for_order_status(api, order_id, "needs_attention")
    assert (await api.post(f"/orders/{order_id}/cancel")).status_code == 202

    result = await env.client.get_workflow_handle(
        order_id, result_type=OrderWorkflowStatus
    ).result()
    assert (result.status, result.steps[STEP].status) == ("cancelled", "skipped")
    async with sessions() as session:
        order = await session.get(Order, order_id)
        assert order is not None and order.status == "cancelled"
    letters = (await api.get("/dead-letters", params={"order_id": order_id})).json()["items"]
    assert [(item["status"], item["discarded_by"]) for item in letters] == [("discarded", "api")]
    assert letters[0]["discard_reason"] == "order cancelled"
    # Nothing was delivered after the cancel: every delivery is one of the failed attempts.
    assert all(d.answered == 503 for d in warehouse.deliveries_for(order_id))
