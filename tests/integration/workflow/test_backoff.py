"""The retry schedule: capped exponential backoff, measured on Temporal's time-skipping test
server (so minutes of backoff take no wall time); tests/unit/test_backoff.py pins the jitter's
bounds."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.retry import Backoff
from activities.smtp import SmtpMailer
from activities.warehouse import WarehouseActivities
from core.contracts import OrderWorkflowStatus, StepInput, StepResult
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client
from tests.support import place_order, wait_until
from worker import create_activities, create_worker


class RecordingWarehouse:
    """The real `notify_warehouse`, noting when each attempt started in the server's time."""

    def __init__(self, real: WarehouseActivities) -> None:
        self._real = real
        self.started: list[datetime] = []

    @activity.defn(name="notify_warehouse")
    async def notify_warehouse(self, input: StepInput) -> StepResult:
        # started_time, not current_attempt_scheduled_time: the time-skipping server stamps a
        # retry's scheduled time when the previous attempt failed, before its backoff.
        self.started.append(activity.info().started_time)
        return await self._real.notify_warehouse(input)


async def test_retry_gaps_grow_by_the_coefficient_and_stop_at_the_cap(
    time_skipping: WorkflowEnvironment,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    client = time_skipping.client
    schedule = settings.model_copy(
        update={
            "TEMPORAL_ADDRESS": client.service_client.config.target_host,
            "RETRY_JITTER": "none",
            "RETRY_MAX_ATTEMPTS": 6,
            # Seconds-long intervals, so the time an attempt itself takes is small beside them.
            "RETRY_INITIAL_INTERVAL_SECONDS": 10.0,
            "RETRY_BACKOFF_COEFFICIENT": 2.0,
            "RETRY_MAX_INTERVAL_SECONDS": 50.0,
        }
    )
    warehouse.faults.configure(fail_rate=1.0, status=503)
    async with httpx.AsyncClient() as http:
        mailer = SmtpMailer(schedule.SMTP_HOST, schedule.SMTP_PORT, schedule.SMTP_TIMEOUT_SECONDS)
        recording = RecordingWarehouse(
            WarehouseActivities(sessions, http, Backoff(schedule), schedule)
        )
        # Every real activity, with the warehouse call wrapped to see its attempts.
        activities = [
            recording.notify_warehouse
            if getattr(real, "__name__", None) == "notify_warehouse"
            else real
            for real in create_activities(schedule, sessions, http, mailer)
        ]
        async with (
            create_worker(client, schedule, activities),
            api_client(schedule) as api,
        ):
            order_id = await place_order(api)
            # The server skips through the backoff timers, firing each at its scheduled time.
            await time_skipping.sleep(timedelta(seconds=10 + 20 + 40 + 50 + 50 + 60))
            handle = client.get_workflow_handle(order_id)
            status = await wait_until(
                lambda: _parked(handle), within=30, message="the warehouse step dead-lettered"
            )

    assert status.steps["notify_warehouse"].status == "dead_lettered"
    gaps = [
        (later - earlier).total_seconds()
        for earlier, later in itertools.pairwise(recording.started)
    ]
    assert len(recording.started) == 6, recording.started
    for gap, expected in zip(gaps, [10, 20, 40, 50, 50], strict=True):
        assert expected <= gap < expected + 5, gaps
    assert len(warehouse.deliveries_for(order_id)) == 6


async def _parked(handle: WorkflowHandle[Any, Any]) -> OrderWorkflowStatus | None:
    status = await handle.query("status", result_type=OrderWorkflowStatus)
    return status if status.steps["notify_warehouse"].status == "dead_lettered" else None
