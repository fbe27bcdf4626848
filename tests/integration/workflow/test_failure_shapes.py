"""How a step attempt's failure reaches the workflow in the temporalio this project pins, end to
end: a real worker on the dev server runs an attempt that fails each way a step's can (refused for
good, refused with a wait, our database down, too slow, cancelled, a bug), as a local activity and
as an activity task, and the workflow reads the failure it gets with the functions OrderWorkflow
decides by (workflows/order_policy.py, workflows/order_details.py).

tests/unit/test_order_policy.py pins those functions on exception objects built by hand in the
shapes the SDK is believed to produce; this test is what holds those beliefs to the SDK. An
upgrade of temporalio that changes a shape fails here, not in production."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.retry import PERMANENT_ERROR_TYPES, Backoff, database_unavailable, permanent
from core.settings import Settings
from tests.support import wait_until
from tests.unit.test_order_policy import POLICY
from workflows import order_policy
from workflows.order_details import describe_failure
from workflows.order_policy import LOCAL_FIRST_ATTEMPT_RETRY, STEP_FAILURES

ATTEMPT_TIMEOUT = timedelta(seconds=1)
RETRY_AFTER_SECONDS = 7


@dataclass
class Probe:
    failure: str
    local: bool
    # An activity task retried without end within this time budget (schedule-to-close).
    budget_seconds: float | None = None


# The workflow IDs whose attempt is running (and waiting to time out, or to be cancelled).
started: set[str] = set()


@activity.defn(name="probe_attempt")
async def probe_attempt(probe: Probe) -> None:
    """Fails as a step attempt does, through the constructors the step activities use."""
    if probe.failure == "refused":
        raise permanent("warehouse answered 400: unknown SKU", error_type="WarehouseRejected")
    if probe.failure == "refused_with_a_wait":
        backoff = Backoff(Settings(RETRY_JITTER="none"))
        raise backoff.retryable(
            "warehouse answered 429",
            error_type="WarehouseUnavailable",
            attempt=1,
            retry_after=RETRY_AFTER_SECONDS,
        )
    if probe.failure == "database_down":
        raise database_unavailable(
            "database unavailable: recording notify_warehouse",
            activity.info().attempt + 2,
            next_retry_delay=timedelta(seconds=0.3 if probe.budget_seconds else 2),
        )
    if probe.failure == "a_bug":
        raise RuntimeError("a bug in the attempt")
    # Too slow: it runs past its timeout, or until it is cancelled.
    workflow_id = activity.info().workflow_id
    assert workflow_id is not None
    started.add(workflow_id)
    await asyncio.sleep(30)


@workflow.defn(sandboxed=False)
class ProbeWorkflow:
    """Runs one attempt the way OrderWorkflow runs a step's, and says what it caught."""

    @workflow.run
    async def run(self, probe: Probe) -> dict[str, Any]:
        try:
            if probe.local:
                await workflow.execute_local_activity(
                    probe_attempt,
                    probe,
                    start_to_close_timeout=ATTEMPT_TIMEOUT,
                    retry_policy=LOCAL_FIRST_ATTEMPT_RETRY,
                )
            else:
                budget = probe.budget_seconds
                await workflow.execute_activity(
                    probe_attempt,
                    probe,
                    start_to_close_timeout=ATTEMPT_TIMEOUT,
                    schedule_to_close_timeout=timedelta(seconds=budget) if budget else None,
                    retry_policy=RetryPolicy(
                        maximum_attempts=0 if budget else 1,
                        non_retryable_error_types=list(PERMANENT_ERROR_TYPES),
                    ),
                )
        except STEP_FAILURES as failure:
            return read(failure)
        return {}


def read(failure: BaseException) -> dict[str, Any]:
    """What OrderWorkflow makes of a failure, and the failure's shape: its chain of causes."""
    chain = []
    link: BaseException | None = failure
    while link is not None:
        chain.append(f"{type(link).__module__}.{type(link).__name__}")
        link = link.__cause__
    down = order_policy.database_down(failure)
    return {
        "chain": chain,
        "permanent": order_policy.permanent(failure),
        "cancelled": order_policy.cancelled(failure),
        "database_down": [down[0], down[1].total_seconds()] if down else None,
        "retry_delay": order_policy.retry_delay(failure, POLICY).total_seconds(),
        "described": list(describe_failure(failure)),
    }


@pytest.fixture
async def probes(env: WorkflowEnvironment) -> AsyncIterator[tuple[Client, str]]:
    queue = f"failure-shapes-{uuid.uuid4()}"
    async with Worker(
        env.client, task_queue=queue, workflows=[ProbeWorkflow], activities=[probe_attempt]
    ):
        yield env.client, queue


async def probe(
    client: Client, queue: str, failure: str, *, local: bool, budget: float | None = None
) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        ProbeWorkflow.run,
        Probe(failure, local, budget),
        id=f"probe-{failure}-{uuid.uuid4().hex[:8]}",
        task_queue=queue,
    )


APP = "temporalio.exceptions.ApplicationError"
ACTIVITY = "temporalio.exceptions.ActivityError"
TIMEOUT = "temporalio.exceptions.TimeoutError"


@dataclass(frozen=True)
class Shape:
    """A failure as the workflow receives it, and what OrderWorkflow makes of it."""

    chain: tuple[str, ...]
    described: str
    permanent: bool = False
    cancelled: bool = False
    database_down: tuple[int, float] | None = None
    # The wait before attempt 2: the failure's own, else the policy's first interval (1 s).
    retry_delay: float = 1.0


# What OrderWorkflow is written against (workflows/order_policy.py): an activity task's failure
# is an ActivityError around the cause; a local activity's is the ApplicationError itself, an
# ActivityError around a timeout, or, once the workflow is being cancelled, a bare cancellation.
SHAPES = {
    ("refused", "local"): Shape((APP,), "WarehouseRejected", permanent=True),
    ("refused", "activity task"): Shape((ACTIVITY, APP), "WarehouseRejected", permanent=True),
    ("refused_with_a_wait", "local"): Shape((APP,), "WarehouseUnavailable", retry_delay=7.0),
    ("refused_with_a_wait", "activity task"): Shape(
        (ACTIVITY, APP), "WarehouseUnavailable", retry_delay=7.0
    ),
    ("database_down", "local"): Shape(
        (APP,), "DatabaseUnavailable", database_down=(3, 2.0), retry_delay=2.0
    ),
    ("database_down", "activity task"): Shape(
        (ACTIVITY, APP), "DatabaseUnavailable", database_down=(3, 2.0), retry_delay=2.0
    ),
    ("too_slow", "local"): Shape((ACTIVITY, TIMEOUT), "Timeout.START_TO_CLOSE"),
    ("too_slow", "activity task"): Shape((ACTIVITY, TIMEOUT), "Timeout.START_TO_CLOSE"),
    # An exception that is not an ApplicationError arrives as one, typed with its class name.
    ("a_bug", "local"): Shape((APP,), "RuntimeError"),
    ("a_bug", "activity task"): Shape((ACTIVITY, APP), "RuntimeError"),
}
CANCELLED = {
    "local": Shape(("asyncio.exceptions.CancelledError",), "CancelledError", cancelled=True),
    "activity task": Shape(
        (ACTIVITY, "temporalio.exceptions.CancelledError"), "CancelledError", cancelled=True
    ),
}


async def outcome(handle: WorkflowHandle[Any, Any]) -> dict[str, Any]:
    """What the probe caught. A failure STEP_FAILURES does not catch fails the probe's workflow
    task instead, which Temporal retries without end: that shows here as no result in time."""
    try:
        async with asyncio.timeout(30):
            result: dict[str, Any] = await handle.result()
    except TimeoutError:
        raise AssertionError(f"{handle.id}: the failure escaped STEP_FAILURES") from None
    return result


def shape_of(read: dict[str, Any]) -> Shape:
    down = read["database_down"]
    return Shape(
        tuple(read["chain"]),
        read["described"][0],
        permanent=read["permanent"],
        cancelled=read["cancelled"],
        database_down=(down[0], down[1]) if down else None,
        retry_delay=read["retry_delay"],
    )


@pytest.mark.parametrize(("failure", "how"), SHAPES, ids=[" as ".join(key) for key in SHAPES])
async def test_a_failed_attempt_reaches_the_workflow_in_the_shape_it_is_read_by(
    probes: tuple[Client, str], failure: str, how: str
) -> None:
    client, queue = probes
    handle = await probe(client, queue, failure, local=how == "local")
    assert shape_of(await outcome(handle)) == SHAPES[(failure, how)]


@pytest.mark.parametrize("how", CANCELLED)
async def test_a_cancelled_attempt_reaches_the_workflow_as_a_cancellation(
    probes: tuple[Client, str], how: str
) -> None:
    client, queue = probes
    handle = await probe(client, queue, "too_slow", local=how == "local")
    await wait_until(lambda: handle.id in started, message="the attempt running")
    await handle.cancel()
    assert shape_of(await outcome(handle)) == CANCELLED[how]


# How Temporal ends an activity whose time budget (schedule-to-close) runs out before the next
# retry: a timeout around the last attempt's failure, or, when it sees at the failure that the
# next retry would not start in time, that failure itself. Both are met in practice.
SPENT_BUDGET = {(ACTIVITY, TIMEOUT, APP), (ACTIVITY, APP)}


@pytest.mark.parametrize(
    ("failure", "last"),
    [("database_down", "DatabaseUnavailable"), ("refused_with_a_wait", "WarehouseUnavailable")],
)
async def test_a_spent_time_budget_still_says_what_the_last_attempt_met(
    probes: tuple[Client, str], failure: str, last: str
) -> None:
    """Every attempt failed until the budget ran out (the database down, or a Retry-After that
    reaches past the budget): the workflow still reads what the last attempt met, so a step
    that met only our database's outage is waited out, not parked."""
    client, queue = probes
    handle = await probe(client, queue, failure, local=False, budget=1.5)
    read = await outcome(handle)
    shape = shape_of(read)
    assert shape.chain in SPENT_BUDGET, shape
    assert last in " ".join(read["described"]), read
    assert not shape.permanent and not shape.cancelled
    if last == "DatabaseUnavailable":
        assert shape.database_down is not None and shape.database_down[1] == 0.3, shape
        assert shape.database_down[0] >= 3
    else:
        assert shape.database_down is None
