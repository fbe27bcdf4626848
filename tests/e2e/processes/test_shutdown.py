"""SIGTERM to a worker process: it stops taking work, lets the running activity finish within
WORKER_GRACEFUL_SHUTDOWN_SECONDS, closes its relay and database cleanly and exits 0; nothing
is lost, because what it did not finish another worker does.

The activity in flight is an activity task: every attempt is one here (STEP_FIRST_ATTEMPT=
activity), since a local first attempt runs inside a workflow task, not as a task of its own
that another worker could take over; a worker lost during one is
tests/integration/worker/test_crash_points.py's."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client
from tests.support import (
    place_order,
    wait_for_order_status,
    wait_for_workflow_closed,
    wait_until,
)
from tests.worker_processes import (
    WorkerProcess,
    activity_runs,
    running_activity,
    wait_until_polling,
    worker_processes,
    workflow_task_identities,
)

# What a clean stop must not print: a traceback, a task destroyed while pending (the relay),
# an exception swallowed at exit (a connection closed after the engine).
UNCLEAN = ("Traceback", "Task was destroyed", "Exception ignored", " ERROR ")


def assert_clean_stop(worker: WorkerProcess) -> None:
    output = worker.output()
    assert "shutting down: finishing running activities" in output, output
    assert "worker stopped" in output, output
    for sign in UNCLEAN:
        assert sign not in output, output


@pytest.mark.slow
async def test_sigterm_lets_the_running_activity_finish_and_stops_taking_work(
    env: WorkflowEnvironment,
    settings: Settings,
    warehouse: WarehouseReceiver,
    tmp_path: Path,
) -> None:
    # The retry policy travels in the workflow's input: the starter's settings set it.
    every_attempt_a_task = settings.model_copy(
        update={"STEP_ATTEMPT_TIMEOUT_SECONDS": 30, "STEP_FIRST_ATTEMPT": "activity"}
    )
    with worker_processes(
        2, every_attempt_a_task, tmp_path, WORKER_GRACEFUL_SHUTDOWN_SECONDS=20
    ) as workers:
        async with api_client(every_attempt_a_task) as api:
            await wait_until_polling(workers)
            warehouse.faults.configure(latency_ms=3_000)
            first = await place_order(api)
            busy = await running_activity(env.client, first, "notify_warehouse")
            [stopping] = [worker for worker in workers if worker.identity == busy]
            [other] = [worker for worker in workers if worker is not stopping]

            stopping.signal(signal.SIGTERM)
            await wait_until(
                lambda: "shutting down" in stopping.output(), within=30, message="shutdown begun"
            )
            # Placed while the stopping worker still finishes its call: only the other may take it.
            second = await place_order(api)

            assert await stopping.exited() == 0, stopping.output()
            await wait_for_order_status(api, first, "completed")
            await wait_for_order_status(api, second, "completed")
            await wait_for_workflow_closed(env.client, first)
            await wait_for_workflow_closed(env.client, second)
            assert other.process.poll() is None, other.output()

    assert_clean_stop(stopping)
    # The activity in flight at SIGTERM finished where it ran, in its first attempt.
    [warehouse_run] = [
        run for run in await activity_runs(env.client, first) if run.activity == "notify_warehouse"
    ]
    assert (warehouse_run.started_by, warehouse_run.attempt, warehouse_run.outcome) == (
        stopping.identity,
        1,
        "completed",
    )
    assert [d.answered for d in warehouse.deliveries_for(first)] == [202]
    # The stopping worker took no part in the order that arrived after SIGTERM.
    second_runs = await activity_runs(env.client, second)
    assert {run.started_by for run in second_runs} == {other.identity}
    assert await workflow_task_identities(env.client, second) == {other.identity}


@pytest.mark.slow
async def test_an_activity_longer_than_the_grace_period_is_retried_by_another_worker(
    env: WorkflowEnvironment,
    settings: Settings,
    warehouse: WarehouseReceiver,
    tmp_path: Path,
) -> None:
    # The retry policy travels in the workflow's input: the starter's settings set it. A call
    # that has begun is seen through past the grace period and recorded; the server retries the
    # attempt once its start-to-close timeout has passed, longer than the warehouse's 6 s.
    every_attempt_a_task = settings.model_copy(
        update={"STEP_ATTEMPT_TIMEOUT_SECONDS": 10, "STEP_FIRST_ATTEMPT": "activity"}
    )
    with worker_processes(
        2, every_attempt_a_task, tmp_path, WORKER_GRACEFUL_SHUTDOWN_SECONDS=1
    ) as workers:
        async with api_client(every_attempt_a_task) as api:
            await wait_until_polling(workers)
            warehouse.faults.configure(latency_ms=6_000)
            order_id = await place_order(api)
            busy = await running_activity(env.client, order_id, "notify_warehouse")
            [stopping] = [worker for worker in workers if worker.identity == busy]
            [other] = [worker for worker in workers if worker is not stopping]

            stopping.signal(signal.SIGTERM)
            await wait_until(
                lambda: "shutting down" in stopping.output(), within=30, message="shutdown begun"
            )
            # The warehouse stays slow: whenever the call went out, it outlasts the grace period.
            assert await stopping.exited() == 0, stopping.output()
            order = await wait_for_order_status(api, order_id, "completed")
            await wait_for_workflow_closed(env.client, order_id)

    assert "worker stopped" in stopping.output()
    steps = {step["step"]: step for step in order["steps"]}
    assert steps["notify_warehouse"]["status"] == "succeeded"
    [warehouse_run] = [
        run
        for run in await activity_runs(env.client, order_id)
        if run.activity == "notify_warehouse"
    ]
    # The stopping worker saw its call through and recorded it; the retry, by the other
    # worker, found the step done.
    assert (warehouse_run.started_by, warehouse_run.outcome) == (other.identity, "completed"), (
        warehouse_run,
        stopping.output(),
    )
    assert warehouse_run.attempt >= 2
    answers = [d.answered for d in warehouse.deliveries_for(order_id)]
    assert answers.count(202) == 1, answers
