"""The dead-letter lifecycle on real components: occurrences (open -> retrying -> resolved, or
discarded with who and why), the retry_step / discard_step updates and their validators, the
operator API (list with filters and pages, show, retry, discard, paced bulk retry) and the park
timeout on the time-skipping server."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.testing import WorkflowEnvironment

from core.contracts import (
    DiscardStepInput,
    OrderWorkflowStatus,
    RetryStepInput,
)
from core.models import DeadLetter, Order
from core.settings import Settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, running_worker
from tests.integration.operator.conftest import OwnStack
from tests.support import place_order, wait_for_order_status, wait_until

STEP = "notify_warehouse"


async def letters_of(api: httpx.AsyncClient, order_id: str) -> list[dict[str, Any]]:
    response = await api.get("/dead-letters", params={"order_id": order_id})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def wait_for_letters(
    api: httpx.AsyncClient, order_id: str, *statuses: str
) -> list[dict[str, Any]]:
    """Waits until the order's occurrences, oldest first, have exactly these statuses."""

    async def probe() -> list[dict[str, Any]] | None:
        letters = await letters_of(api, order_id)
        return letters if [item["status"] for item in letters] == list(statuses) else None

    found: list[dict[str, Any]] = await wait_until(
        probe, within=30, message=f"dead letters of {order_id} {statuses}"
    )
    return found


async def test_redrive_that_fails_again_opens_the_next_occurrence_and_closes_the_first(
    api: httpx.AsyncClient, worker: object, warehouse: WarehouseReceiver, mail: MailSink
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=503)
    order_id = await place_order(api)
    [first] = await wait_for_letters(api, order_id, "open")
    assert (first["occurrence"], first["step"], first["resolution"]) == (1, STEP, None)
    assert first["error_type"] == "WarehouseUnavailable" and first["attempts"] == 3

    retried = await api.post(f"/dead-letters/{first['id']}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.json()["status"] in ("retrying", "resolved")

    # The redrive gives up too: a second occurrence opens, and the first is closed, not left
    # `retrying` forever.
    first, second = await wait_for_letters(api, order_id, "resolved", "open")
    assert first["resolution"] == "failed_again" and first["resolved_at"] is not None
    assert (second["occurrence"], second["resolution"]) == (2, None)
    assert (await api.post(f"/dead-letters/{first['id']}/retry")).status_code == 409

    warehouse.faults.reset()
    assert (await api.post(f"/dead-letters/{second['id']}/retry")).status_code == 202
    await wait_for_order_status(api, order_id, "completed")
    first, second = await wait_for_letters(api, order_id, "resolved", "resolved")
    assert (first["resolution"], second["resolution"]) == ("failed_again", "succeeded")
    # 3 failed attempts, 3 more on the first redrive, then the one that was accepted.
    assert [d.answered for d in warehouse.deliveries_for(order_id)] == [503] * 6 + [202]
    shown = await api.get(f"/dead-letters/{second['id']}")
    assert shown.status_code == 200 and shown.json()["occurrence"] == 2


async def test_discard_records_who_and_why_and_the_workflow_completes(
    api: httpx.AsyncClient,
    worker: object,
    env: WorkflowEnvironment,
    warehouse: WarehouseReceiver,
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=400)
    order_id = await place_order(api)
    [letter] = await wait_for_letters(api, order_id, "open")
    assert letter["permanent"] and letter["attempts"] == 1

    blank = await api.post(f"/dead-letters/{letter['id']}/discard", json={"reason": "  "})
    assert blank.status_code == 422
    discarded = await api.post(
        f"/dead-letters/{letter['id']}/discard",
        json={"reason": "SKU retired; shipped by hand", "actor": "ada"},
    )
    assert discarded.status_code == 200, discarded.text
    assert discarded.json()["status"] == "discarded"
    [letter] = await letters_of(api, order_id)
    assert (letter["discarded_by"], letter["discard_reason"]) == (
        "ada",
        "SKU retired; shipped by hand",
    )
    assert letter["resolution"] == "discarded"

    result = await env.client.get_workflow_handle(
        order_id, result_type=OrderWorkflowStatus
    ).result()
    assert result.status == "completed"
    assert {name: s.status for name, s in result.steps.items()} == {
        "send_receipt": "succeeded",
        STEP: "discarded",
    }
    order = await wait_for_order_status(api, order_id, "completed")
    assert {s["step"]: s["status"] for s in order["steps"]}[STEP] == "discarded"
    again = await api.post(f"/dead-letters/{letter['id']}/discard", json={"reason": "again"})
    assert again.status_code == 409
    assert (await api.post("/dead-letters/999999999/retry")).status_code == 404
    assert (await api.get("/dead-letters/999999999")).status_code == 404


async def test_updates_are_validated_before_they_reach_the_history(
    api: httpx.AsyncClient, worker: object, env: WorkflowEnvironment, warehouse: WarehouseReceiver
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=400)
    order_id = await place_order(api)
    [letter] = await wait_for_letters(api, order_id, "open")
    await wait_for_order_status(api, order_id, "needs_attention")
    handle = env.client.get_workflow_handle(order_id)

    rejected = {
        "unknown step": ("retry_step", RetryStepInput("ship_by_pigeon")),
        "not parked": ("retry_step", RetryStepInput("send_receipt")),
        "stale letter": ("retry_step", RetryStepInput(STEP, letter["id"] + 1000)),
        "no reason": ("discard_step", DiscardStepInput(STEP, " ")),
    }
    for case, (update, argument) in rejected.items():
        with pytest.raises(WorkflowUpdateFailedError) as failure:
            await handle.execute_update(update, argument)
        assert failure.value.cause is not None, case
    history = await handle.fetch_history()
    assert not [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]

    warehouse.faults.reset()
    await handle.execute_update("retry_step", RetryStepInput(STEP))
    await wait_for_order_status(api, order_id, "completed")


async def test_list_filters_and_pages(
    api: httpx.AsyncClient, worker: object, warehouse: WarehouseReceiver
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=400)
    orders = [await place_order(api) for _ in range(3)]
    ids = [(await wait_for_letters(api, order_id, "open"))[0]["id"] for order_id in orders]
    # Letters of another cause: the retries spent on 503s.
    warehouse.faults.configure(fail_rate=1.0, status=503)
    unavailable = [await place_order(api) for _ in range(2)]
    other_ids = [(await wait_for_letters(api, o, "open"))[0]["id"] for o in unavailable]

    where = {"status": "open", "step": STEP}
    full = (await api.get("/dead-letters", params={**where, "limit": 500})).json()
    assert set(ids) <= {item["id"] for item in full["items"]}
    paged: list[int] = []
    for offset in range(0, full["total"], 2):
        page = (
            await api.get("/dead-letters", params={**where, "limit": 2, "offset": offset})
        ).json()
        assert page["total"] == full["total"] and len(page["items"]) <= 2
        paged += [item["id"] for item in page["items"]]
    assert paged == [item["id"] for item in full["items"]] == sorted(paged)
    assert all(i["status"] == "open" and i["step"] == STEP for i in full["items"])
    none = await api.get("/dead-letters", params={"status": "open", "step": "send_receipt"})
    assert all(item["order_id"] not in orders for item in none.json()["items"])

    for error_type, expected, others in (
        ("WarehouseRejected", ids, other_ids),
        ("WarehouseUnavailable", other_ids, ids),
    ):
        page = await api.get(
            "/dead-letters", params={**where, "error_type": error_type, "limit": 500}
        )
        listed = page.json()
        found = {item["id"] for item in listed["items"]}
        assert set(expected) <= found and not set(others) & found, (error_type, listed)
        assert {item["error_type"] for item in listed["items"]} == {error_type}
        assert listed["total"] == len(found)
    unknown = await api.get("/dead-letters", params={"error_type": "NoSuchError"})
    assert unknown.json()["total"] == 0 and unknown.json()["items"] == []
    assert (await api.get("/dead-letters", params={"status": "lost"})).status_code == 422


async def test_bulk_retry_redrives_every_match_at_the_given_pace(
    own_stack: OwnStack, warehouse: WarehouseReceiver
) -> None:
    api = own_stack.api
    warehouse.faults.configure(fail_rate=1.0, status=400)
    orders = [await place_order(api) for _ in range(4)]
    for order_id in orders:
        await wait_for_letters(api, order_id, "open")
    warehouse.faults.reset()

    per_second = 2.0
    response = await api.post(
        "/dead-letters/retry",
        json={"step": STEP, "error_type": "WarehouseRejected", "per_second": per_second},
    )
    assert response.status_code == 202, response.text
    location = response.headers["Location"]
    outcome = await wait_until(
        lambda: _redrive_over(api, location), within=60, message="the redrive over"
    )
    assert outcome["skipped"] == 0
    assert outcome["sent"] == outcome["total"] == len(orders)
    # The implementation starts the n-th redrive no earlier than (n-1)/per_second.
    elapsed = outcome["finished_at"] - outcome["started_at"]
    assert elapsed >= (len(orders) - 1) / per_second

    for order_id in orders:
        await wait_for_order_status(api, order_id, "completed")
        [letter] = await letters_of(api, order_id)
        assert (letter["status"], letter["resolution"]) == ("resolved", "succeeded")
    listed = (await api.get("/dead-letters", params={"status": "open"})).json()
    assert listed["total"] == 0


async def test_park_timeout_completes_as_needs_attention_and_keeps_the_letter(
    time_skipping: WorkflowEnvironment,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    """On the time-skipping server the two-week park passes at once; the workflow closes as
    needs_attention, its dead letter stays open, and a retry is refused with a clear reason."""
    parked = settings.model_copy(
        update={
            "TEMPORAL_ADDRESS": time_skipping.client.service_client.config.target_host,
            "PARK_TIMEOUT_SECONDS": 14 * 24 * 3600.0,
        }
    )
    warehouse.faults.configure(fail_rate=1.0, status=400)
    async with running_worker(time_skipping.client, parked, sessions), api_client(parked) as api:
        order_id = await place_order(api)
        handle = time_skipping.client.get_workflow_handle(order_id, result_type=OrderWorkflowStatus)
        await wait_until(
            lambda: _dead_lettered(handle), within=30, message="the step dead-lettered"
        )
        # Past the park timeout; the test server fires the timer without real waiting.
        await time_skipping.sleep(timedelta(seconds=parked.PARK_TIMEOUT_SECONDS + 60))
        result = await handle.result()
        assert result.status == "needs_attention"
        assert result.steps[STEP].status == "dead_lettered"
        assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED

        [letter] = await letters_of(api, order_id)
        assert letter["status"] == "open"
        refused = await api.post(f"/dead-letters/{letter['id']}/retry")
        assert refused.status_code == 409 and "closed" in refused.json()["detail"]
        # With no workflow left to ask, a discard is recorded directly.
        discarded = await api.post(
            f"/dead-letters/{letter['id']}/discard", json={"reason": "expired", "actor": "t"}
        )
        assert discarded.status_code == 200 and discarded.json()["status"] == "discarded"
    async with sessions() as session:
        order = await session.get(Order, order_id)
        assert order is not None and order.status == "completed"
        row = await session.get(DeadLetter, letter["id"])
        assert row is not None and row.discarded_by == "t"


async def _redrive_over(api: httpx.AsyncClient, location: str) -> dict[str, Any] | None:
    response = await api.get(location)
    assert response.status_code == 200, response.text
    progress: dict[str, Any] = response.json()
    if progress["state"] != "finished":
        return None
    progress["started_at"] = datetime.fromisoformat(progress["started_at"]).timestamp()
    progress["finished_at"] = datetime.fromisoformat(progress["finished_at"]).timestamp()
    return progress


async def _dead_lettered(handle: WorkflowHandle[Any, OrderWorkflowStatus]) -> bool:
    status = await handle.query("status", result_type=OrderWorkflowStatus)
    return bool(status.steps[STEP].status == "dead_lettered")
