"""Temporal's activity controls during an outage, driven with the real `temporal` CLI against the
session's dev server: a warehouse step retrying as an activity task is paused (no attempt reaches
the receiver), unpaused, reset (its count starts again at the step's attempt 2), and its time
budget keeps running while it is paused."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.api.workflow.v1 import PendingActivityInfo
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.checkpoint import BEFORE_EFFECT
from activities.retry import current_step_attempt
from core.models import DeadLetter, OrderStep
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, running_worker
from tests.integration.operator.test_temporal_cli import temporal
from tests.support import place_order, wait_for_order_status, wait_until

STEP = "notify_warehouse"
PAUSED = PendingActivityState.PENDING_ACTIVITY_STATE_PAUSED
PAUSE_REQUESTED = PendingActivityState.PENDING_ACTIVITY_STATE_PAUSE_REQUESTED
STARTED = PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
# Unpaused, the step retries every RETRY_INTERVAL (Temporal holds a retry about 1 s at least), so
# a quiet window this long would have seen several attempts.
RETRY_INTERVAL = 1.0
QUIET_WINDOW = 6.0


def retrying_every_second(settings: Settings, **changes: object) -> Settings:
    """A step that retries about once a second, without jitter, for as long as the test needs."""
    return settings.model_copy(
        update={
            "STEP_FIRST_ATTEMPT": "local",
            "RETRY_MAX_ATTEMPTS": 1000,
            "RETRY_INITIAL_INTERVAL_SECONDS": RETRY_INTERVAL,
            "RETRY_BACKOFF_COEFFICIENT": 1.0,
            "RETRY_MAX_INTERVAL_SECONDS": RETRY_INTERVAL,
            "RETRY_JITTER": "none",
            "STEP_TOTAL_TIMEOUT_SECONDS": 300.0,
            **changes,
        }
    )


async def step_activity(client: Client, order_id: str) -> PendingActivityInfo | None:
    """The step's pending activity task as `temporal workflow describe` shows it, if any."""
    described = await client.get_workflow_handle(order_id).describe()
    for pending in described.raw_description.pending_activities:
        if pending.activity_type.name == STEP:
            return pending
    return None


async def wait_for_activity(
    client: Client, order_id: str, *, state: int | None = None, attempt: int = 1
) -> PendingActivityInfo:
    async def probe() -> PendingActivityInfo | None:
        pending = await step_activity(client, order_id)
        if pending is None or pending.attempt < attempt:
            return None
        return pending if state is None or pending.state == state else None

    found: PendingActivityInfo = await wait_until(
        probe, within=30, interval=0.05, message=f"{STEP} activity in state {state}"
    )
    return found


async def stays_quiet(
    client: Client, warehouse: WarehouseReceiver, order_id: str, deliveries: int
) -> None:
    """Watches the receiver and the activity for QUIET_WINDOW: no delivery, still paused. This is
    an observation window, not a synchronisation: nothing is expected to happen in it."""
    quiet_until = time.monotonic() + QUIET_WINDOW
    while time.monotonic() < quiet_until:
        assert len(warehouse.deliveries_for(order_id)) == deliveries, "an attempt ran while paused"
        pending = await step_activity(client, order_id)
        assert pending is not None and pending.state == PAUSED
        await asyncio.sleep(0.2)
    assert len(warehouse.deliveries_for(order_id)) == deliveries


async def cli(settings: Settings, *args: str) -> str:
    code, out = await temporal(settings, "activity", *args)
    assert code == 0, out
    return out


class AttemptLog:
    """A checkpoint noting, for each attempt of the step, Temporal's attempt and the step's."""

    def __init__(self) -> None:
        self.attempts: list[tuple[int, int]] = []

    async def __call__(self, point: str) -> None:
        info = activity.info()
        if point == BEFORE_EFFECT and info.activity_type == STEP and not info.is_local:
            self.attempts.append((info.attempt, current_step_attempt()))


async def ledger_row(sessions: async_sessionmaker[AsyncSession], order_id: str) -> OrderStep:
    async with sessions() as session:
        row = await session.get(OrderStep, (order_id, STEP))
        assert row is not None
        return row


async def admin_page(api: httpx.AsyncClient, order_id: str) -> str:
    page = await api.get(f"/admin/orders/{order_id}")
    assert page.status_code == 200, page.text
    return page.text


@pytest.mark.slow
async def test_pause_holds_every_attempt_and_unpause_resumes_them(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    tuned = retrying_every_second(settings)
    # Each attempt takes a second at the receiver, so the pause can land on a running one.
    warehouse.faults.configure(fail_rate=1.0, status=503, latency_ms=1000)
    async with running_worker(env.client, tuned, sessions), api_client(tuned) as api:
        order_id = await place_order(api)
        # The local first attempt and an activity task's have failed: it is retrying.
        running = await wait_for_activity(env.client, order_id, state=STARTED, attempt=2)
        await cli(tuned, "pause", "-w", order_id, "-a", running.activity_id, "--reason", "outage")

        # The attempt already running is not cut short: it reaches the receiver and fails...
        requested = await step_activity(env.client, order_id)
        assert requested is not None and requested.paused
        assert requested.state in (PAUSE_REQUESTED, PAUSED)
        await wait_until(
            lambda: len(warehouse.deliveries_for(order_id)) == running.attempt + 1,
            within=10,
            message="the running attempt finished",
        )
        # ...and then no attempt starts.
        paused = await wait_for_activity(env.client, order_id, state=PAUSED)
        assert paused.pause_info.manual.reason == "outage"
        held = len(warehouse.deliveries_for(order_id))
        await stays_quiet(env.client, warehouse, order_id, held)

        # The ledger, GET /orders/{id} and the status query show it as a step still retrying;
        # the review page adds what Temporal says about the pause.
        order = (await api.get(f"/orders/{order_id}")).json()
        [step] = [s for s in order["steps"] if s["step"] == STEP]
        assert order["status"] == "processing"
        assert step["status"] == "pending" and step["attempts"] == held
        page = await admin_page(api, order_id)
        assert f'data-paused="{STEP}"' in page and "outage" in page
        assert f"activity {paused.activity_id}, attempt {paused.attempt}" in page
        assert "Its time budget still runs" in page

        warehouse.faults.reset()
        await cli(tuned, "unpause", "-w", order_id, "-a", paused.activity_id)
        await wait_for_order_status(api, order_id, "completed")
        assert f'data-paused="{STEP}"' not in await admin_page(api, order_id)

    answers = [d.answered for d in warehouse.deliveries_for(order_id)]
    assert answers == [503] * held + [202]
    assert warehouse.accepted_orders().count(order_id) == 1


@pytest.mark.slow
async def test_reset_starts_the_count_again_at_the_steps_second_attempt(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    tuned = retrying_every_second(settings)
    warehouse.faults.configure(fail_rate=1.0, status=503)
    log = AttemptLog()
    async with (
        running_worker(env.client, tuned, sessions, checkpoint=log),
        api_client(tuned) as api,
    ):
        order_id = await place_order(api)
        retrying = await wait_for_activity(env.client, order_id, attempt=3)
        await cli(tuned, "pause", "-w", order_id, "-a", retrying.activity_id)
        paused = await wait_for_activity(env.client, order_id, state=PAUSED)
        # The local attempt and the activity's attempts 1 .. n-1 have run: the step's 1 .. n.
        before = await ledger_row(sessions, order_id)
        assert before.occurrence_attempts == paused.attempt >= 3
        assert log.attempts[-1] == (paused.attempt - 1, paused.attempt)

        await cli(tuned, "reset", "-w", order_id, "-a", paused.activity_id, "--keep-paused")
        reset = await wait_for_activity(env.client, order_id, state=PAUSED)
        assert reset.attempt == 1, "the server's count starts again"
        assert len(warehouse.deliveries_for(order_id)) == before.attempts, "still paused"

        made = len(log.attempts)
        await cli(tuned, "unpause", "-w", order_id, "-a", reset.activity_id)
        await wait_until(lambda: len(log.attempts) >= made + 2, message="two attempts after reset")
        # Temporal's attempt 1 again, the step's 2 (its local first attempt stays attempt 1).
        assert log.attempts[made : made + 2] == [(1, 2), (2, 3)]
        after = await wait_until(
            lambda: _ledger_with(sessions, order_id, before.attempts + 2),
            message="the ledger has both attempts",
        )
        # The attempts of this occurrence count from 2 again; the step's total keeps growing.
        assert after.occurrence_attempts == 3

        warehouse.faults.reset()
        await wait_for_order_status(api, order_id, "completed")
    assert warehouse.accepted_orders().count(order_id) == 1


async def _ledger_with(
    sessions: async_sessionmaker[AsyncSession], order_id: str, attempts: int
) -> OrderStep | None:
    row = await ledger_row(sessions, order_id)
    return row if row.attempts >= attempts else None


@pytest.mark.slow
@pytest.mark.parametrize("extend", [False, True], ids=["paused", "paused-and-extended"])
async def test_the_time_budget_runs_on_while_paused_and_ends_at_the_unpause(
    extend: bool,
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    budget = 8.0
    tuned = retrying_every_second(settings, STEP_TOTAL_TIMEOUT_SECONDS=budget)
    warehouse.faults.configure(fail_rate=1.0, status=503)
    async with running_worker(env.client, tuned, sessions), api_client(tuned) as api:
        order_id = await place_order(api)
        retrying = await wait_for_activity(env.client, order_id, attempt=2)
        await cli(tuned, "pause", "-w", order_id, "-a", retrying.activity_id)
        paused = await wait_for_activity(env.client, order_id, state=PAUSED)
        ends = paused.expiration_time.ToDatetime(tzinfo=UTC)
        # The budget counts from the step's first (local) attempt; the pause does not stop it.
        paused_at = paused.pause_info.pause_time.ToDatetime(tzinfo=UTC)
        assert ends < paused_at + timedelta(seconds=budget)
        if extend:
            # A longer schedule-to-close timeout is recorded but does not move this deadline.
            await cli(
                tuned,
                "update-options",
                "-w",
                order_id,
                "-a",
                paused.activity_id,
                "--schedule-to-close-timeout",
                "10m",
            )
            extended = await wait_for_activity(env.client, order_id, state=PAUSED)
            assert extended.activity_options.schedule_to_close_timeout.seconds == 600
            assert extended.expiration_time.ToDatetime(tzinfo=UTC) == ends

        # Past the deadline the paused step is neither timed out nor dead-lettered...
        held = len(warehouse.deliveries_for(order_id))
        await wait_until(
            lambda: datetime.now(UTC) > ends, within=budget + 5, message="the budget has run out"
        )
        await stays_quiet(env.client, warehouse, order_id, held)
        order = (await api.get(f"/orders/{order_id}")).json()
        assert order["status"] == "processing"
        async with sessions() as session:
            letters = (
                await session.scalars(select(DeadLetter).where(DeadLetter.order_id == order_id))
            ).all()
        assert letters == []

        # ...until it is unpaused: then it gives up on the budget, and the order is parked.
        await cli(tuned, "unpause", "-w", order_id, "-a", paused.activity_id)
        await wait_for_order_status(api, order_id, "needs_attention")
        async with sessions() as session:
            [letter] = (
                await session.scalars(select(DeadLetter).where(DeadLetter.order_id == order_id))
            ).all()
        # Unpaused as it was, it gives up at once on the timeout. With the longer timeout the
        # unpause still starts one attempt, whose failure is then final (the letter records it).
        late = len(warehouse.deliveries_for(order_id)) - held
        expected = (1, "WarehouseUnavailable") if extend else (0, "Timeout.SCHEDULE_TO_CLOSE")
        assert (late, letter.error_type) == expected
        # Discarded so no open letter of this test outlives its worker.
        discarded = await api.post(
            f"/dead-letters/{letter.id}/discard", json={"reason": "test over", "actor": "test"}
        )
        assert discarded.status_code == 200, discarded.text
