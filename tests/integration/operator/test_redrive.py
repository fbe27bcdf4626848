"""Bulk redrives as RedriveWorkflow on real components: the API answers 202 with the progress's
Location; the redrive sends each matching letter's order its retry_step at its pace, reports
total / sent / resolved / failed again / skipped, can be paused, resumed and cancelled, and
counts a letter it finds already retrying as skipped. Its history stays bounded (it continues as
new), and a send repeated after it reached the order counts once and redrives nothing twice."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import partial
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Replayer

from activities.redrive import RedriveActivities
from core import redrives
from core.db import create_engine, create_sessionmaker
from core.models import DeadLetter, DeadLetterStatus
from core.redrives import RedriveFilter, SendInput, SendResult, new_redrive_id, start_redrive
from core.settings import Settings
from core.tracing import sandbox_runner
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, running_worker
from tests.support import count_rows, letter_where, parking, place_order, wait_until
from workflows.redrive import RedriveWorkflow

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
            partial(letter_where, stack.sessions, order_id, "open"),
            within=30,
            message=f"{order_id} parked",
        )
    warehouse.faults.reset()
    return orders


async def progress(api: httpx.AsyncClient, location: str, *, unanswered: bool = False) -> Any:
    """The redrive's progress; with `unanswered`, None when no worker answered (504)."""
    response = await api.get(location)
    if unanswered and response.status_code == 504:
        return None
    assert response.status_code == 200, response.text
    return response.json()


async def wait_for_state(
    api: httpx.AsyncClient, location: str, state: str, within: float = 60
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        # A worker that just took over from a killed one may miss the first query.
        current = await progress(api, location, unanswered=True)
        return current if current and current["state"] == state else None

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

        over = await stack.api.post(f"{location}/pause")
        assert over.status_code == 409 and "over" in over.json()["detail"], over.text
        unknown = f"/dead-letters/redrives/{new_redrive_id()}"
        assert (await stack.api.get(unknown)).status_code == 404
        assert (await stack.api.post(f"{unknown}/cancel")).status_code == 404
        assert (await stack.api.get("/dead-letters/redrives/ord_1")).status_code == 422


async def test_a_redrive_no_worker_answers_for_is_504_not_a_wait_without_end(
    settings: Settings, env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker polls the test's queue: the redrive is started (a workflow nobody runs yet), but
    its progress and its steering find no one to answer and say so with a 504, once the wait
    for an answer (ANSWER_TIMEOUT, shortened here) is over."""
    monkeypatch.setattr(redrives, "ANSWER_TIMEOUT", timedelta(seconds=1))
    async with api_client(settings) as api:
        started = await api.post("/dead-letters/retry", json={"per_second": 1})
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        answers = [await api.get(location)]
        answers += [await api.post(f"{location}/{command}") for command in ("pause", "cancel")]
    for answer in answers:
        assert answer.status_code == 504, answer.text
        assert "worker" in answer.json()["detail"], answer.text
    handle = env.client.get_workflow_handle(started.json()["redrive_id"])
    await handle.terminate("test over: no worker was ever meant to run it")


async def test_pause_stops_the_sends_resume_goes_on_and_a_new_api_process_sees_it(
    settings: Settings, own_database: str, env: WorkflowEnvironment, warehouse: WarehouseReceiver
) -> None:
    async with own_stack(settings, own_database, env) as stack:
        orders = await park_orders(stack, warehouse, 6)
        started = await stack.api.post("/dead-letters/retry", json={"per_second": 2})
        location = started.headers["Location"]
        redrive_id = started.json()["redrive_id"]
        await wait_until(
            lambda: _sent_at_least(stack.api, location, 2), within=30, message="2 sent"
        )
        paused = await stack.api.post(f"{location}/pause")
        assert paused.status_code == 200 and paused.json()["state"] == "paused", paused.text
        # A send under way when the pause came completes; none starts after it.
        await wait_until(
            lambda: _no_send_under_way(stack.client, redrive_id), message="the send in flight"
        )
        frozen = (await progress(stack.api, location))["sent"]
        delivered = len(warehouse.accepted)
        await asyncio.sleep(3)  # the window in which nothing may be sent
        still = await progress(stack.api, location)
        assert (still["state"], still["sent"]) == ("paused", frozen)
        assert len(warehouse.accepted) == delivered
        assert frozen < len(orders)
        details = await _current_details(stack.client, redrive_id)
        assert "Paused" in details and f"{frozen} of 6 sent" in details

    # Another API process (its own lifespan and Temporal client) steers the same redrive.
    async with own_stack(settings, own_database, env) as stack:
        resumed_at = time.time()
        resumed = await stack.api.post(f"{location}/resume")
        assert resumed.status_code == 200 and resumed.json()["state"] == "sending", resumed.text
        final = await wait_for_state(stack.api, location, "finished")
        assert (final["total"], final["sent"], final["resolved"], final["skipped"]) == (6, 6, 6, 0)
        for order_id in orders:
            assert await retry_updates(stack.client, order_id) == 1

    # Seconds behind its schedule after the pause, the redrive does not catch up in a burst:
    # it starts its schedule afresh at the resume, so the n-th letter left goes out no earlier
    # than (n-1)/per_second after the first (later, if a send was slow: that is made up for).
    after = [at for at in accepted_at(warehouse, orders) if at > resumed_at]
    assert len(after) == len(orders) - frozen >= 2, after
    since_first = [round(at - after[0], 2) for at in after]
    assert all(at >= n / 2 - 0.3 for n, at in enumerate(since_first)), since_first


async def test_cancel_stops_the_redrive_and_leaves_the_rest_open(
    settings: Settings, own_database: str, env: WorkflowEnvironment, warehouse: WarehouseReceiver
) -> None:
    async with own_stack(settings, own_database, env) as stack:
        orders = await park_orders(stack, warehouse, 6)
        started = await stack.api.post("/dead-letters/retry", json={"per_second": 1})
        location = started.headers["Location"]
        await wait_until(
            lambda: _sent_at_least(stack.api, location, 2), within=30, message="2 sent"
        )
        cancelled = await stack.api.post(f"{location}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        handle = stack.client.get_workflow_handle(started.json()["redrive_id"])
        final = await handle.result()
        assert final["state"] == "cancelled" and final["finished_at"]
        assert 2 <= final["sent"] < len(orders) and final["skipped"] == 0
        await asyncio.sleep(2)  # long enough for two more sends at 1/s, had it gone on
        redriven = [order_id for order_id in orders if await retry_updates(stack.client, order_id)]
        assert len(redriven) == final["sent"]
        still_open = await count_rows(stack.sessions, DeadLetter, DeadLetter.status == "open")
        assert still_open == len(orders) - final["sent"]
        again = await stack.api.post(f"{location}/resume")
        assert again.status_code == 409, again.text


async def test_a_temporal_cancellation_stops_it_as_the_cancel_update_does(
    settings: Settings, own_database: str, env: WorkflowEnvironment, warehouse: WarehouseReceiver
) -> None:
    async with own_stack(settings, own_database, env) as stack:
        orders = await park_orders(stack, warehouse, 4)
        started = await stack.api.post("/dead-letters/retry", json={"per_second": 1})
        location = started.headers["Location"]
        await wait_until(lambda: _sent_at_least(stack.api, location, 1), message="1 sent")
        handle = stack.client.get_workflow_handle(started.json()["redrive_id"])
        await handle.cancel()  # what the Web UI's Request Cancellation sends
        final = await handle.result()
        assert final["state"] == "cancelled" and 1 <= final["sent"] < len(orders)
        assert (await progress(stack.api, location))["state"] == "cancelled"
        redriven = [order_id for order_id in orders if await retry_updates(stack.client, order_id)]
        assert len(redriven) == final["sent"]


async def test_letters_closed_meanwhile_are_skipped_and_a_failure_again_is_counted(
    settings: Settings, own_database: str, env: WorkflowEnvironment, warehouse: WarehouseReceiver
) -> None:
    async with own_stack(settings, own_database, env) as stack:
        letters = {}
        for order_id in await park_orders(stack, warehouse, 3):
            letter = await letter_where(stack.sessions, order_id, "open")
            assert letter is not None
            letters[order_id] = letter.id
        started = await stack.api.post("/dead-letters/retry", json={"per_second": 0.25})
        location = started.headers["Location"]
        await wait_until(
            lambda: _total_known(stack.api, location), message="the redrive took its letters"
        )
        # Held while the test sets the scene, so the scene does not race the redrive's pace on
        # a busy machine: at most the first letter has been sent, and its webhook is through.
        paused = await stack.api.post(f"{location}/pause")
        assert paused.status_code == 200, paused.text
        redrive_id = started.json()["redrive_id"]
        await wait_until(
            lambda: _no_send_under_way(stack.client, redrive_id), message="the send in flight"
        )
        sent = int((await progress(stack.api, location))["sent"])
        resolved = DeadLetter.status == DeadLetterStatus.RESOLVED

        async def sent_through() -> bool:
            return await count_rows(stack.sessions, DeadLetter, resolved) == sent

        await wait_until(sent_through, message="the letter sent before the pause redriven")
        # An operator retries by hand the letter whose turn comes last (the redrive takes the
        # oldest first), before it comes.
        third = max(letters, key=lambda order_id: letters[order_id])
        by_hand = await stack.api.post(f"/dead-letters/{letters[third]}/retry")
        assert by_hand.status_code == 202, by_hand.text
        await wait_until(
            partial(letter_where, stack.sessions, third, DeadLetterStatus.RESOLVED),
            message="the third retried by hand",
        )
        # The redrive's next webhook (the first order's, or the second's) is refused again.
        warehouse.faults.configure(fail_next=1, status=400)
        resumed = await stack.api.post(f"{location}/resume")
        assert resumed.status_code == 200, resumed.text
        final = await wait_for_state(stack.api, location, "finished")
        counts = {k: final[k] for k in ("total", "sent", "resolved", "failed_again", "skipped")}
        assert counts == {"total": 3, "sent": 2, "resolved": 1, "failed_again": 1, "skipped": 1}
        assert final["last_skips"], final
        # Each order got one retry_step: the redrive's, or the operator's for the third.
        for order_id in letters:
            assert await retry_updates(stack.client, order_id) == 1
        # The occurrence opened by the failure again is not this redrive's business.
        others = [order_id for order_id in letters if order_id != third]
        reopened = [await letter_where(stack.sessions, o, "open") for o in others]
        [again] = [letter for letter in reopened if letter is not None]
        assert again.occurrence == 2


async def test_a_long_redrive_continues_as_new_with_a_bounded_history(
    settings: Settings, own_database: str, env: WorkflowEnvironment, warehouse: WarehouseReceiver
) -> None:
    async with own_stack(settings, own_database, env) as stack:
        orders = await park_orders(stack, warehouse, 6)
        bound = 40
        redrive_id = await start_redrive(
            stack.client,
            stack.settings.TEMPORAL_TASK_QUEUE,
            RedriveFilter(step=STEP, order_ids=orders),
            per_second=10,
            page_size=2,
            continue_after_events=bound,
        )
        final = await wait_for_state(stack.api, f"/dead-letters/redrives/{redrive_id}", "finished")
        assert (final["total"], final["sent"], final["resolved"]) == (6, 6, 6)
        runs = []
        async for execution in stack.client.list_workflows(f'WorkflowId = "{redrive_id}"'):
            runs.append(execution.run_id)
        assert len(runs) >= 2, runs
        for run_id in runs:
            history = await stack.client.get_workflow_handle(
                redrive_id, run_id=run_id
            ).fetch_history()
            # The bound is checked between sends; one send and its timer come on top.
            assert len(history.events) <= bound + 20, (run_id, len(history.events))
            # Each run replays with the code as it is (the sandbox, as the worker runs it).
            await Replayer(
                workflows=[RedriveWorkflow], workflow_runner=sandbox_runner()
            ).replay_workflow(history)


async def test_a_send_repeated_after_it_reached_the_order_counts_once(
    env: WorkflowEnvironment,
    worker: object,
    api: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    """What a worker killed between sending and recording finds when the send runs again."""
    warehouse.faults.configure(fail_rate=1.0, status=400)
    async with parking(sessions, env.client) as parker:
        letter = await parker.park(api)
        warehouse.faults.configure(fail_rate=0.0, latency_ms=1500)
        activities = RedriveActivities(sessions, env.client)
        send = SendInput(new_redrive_id(), letter.id)
        first = ActivityEnvironment()
        assert await first.run(activities.send_redrive_retry, send) == SendResult(sent=True)
        again = ActivityEnvironment()
        again.info = dataclasses.replace(again.info, attempt=2)
        assert await again.run(activities.send_redrive_retry, send) == SendResult(sent=True)
        # Another redrive meeting the same letter skips it: a retry is already under way.
        other = await ActivityEnvironment().run(
            activities.send_redrive_retry, SendInput(new_redrive_id(), letter.id)
        )
        assert not other.sent and other.reason
        # Nor does a repeat of such a send, which asks the workflow whatever the letter's row says.
        stranger = ActivityEnvironment()
        stranger.info = dataclasses.replace(stranger.info, attempt=2)
        repeat = await stranger.run(
            activities.send_redrive_retry, SendInput(new_redrive_id(), letter.id)
        )
        assert not repeat.sent and repeat.reason, repeat
        await wait_until(
            lambda: letter_where(sessions, letter.order_id, DeadLetterStatus.RESOLVED),
            message="the letter resolved",
        )
        assert await retry_updates(env.client, letter.order_id) == 1
        accepted = [d for d in warehouse.deliveries_for(letter.order_id) if d.answered == 202]
        assert len(accepted) == 1


async def _sent_at_least(api: httpx.AsyncClient, location: str, count: int) -> bool:
    return bool((await progress(api, location))["sent"] >= count)


async def _total_known(api: httpx.AsyncClient, location: str) -> bool:
    return bool((await progress(api, location))["state"] != "listing")


async def _no_send_under_way(client: Client, redrive_id: str) -> bool:
    described = await client.get_workflow_handle(redrive_id).describe()
    return not described.raw_description.pending_activities


async def _current_details(client: Client, redrive_id: str) -> str:
    metadata = await client.get_workflow_handle(redrive_id).query("__temporal_workflow_metadata")
    return str(metadata.current_details)
