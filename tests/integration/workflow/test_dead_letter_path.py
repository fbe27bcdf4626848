"""A follow-up that gives up: parked as a dead letter after its bounded retries (or at once on a
permanent error), visible to the operator in the API and in Temporal, and retried on request."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import Request, Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.dead_letters import DeadLetterActivities
from core.contracts import (
    ORDER_STATUS_ATTRIBUTE,
    DeadLetterInput,
    RetryStepInput,
    StepCommandResult,
)
from core.ledger import record_success
from core.models import DeadLetter
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import WEBHOOK_SECRET, api_client, running_worker, serving_warehouse
from tests.support import place_order, wait_for_order_status, wait_until
from workflows.order import OrderWorkflow


async def open_dead_letter(api: httpx.AsyncClient, order_id: str) -> dict[str, Any]:
    """Waits for the order's open dead letter to be listed and returns it."""

    async def probe() -> list[dict[str, Any]]:
        response = await api.get("/dead-letters", params={"status": "open"})
        assert response.status_code == 200, response.text
        return [item for item in response.json()["items"] if item["order_id"] == order_id]

    letters: list[dict[str, Any]] = await wait_until(
        probe, within=30, message=f"open dead letter of {order_id}"
    )
    assert len(letters) == 1, letters
    return letters[0]


async def step_state(env: WorkflowEnvironment, order_id: str, step: str) -> str:
    status = await env.client.get_workflow_handle_for(OrderWorkflow.run, order_id).query(
        OrderWorkflow.status
    )
    return str(status.steps[step].status)


async def search_status(env: WorkflowEnvironment, order_id: str) -> str | None:
    described = await env.client.get_workflow_handle(order_id).describe()
    return described.typed_search_attributes.get(ORDER_STATUS_ATTRIBUTE)


async def listed_as(env: WorkflowEnvironment, order_id: str, status: str) -> bool:
    query = f'OrderStatus="{status}" AND WorkflowId="{order_id}"'
    return [w.id async for w in env.client.list_workflows(query)] == [order_id]


async def test_webhook_always_500_is_dead_lettered_then_retried_through_the_api(
    api: httpx.AsyncClient,
    worker: Worker,
    env: WorkflowEnvironment,
    settings: Settings,
    warehouse: WarehouseReceiver,
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=500)
    order_id = await place_order(api)

    letter = await open_dead_letter(api, order_id)
    assert letter["step"] == "notify_warehouse"
    assert letter["attempts"] == settings.RETRY_MAX_ATTEMPTS
    assert "500" in letter["error_message"]
    assert letter["error_type"] == "WarehouseUnavailable"
    assert letter["permanent"] is False
    assert letter["workflow_id"] == order_id
    assert letter["created_at"]
    # The dead letter is written once the retries are spent, so no attempt can follow it.
    deliveries = warehouse.deliveries_for(order_id)
    assert len(deliveries) == settings.RETRY_MAX_ATTEMPTS
    assert all(d.answered == 500 and d.signature_valid for d in deliveries)

    order = await wait_for_order_status(api, order_id, "needs_attention")
    steps = {step["step"]: step for step in order["steps"]}
    assert steps["notify_warehouse"]["status"] == "dead_lettered"
    assert steps["notify_warehouse"]["attempts"] == settings.RETRY_MAX_ATTEMPTS
    assert "500" in steps["notify_warehouse"]["last_error"]
    await wait_until(
        lambda: _equals(step_state(env, order_id, "notify_warehouse"), "dead_lettered"),
        message="status query shows the step dead_lettered",
    )
    await wait_until(
        lambda: _equals(search_status(env, order_id), "needs_attention"),
        message="OrderStatus upserted",
    )
    await wait_until(
        lambda: listed_as(env, order_id, "needs_attention"),
        within=30,
        message="visible to the Web UI's OrderStatus query",
    )
    # The other follow-up went on regardless.
    await wait_until(
        lambda: _equals(step_state(env, order_id, "send_receipt"), "succeeded"),
        message="receipt sent",
    )

    warehouse.faults.reset()
    retried = await api.post(f"/dead-letters/{letter['id']}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.json()["dead_letter_id"] == letter["id"]

    await wait_for_order_status(api, order_id, "completed")
    resolved = await api.get(f"/dead-letters/{letter['id']}")
    assert resolved.json()["status"] == "resolved"
    deliveries = warehouse.deliveries_for(order_id)
    assert len(deliveries) == settings.RETRY_MAX_ATTEMPTS + 1
    assert deliveries[-1].answered == 202
    await wait_until(
        lambda: _equals(search_status(env, order_id), "completed"), message="OrderStatus completed"
    )
    # A dead letter that is no longer open cannot be retried again.
    again = await api.post(f"/dead-letters/{letter['id']}/retry")
    assert again.status_code == 409
    assert "resolved" in again.json()["detail"]


async def test_warehouse_400_is_dead_lettered_at_once_as_permanent(
    api: httpx.AsyncClient,
    worker: Worker,
    warehouse: WarehouseReceiver,
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=400)
    order_id = await place_order(api)

    letter = await open_dead_letter(api, order_id)

    assert letter["permanent"] is True
    assert letter["attempts"] == 1
    assert letter["error_type"] == "WarehouseRejected"
    assert [d.answered for d in warehouse.deliveries_for(order_id)] == [400]
    await wait_for_order_status(api, order_id, "needs_attention")


async def test_retry_step_validator_rejects_unknown_and_not_parked_steps(
    api: httpx.AsyncClient,
    worker: Worker,
    env: WorkflowEnvironment,
    warehouse: WarehouseReceiver,
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=400)
    order_id = await place_order(api)
    await open_dead_letter(api, order_id)
    await wait_until(
        lambda: _equals(step_state(env, order_id, "notify_warehouse"), "dead_lettered"),
        message="warehouse step parked",
    )
    handle = env.client.get_workflow_handle(order_id)

    with pytest.raises(WorkflowUpdateFailedError) as unknown:
        await handle.execute_update("retry_step", RetryStepInput("refund_card"))
    assert "unknown step" in str(unknown.value.cause)
    with pytest.raises(WorkflowUpdateFailedError) as not_parked:
        await handle.execute_update("retry_step", RetryStepInput("send_receipt"))
    assert "not dead_lettered" in str(not_parked.value.cause)

    # The parked step itself is accepted.
    warehouse.faults.reset()
    accepted = await handle.execute_update(
        "retry_step", RetryStepInput("notify_warehouse"), result_type=StepCommandResult
    )
    assert accepted.step == "notify_warehouse"
    await wait_for_order_status(api, order_id, "completed")


async def test_retry_of_an_unknown_dead_letter_is_404(api: httpx.AsyncClient) -> None:
    response = await api.post("/dead-letters/999999999/retry")
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]


async def _equals(value: Any, expected: object) -> bool:
    return bool(await value == expected)


class LateSuccessWarehouse(WarehouseReceiver):
    """Refuses every call for good (400), but first records the step succeeded, as an earlier
    attempt that outlived the step's budget does when it delivers and records just before the
    step is parked."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        super().__init__(WEBHOOK_SECRET.encode())
        self.faults.configure(fail_rate=1.0, status=400)
        self._sessions = sessions

    async def receive(self, request: Request) -> Response:
        order_id = json.loads(await request.body())["order_id"]
        async with self._sessions.begin() as session:
            await record_success(session, order_id, "notify_warehouse", 1, {"http_status": 202})
        return await super().receive(request)


async def test_a_step_that_succeeded_meanwhile_is_not_parked(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """A step's attempt fails for good while the ledger already says the step succeeded: no dead
    letter is opened (a retry of it would perform the effect again), and the workflow takes the
    step as succeeded."""
    late = LateSuccessWarehouse(sessions)
    async with serving_warehouse(late) as url:
        refusing = settings.model_copy(update={"WAREHOUSE_WEBHOOK_URL": url})
        async with running_worker(env.client, refusing, sessions), api_client(refusing) as api:
            order_id = await place_order(api)
            order = await wait_for_order_status(api, order_id, "completed")
            result = await env.client.get_workflow_handle_for(OrderWorkflow.run, order_id).result()

    assert [d.answered for d in late.deliveries_for(order_id)] == [400]
    assert {step["status"] for step in order["steps"]} == {"succeeded"}
    assert str(result.steps["notify_warehouse"].status) == "succeeded"
    async with sessions() as session:
        letters = (
            await session.scalars(select(DeadLetter).where(DeadLetter.order_id == order_id))
        ).all()
    assert letters == []


async def test_a_redelivered_dead_letter_answers_with_the_first_and_opens_no_second(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """record_dead_letter delivered twice for one occurrence (its first answer lost): the
    second delivery returns the first's letter, and the step has one open letter, not two."""
    async with api_client(settings) as api:
        order_id = await place_order(api)
    letter = DeadLetterInput(
        order_id=order_id,
        step="notify_warehouse",
        occurrence=1,
        error_type="WarehouseRejected",
        error_message="warehouse answered 400",
        permanent=True,
        workflow_id=order_id,
        run_id="run-1",
    )
    activities = DeadLetterActivities(sessions)
    first = await ActivityEnvironment().run(activities.record_dead_letter, letter)
    again = await ActivityEnvironment().run(activities.record_dead_letter, letter)

    assert again == first
    async with sessions() as session:
        letters = (
            await session.scalars(select(DeadLetter).where(DeadLetter.order_id == order_id))
        ).all()
    assert [(each.id, each.status) for each in letters] == [(first.dead_letter_id, "open")]
