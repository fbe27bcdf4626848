"""Bulk redrives as RedriveWorkflow on real components: the API answers 202 with the progress's
Location; the redrive sends each matching letter's order its retry_step at its pace, reports
total / sent / resolved / failed again / skipped, can be paused, resumed and cancelled, and
counts a letter it finds already retrying as skipped. Its history stays bounded (it continues as
new), and a send repeated after it reached the order counts once and redrives nothing twice."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.redrive import RedriveActivities
from core.db import create_engine, create_sessionmaker
from core.models import DeadLetter, DeadLetterStatus
from core.redrives import SendInput, new_redrive_id, start_redrive, RedriveFilter
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, running_worker
from tests.support import count_rows, letter_where, place_order, wait_until

STEP = "notify_warehouse"
REJECTED = "WarehouseRejected"


@dataclasses.dataclass
class Stack:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    api: httpx.AsyncClient
    client: Client


@asynccontextmanager
async def own_stack(
    settings: Settings, own_database: str, env: WorkflowEnvironment
) -> AsyncIterator[Stack]:
    """A worker and the API on a database of the test's own, so a redrive sees only its letters."""
    settings = settings.model_copy(update={"DATABASE_URL": own_database})
    engine = create_engine(settings)
    sessions = create_sessionmaker(engine)
    try:
        async with running_worker(env.client, settings, sessions), api_client(settings) as api:
            yield Stack(settings, sessions, api, env.client)
    finally:
        await engine.dispose()


async def park_orders(stack: Stack, warehouse: WarehouseReceiver, count: int) -> list[str]:
    """`count` orders whose warehouse step is parked (a permanent refusal), the fault healed."""
    warehouse.faults.configure(fail_rate=1.0, status=400)
    orders = [await place_order(stack.api) for _ in range(count)]
    for order_id in orders:
        await wait_until(
            lambda order_id=order_id: letter_where(stack.sessions, order_id, "open"),
            within=30,
            message=f"{order_id} parked",
        )
    warehouse.faults.reset()
    return orders


async def progress(api: httpx.AsyncClient, location: str) -> dict[str, Any]:
    response = await api.get(location)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def wait_for_state(
    api: httpx.AsyncClient, location: str, state: str, within: float = 60
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        current = await progress(api, location)
        return current if current["state"] == state else None

    found: dict[str, Any] = await wait_until(
        probe, within=within, interval=0.2, message=f"redrive {state}"
    )
    return found


def accepted_at(warehouse: WarehouseReceiver, orders: list[str]) -> list[float]:
    """When the warehouse first accepted each order's webhook (after its redrive), sorted."""
    times = []
    for order_id in orders:
        accepted = [d for d in warehouse.deliveries_for(order_id) if d.answered == 202]
        assert len(accepted) == 1, f"{order_id} accepted {len(accepted)} times"
        times.append(accepted[0].received_at)
    return sorted(times)


async def retry_updates(client: Client, order_id: str) -> int:
    """How many retry_step updates the order's workflow accepted."""
    accepted = [
        event.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
        async for event in client.get_workflow_handle(order_id).fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]
    return accepted.count("retry_step")


async def test_bulk_retry_is_a_paced_redrive_whose_progress_is_at_its_location(
    settings: Settings, own_database: str, env: WorkflowEnvironment, warehouse: WarehouseReceiver
) -> None:
    async with own_stack(settings, own_database, env) as stack:
        orders = await park_orders(stack, warehouse, 8)
        per_second = 2.0
        started = time.monotonic()
        response = await stack.api.post(
            "/dead-letters/retry",
            json={"step": STEP, "error_type": REJECTED, "per_second": per_second},
        )
        answered_in = time.monotonic() - started
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
        redrive_id = response.json()["redrive_id"]
        assert location == f"/dead-letters/redrives/{redrive_id}" == response.json()["progress_url"]
        assert redrive_id.startswith("redrive-")
        # The request no longer holds while the redrive runs.
        assert answered_in < (len(orders) - 1) / per_second

        final = await wait_for_state(stack.api, location, "finished")
        took = time.monotonic() - started
        assert {k: final[k] for k in ("total", "sent", "resolved", "failed_again", "skipped")} == {
            "total": 8,
            "sent": 8,
            "resolved": 8,
            "failed_again": 0,
            "skipped": 0,
        }
        assert final["filter"] == {"step": STEP, "error_type": REJECTED, "order_ids": []}
        assert final["finished_at"] >= final["started_at"]
        # The n-th redrive starts no earlier than (n-1)/per_second after the first.
        arrivals = accepted_at(warehouse, orders)
        span = arrivals[-1] - arrivals[0]
        assert span >= (len(orders) - 1) / per_second - 0.3, arrivals
        assert span < (len(orders) - 1) / per_second + 5, arrivals
        for order_id in orders:
            assert await retry_updates(stack.client, order_id) == 1
            letters = await stack.api.get("/dead-letters", params={"order_id": order_id})
            [letter] = letters.json()["items"]
            assert (letter["status"], letter["resolution"]) == ("resolved", "succeeded")
        assert await count_rows(stack.sessions, DeadLetter, DeadLetter.status == "open") == 0
        print(
            f"\nredrive figures: {len(orders)} letters at {per_second:g}/s, first to last "
            f"delivery {span:.2f} s, finished {took:.2f} s after the request"
        )
