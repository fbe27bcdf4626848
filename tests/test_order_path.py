"""The order path end to end on real components: API, Temporal dev server, SMTP, HTTP receiver."""

from __future__ import annotations

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from core.models import Order, PaymentCharge
from core.signing import SIGNATURE_HEADER
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import WEBHOOK_SECRET
from tests.support import new_key, order_body, wait_until


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


async def _is(api: httpx.AsyncClient, order_id: str, status: str) -> bool:
    return await order_status(api, order_id) == status
