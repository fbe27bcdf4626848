"""Several worker processes on one task queue: the tuning settings reach each worker (and the
server), and when one process dies mid-activity another finishes the order."""

from __future__ import annotations

import signal
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.enums.v1 import RateLimitSource, TaskQueueType
from temporalio.testing import WorkflowEnvironment

from core.admission import LagGatedSlots
from core.settings import Settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, running_worker
from tests.support import (
    new_key,
    order_body,
    wait_for_order_status,
    wait_for_workflow_closed,
    wait_until,
)
from tests.worker_processes import (
    activity_runs,
    describe_queue,
    running_activity,
    wait_until_polling,
    worker_processes,
)

# Short enough that the server notices a dead worker quickly: a killed attempt is retried once
# this start-to-close timeout passes (no heartbeat needed: every activity is one short call).
ATTEMPT_TIMEOUT_SECONDS = 3


async def test_worker_tuning_comes_from_the_settings(
    env: WorkflowEnvironment, settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tuned = settings.model_copy(
        update={
            "WORKER_MAX_CONCURRENT_ACTIVITIES": 7,
            "WORKER_MAX_CONCURRENT_WORKFLOW_TASKS": 5,
            "WORKER_MAX_CACHED_WORKFLOWS": 11,
            "WORKER_MAX_TASK_QUEUE_ACTIVITIES_PER_SECOND": 12.5,
            "WORKER_GRACEFUL_SHUTDOWN_SECONDS": 4.0,
        }
    )
    async with running_worker(env.client, tuned, sessions) as worker:
        config = worker.config()
        assert config["task_queue"] == tuned.TEMPORAL_TASK_QUEUE
        # The slots' upper bounds; within them the worker's own lag admits the work.
        tuner = config.get("tuner")
        workflow_slots = getattr(tuner, "workflow_slot_supplier", None)
        activity_slots = getattr(tuner, "activity_slot_supplier", None)
        assert isinstance(workflow_slots, LagGatedSlots) and workflow_slots.maximum == 5
        assert isinstance(activity_slots, LagGatedSlots) and activity_slots.maximum == 7
        assert config.get("max_cached_workflows") == 11
        assert config.get("max_task_queue_activities_per_second") == 12.5
        assert config.get("graceful_shutdown_timeout") == timedelta(seconds=4)

        # The queue-wide rate limit travels with the polls, so the server enforces it for
        # every worker on the queue together.
        async def limit_set_by_a_worker() -> float | None:
            described = await describe_queue(
                env.client, tuned.TEMPORAL_TASK_QUEUE, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
            )
            limit = described.effective_rate_limit
            worker_set = limit.rate_limit_source == RateLimitSource.RATE_LIMIT_SOURCE_WORKER
            return limit.requests_per_second if worker_set else None

        limit = await wait_until(limit_set_by_a_worker, within=30, message="the queue's limit")
        assert limit == 12.5


@pytest.mark.slow
async def test_a_worker_killed_mid_activity_leaves_the_order_to_another(
    env: WorkflowEnvironment,
    settings: Settings,
    warehouse: WarehouseReceiver,
    mail: MailSink,
    tmp_path: Path,
) -> None:
    # The retry policy travels in the workflow's input: the starter's settings set it. Every
    # attempt an activity task, so the call in flight at the kill is one (a local first attempt
    # sees a call it has begun through to its answer, in the workflow task's worker).
    short = settings.model_copy(
        update={
            "STEP_ATTEMPT_TIMEOUT_SECONDS": ATTEMPT_TIMEOUT_SECONDS,
            "STEP_FIRST_ATTEMPT": "activity",
        }
    )
    with worker_processes(2, short, tmp_path) as workers:
        async with api_client(short) as api:
            await wait_until_polling(workers)
            # The warehouse takes far longer than an attempt may: the call is in flight at the kill.
            warehouse.faults.configure(latency_ms=8_000)
            body = order_body()
            placed = await api.post("/orders", json=body, headers={"Idempotency-Key": new_key()})
            assert placed.status_code == 202, placed.text
            order_id = placed.json()["order_id"]

            busy = await running_activity(env.client, order_id, "notify_warehouse")
            [victim] = [worker for worker in workers if worker.identity == busy]
            [survivor] = [worker for worker in workers if worker is not victim]
            victim.signal(signal.SIGKILL)
            assert await victim.exited() == -signal.SIGKILL
            warehouse.faults.reset()

            order = await wait_for_order_status(api, order_id, "completed")
            await wait_for_workflow_closed(env.client, order_id)
            assert survivor.process.poll() is None, survivor.output()

    steps = {step["step"]: step for step in order["steps"]}
    assert steps["notify_warehouse"]["status"] == "succeeded"
    # The attempt that died is retried after its timeout, by the process still running.
    [warehouse_run] = [
        run
        for run in await activity_runs(env.client, order_id)
        if run.activity == "notify_warehouse"
    ]
    assert (warehouse_run.started_by, warehouse_run.outcome) == (survivor.identity, "completed"), (
        warehouse_run
    )
    assert warehouse_run.attempt >= 2
    # However many requests the warehouse saw, it accepted exactly one (the Idempotency-Key).
    answers = [delivery.answered for delivery in warehouse.deliveries_for(order_id)]
    assert answers.count(202) == 1, answers
    # SMTP cannot drop a repeat: if the kill (or a timed-out attempt) fell between the mail
    # server's 250 and the ledger commit, the receipt goes out again, with the same Message-ID
    # (the window the README names). The customer never gets two different receipts.
    receipts = mail.to(body["customer_email"])
    assert len({receipt.message_id for receipt in receipts}) == 1, receipts
    assert 1 <= len(receipts) <= 2
