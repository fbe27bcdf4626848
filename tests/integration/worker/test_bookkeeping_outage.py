"""A bookkeeping activity that finds our own database gone is retried under its own policy and
said once per outage burst, never with a traceback per attempt. For real: the worker's link to
PostgreSQL goes through a TCP proxy the test cuts while the activity runs its attempts."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import workflow
from temporalio.client import Client, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.dead_letters import DeadLetterActivities
from activities.outages import DatabaseOutageInterceptor, bookkeeping_outage_log
from activities.retry import DATABASE_UNAVAILABLE
from core.contracts import STEPS, DeadLetterInput, DeadLetterResult
from core.db import create_engine, create_sessionmaker
from core.models import DeadLetter, OrderStep
from core.outages import watch_database
from core.settings import Settings
from tests.integration.api.test_outages import database_link, needs_postgres
from tests.support import order_row, unique_email, wait_until

Sessions = async_sessionmaker[AsyncSession]
OUTAGE_LOGGER = "activities.outages"
WAREHOUSE = STEPS[1]
ATTEMPTS_IN_THE_OUTAGE = 3


@workflow.defn(sandboxed=False)
class OpenLetterWorkflow:
    """What OrderWorkflow does when a step gives up, alone: open its dead letter, retried until
    the database takes it."""

    @workflow.run
    async def run(self, input: DeadLetterInput) -> DeadLetterResult:
        return await workflow.execute_activity_method(
            DeadLetterActivities.record_dead_letter,
            input,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1), backoff_coefficient=1.0, maximum_attempts=0
            ),
        )


async def an_order_with_steps(sessions: Sessions) -> str:
    order = order_row(unique_email())
    async with sessions.begin() as session:
        session.add(order)
        session.add_all([OrderStep(order_id=order.id, step=step) for step in STEPS])
    return order.id


async def pending_attempt(handle: WorkflowHandle[OpenLetterWorkflow, DeadLetterResult]) -> int:
    pending = (await handle.describe()).raw_description.pending_activities
    return pending[0].attempt if pending else 0


async def last_failure_type(handle: WorkflowHandle[OpenLetterWorkflow, DeadLetterResult]) -> str:
    pending = (await handle.describe()).raw_description.pending_activities
    return pending[0].last_failure.application_failure_info.type if pending else ""


@needs_postgres
async def test_a_dead_letter_waits_out_a_database_cut_said_once(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: Sessions,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client: Client = env.client
    order_id = await an_order_with_steps(sessions)
    outage = bookkeeping_outage_log()
    async with database_link(settings.DATABASE_URL) as (proxy, url):
        engine = create_engine(settings.model_copy(update={"DATABASE_URL": url}))
        watch_database(engine, outage)
        letters = DeadLetterActivities(create_sessionmaker(engine))
        worker = Worker(
            client,
            task_queue=settings.TEMPORAL_TASK_QUEUE,
            workflows=[OpenLetterWorkflow],
            activities=[letters.record_dead_letter],
            interceptors=[DatabaseOutageInterceptor(outage)],
        )
        try:
            with caplog.at_level(logging.INFO):
                async with worker:
                    await proxy.cut()
                    handle = await client.start_workflow(
                        OpenLetterWorkflow.run,
                        DeadLetterInput(
                            order_id=order_id,
                            step=WAREHOUSE,
                            occurrence=1,
                            error_type="WarehouseRejected",
                            error_message="400 unknown SKU",
                            permanent=True,
                            workflow_id=order_id,
                            run_id="run-1",
                        ),
                        id=f"open-letter-{uuid.uuid4()}",
                        task_queue=settings.TEMPORAL_TASK_QUEUE,
                    )
                    await wait_until(
                        lambda: _at_least(handle, ATTEMPTS_IN_THE_OUTAGE),
                        within=30,
                        message=f"{ATTEMPTS_IN_THE_OUTAGE} attempts in the outage",
                    )
                    assert await last_failure_type(handle) == DATABASE_UNAVAILABLE
                    await proxy.restore()
                    result = await handle.result()
        finally:
            await engine.dispose()

    async with sessions() as session:
        letter = await session.get(DeadLetter, result.dead_letter_id)
    assert letter is not None and letter.order_id == order_id
    said = [r.getMessage() for r in caplog.records if r.name == OUTAGE_LOGGER and r.levelno >= 30]
    assert [m.split(" (")[0].split(" after")[0] for m in said] == [
        "database unavailable",
        "database recovered",
    ], said
    tracebacks = [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]
    assert tracebacks == [], [r.getMessage() for r in tracebacks]


async def _at_least(
    handle: WorkflowHandle[OpenLetterWorkflow, DeadLetterResult], attempts: int
) -> bool:
    return await pending_attempt(handle) >= attempts
