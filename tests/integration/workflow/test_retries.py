"""Retries that do not stampede: full-jitter backoff computed in the activity, `Retry-After`
honoured and capped, and a total time budget per step.

tests/unit/test_retry.py pins the arithmetic; these watch the attempts arrive at the real
warehouse receiver (dev server) or read their scheduled times in the activity (time-skipping
server, for waits of minutes)."""

from __future__ import annotations

import math
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.testing import WorkflowEnvironment

from activities.checkpoint import BEFORE_EFFECT
from core.models import DeadLetter
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, running_worker
from tests.support import place_order, wait_for_order_status, wait_until

# Integration: attempts as the warehouse receiver saw them (dev server, real time).


def attempt_times(warehouse: WarehouseReceiver, order_id: str) -> list[float]:
    return [d.received_at for d in warehouse.deliveries_for(order_id)]


@pytest.mark.parametrize(
    ("status", "retry_after_in"), [(429, "seconds"), (503, "http-date")], ids=str
)
async def test_next_attempt_waits_for_retry_after(
    status: int,
    retry_after_in: str,
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    roomy = settings.model_copy(update={"RETRY_MAX_INTERVAL_SECONDS": 10.0})
    if retry_after_in == "seconds":
        header, not_before = "2", None
    else:
        # HTTP dates have whole seconds: the retry may not come before that instant.
        at = math.ceil(time.time()) + 3
        header, not_before = formatdate(at, usegmt=True), float(at)
    warehouse.faults.configure(fail_next=1, status=status, retry_after=header)

    async with running_worker(env.client, roomy, sessions), api_client(roomy) as api:
        order_id = await place_order(api)
        await wait_for_order_status(api, order_id, "completed")

    first, second = attempt_times(warehouse, order_id)
    assert [d.answered for d in warehouse.deliveries_for(order_id)] == [status, 202]
    if not_before is None:
        # The failure reached Temporal after the receiver answered, so the gap is at least 2 s.
        assert second - first >= 2.0
    else:
        assert second >= not_before


async def test_retry_after_beyond_the_cap_waits_the_cap(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    capped = settings.model_copy(update={"RETRY_MAX_INTERVAL_SECONDS": 1.0})
    warehouse.faults.configure(fail_next=1, status=429, retry_after="3600")

    async with running_worker(env.client, capped, sessions), api_client(capped) as api:
        order_id = await place_order(api)
        # Completes within the test's deadline only because the hour was capped to a second.
        await wait_for_order_status(api, order_id, "completed")

    first, second = attempt_times(warehouse, order_id)
    assert second - first >= 1.0


# Integration on the time-skipping server: waits of minutes, read as Temporal scheduled them.


def on(environment: WorkflowEnvironment, settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(
        update={
            "TEMPORAL_ADDRESS": environment.client.service_client.config.target_host,
            "TEMPORAL_TASK_QUEUE": f"orders-{uuid.uuid4()}",
            **changes,
        }
    )


async def first_delivery(warehouse: WarehouseReceiver, order_id: str) -> None:
    # Skip time only once the first attempt has failed, so the skip lands on its backoff timer.
    await wait_until(
        lambda: warehouse.deliveries_for(order_id), within=30, message="the first delivery"
    )


class AttemptClock:
    """A checkpoint that notes, in the server's time, when each attempt of notify_warehouse
    started (not when it was scheduled: the time-skipping server stamps a retry's scheduled time
    when the previous attempt failed, before the backoff). A local attempt's started_time is the
    worker's clock, which the server's runs ahead of by what earlier tests skipped: `skew`."""

    def __init__(self, skew: timedelta) -> None:
        self.started: list[datetime] = []
        self._skew = skew

    @classmethod
    async def of(cls, environment: WorkflowEnvironment) -> AttemptClock:
        return cls(await environment.get_current_time() - datetime.now(UTC))

    async def __call__(self, point: str) -> None:
        info = activity.info()
        if point == BEFORE_EFFECT and info.activity_type == "notify_warehouse":
            self.started.append(info.started_time + (self._skew if info.is_local else timedelta(0)))

    def gaps(self) -> list[float]:
        pairs = zip(self.started, self.started[1:], strict=False)
        return [(later - earlier).total_seconds() for earlier, later in pairs]


@pytest.mark.parametrize(
    ("retry_after", "expected_wait"),
    [("120", 120.0), ("3600", 300.0)],
    ids=["honoured", "capped"],
)
async def test_long_retry_after_on_the_time_skipping_server(
    retry_after: str,
    expected_wait: float,
    time_skipping: WorkflowEnvironment,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    # Jitter tops out at 0.05 s here, so the wait is the server's (or the cap's) to the second.
    slow = on(time_skipping, settings, RETRY_MAX_INTERVAL_SECONDS=300.0)
    warehouse.faults.configure(fail_next=1, status=429, retry_after=retry_after)
    clock = await AttemptClock.of(time_skipping)

    async with (
        running_worker(time_skipping.client, slow, sessions, checkpoint=clock),
        api_client(slow) as api,
    ):
        order_id = await place_order(api)
        await first_delivery(warehouse, order_id)
        # The server skips through the backoff timer, firing it at its scheduled time.
        await time_skipping.sleep(timedelta(seconds=expected_wait + 10))
        await wait_for_order_status(api, order_id, "completed")

    [gap] = clock.gaps()
    assert expected_wait <= gap < expected_wait + 5


async def test_step_is_dead_lettered_when_its_total_budget_runs_out(
    time_skipping: WorkflowEnvironment,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    # Attempts alone would allow a thousand tries; the 100 s budget allows about four.
    budgeted = on(
        time_skipping,
        settings,
        RETRY_MAX_ATTEMPTS=1000,
        RETRY_MAX_INTERVAL_SECONDS=60.0,
        STEP_TOTAL_TIMEOUT_SECONDS=100.0,
        STEP_ATTEMPT_TIMEOUT_SECONDS=10.0,
        PARK_TIMEOUT_SECONDS=3600.0,
    )
    warehouse.faults.configure(fail_rate=1.0, status=503, retry_after="30")
    clock = await AttemptClock.of(time_skipping)

    async with (
        running_worker(time_skipping.client, budgeted, sessions, checkpoint=clock),
        api_client(budgeted) as api,
    ):
        order_id = await place_order(api)
        await first_delivery(warehouse, order_id)
        await time_skipping.sleep(timedelta(seconds=150))
        await wait_for_order_status(api, order_id, "needs_attention")

    tries = len(warehouse.deliveries_for(order_id))
    assert 2 <= tries <= 5, tries
    assert all(gap >= 30.0 for gap in clock.gaps())
    assert (clock.started[-1] - clock.started[0]).total_seconds() <= 100.0
    async with sessions() as session:
        [letter] = (
            await session.scalars(select(DeadLetter).where(DeadLetter.order_id == order_id))
        ).all()
    print(f"\n[budget] {tries} attempts, gaps {clock.gaps()} s, dead letter {letter.error_type}")
    assert letter.step == "notify_warehouse"
    assert not letter.permanent
    assert letter.error_type in {"WarehouseUnavailable", "Timeout.SCHEDULE_TO_CLOSE"}
