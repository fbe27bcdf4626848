"""The retry policy an order runs under (activities/policy.py, workflows/order_policy.py), on
the real worker: read once when the order's workflow starts and recorded in its history, so a
later change of settings does not touch a workflow already running; and the edge of the
attempt budget, RETRY_MAX_ATTEMPTS=1, parks a failed first attempt at once."""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from core.models import DeadLetter, DeadLetterStatus
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, running_worker
from tests.support import (
    letter_where,
    parked_in_its_workflow,
    place_order,
    wait_for_order_status,
    wait_for_workflow_closed,
    wait_until,
)

STEP = "notify_warehouse"
Sessions = async_sessionmaker[AsyncSession]


async def timer_summaries(client: Client, order_id: str) -> list[str]:
    """What each durable timer the workflow started was for, as its summary says."""
    return [
        json.loads(event.user_metadata.summary.data)
        async for event in client.get_workflow_handle(order_id).fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED
    ]


async def scheduled_activities(client: Client, order_id: str) -> list[str]:
    return [
        event.activity_task_scheduled_event_attributes.activity_type.name
        async for event in client.get_workflow_handle(order_id).fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


async def discard_to_the_end(api: httpx.AsyncClient, client: Client, letter: DeadLetter) -> None:
    """Tidies up: the parked step is discarded, which lets the order's workflow close."""
    await parked_in_its_workflow(client, letter.order_id, STEP)
    discarded = await api.post(
        f"/dead-letters/{letter.id}/discard", json={"reason": "test over", "actor": "test"}
    )
    assert discarded.status_code == 200, discarded.text
    await wait_for_workflow_closed(client, letter.order_id)


@pytest.mark.parametrize("first_attempt", ["local", "activity"])
async def test_one_attempt_parks_a_failed_first_attempt_at_once(
    first_attempt: str,
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: Sessions,
    warehouse: WarehouseReceiver,
) -> None:
    """A retryable failure (503) with RETRY_MAX_ATTEMPTS=1: no backoff, no second attempt."""
    once = settings.model_copy(
        update={
            "RETRY_MAX_ATTEMPTS": 1,
            "STEP_FIRST_ATTEMPT": first_attempt,
            # Long enough that a wait before a second attempt would show.
            "RETRY_INITIAL_INTERVAL_SECONDS": 30.0,
            "RETRY_MAX_INTERVAL_SECONDS": 30.0,
        }
    )
    warehouse.faults.configure(fail_rate=1.0, status=503)
    async with running_worker(env.client, once, sessions), api_client(once) as api:
        order_id = await place_order(api)
        order = await wait_for_order_status(api, order_id, "needs_attention")
        letter = await letter_where(sessions, order_id, DeadLetterStatus.OPEN)
        assert letter is not None
        await discard_to_the_end(api, env.client, letter)

    assert (letter.step, letter.attempts, letter.permanent) == (STEP, 1, False)
    assert letter.error_type == "WarehouseUnavailable"
    assert [d.answered for d in warehouse.deliveries_for(order_id)] == [503]
    assert {s["step"]: s["attempts"] for s in order["steps"]}[STEP] == 1
    # Parked without waiting: the one timer is the park's. The only step activity task is the
    # first attempt itself when it is not a local activity.
    [park] = await timer_summaries(env.client, order_id)
    assert "parked" in park and "backoff" not in park, park
    step_tasks = [name for name in await scheduled_activities(env.client, order_id) if name == STEP]
    assert step_tasks == ([] if first_attempt == "local" else [STEP])


async def test_a_settings_change_does_not_alter_a_running_workflows_policy(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: Sessions,
    warehouse: WarehouseReceiver,
) -> None:
    """The order starts under two attempts and parks; the worker is replaced by one configured
    for five; the operator's retry still gets the two the order started with."""
    before = settings.model_copy(update={"RETRY_MAX_ATTEMPTS": 2})
    after = settings.model_copy(update={"RETRY_MAX_ATTEMPTS": 5})
    warehouse.faults.configure(fail_rate=1.0, status=503)
    async with running_worker(env.client, before, sessions), api_client(before) as api:
        order_id = await place_order(api)
        first = await wait_until(
            lambda: letter_where(sessions, order_id, DeadLetterStatus.OPEN),
            within=30,
            message="parked under the first worker",
        )
        await parked_in_its_workflow(env.client, order_id, STEP)
    assert first.attempts == 2
    assert len(warehouse.deliveries_for(order_id)) == 2

    # The worker that held the workflow is gone: the new one replays its history.
    async with running_worker(env.client, after, sessions), api_client(after) as api:
        retried = await api.post(f"/dead-letters/{first.id}/retry")
        assert retried.status_code == 202, retried.text

        async def parked_again() -> bool:
            letter = await letter_where(sessions, order_id, DeadLetterStatus.OPEN)
            return letter is not None and letter.id != first.id

        await wait_until(parked_again, within=30, message="parked again after the retry")
        second = await letter_where(sessions, order_id, DeadLetterStatus.OPEN)
        assert second is not None
        await discard_to_the_end(api, env.client, second)

    assert (second.occurrence, second.attempts) == (2, 2)
    assert [d.answered for d in warehouse.deliveries_for(order_id)] == [503] * 4
