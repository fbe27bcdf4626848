"""The ceilings: workflows with OrderWorkflow's activity shape whose bodies do nothing, run by a
worker with the same settings.

- BareWorkflow: one local activity, then two concurrent activities (each step an activity task);
- BareLocalFirstWorkflow: one local activity, then the two steps concurrently, each one's first
  attempt a local activity in the same workflow task and only a failed step going on as a
  regular activity with the rest of its attempts. With no-op bodies nothing fails, so the whole
  workflow is settled in its first workflow task: the shape local-first steps aim for.

    python -m bench.bare --queue Q      # the bare worker (reads TEMPORAL_* and WORKER_* settings)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

BARE_WORKFLOW = "BareWorkflow"
BARE_LOCAL_FIRST_WORKFLOW = "BareLocalFirstWorkflow"
ATTEMPTS = 5


@dataclass(frozen=True)
class BareInput:
    order_id: str


@dataclass(frozen=True)
class BareResult:
    order_id: str


@activity.defn(name="bare_policy")
async def bare_policy(input: BareInput) -> BareResult:
    return BareResult(input.order_id)


@activity.defn(name="bare_step")
async def bare_step(input: BareInput) -> BareResult:
    return BareResult(input.order_id)


@workflow.defn(name=BARE_WORKFLOW)
class BareWorkflow:
    @workflow.run
    async def run(self, input: BareInput) -> BareResult:
        retry = RetryPolicy(maximum_attempts=ATTEMPTS)
        await workflow.execute_local_activity(
            bare_policy,
            input,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=retry,
        )
        await asyncio.gather(
            *(
                workflow.execute_activity(
                    bare_step,
                    input,
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=retry,
                )
                for _ in range(2)
            )
        )
        return BareResult(input.order_id)


@workflow.defn(name=BARE_LOCAL_FIRST_WORKFLOW)
class BareLocalFirstWorkflow:
    @workflow.run
    async def run(self, input: BareInput) -> BareResult:
        await workflow.execute_local_activity(
            bare_policy,
            input,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(maximum_attempts=ATTEMPTS),
        )
        await asyncio.gather(*(self.step(input) for _ in range(2)))
        return BareResult(input.order_id)

    async def step(self, input: BareInput) -> BareResult:
        try:
            return await workflow.execute_local_activity(
                bare_step,
                input,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
        # A failed local activity may arrive wrapped in ActivityError or as the bare
        # ApplicationError.
        except (ActivityError, ApplicationError):
            return await workflow.execute_activity(
                bare_step,
                input,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=ATTEMPTS - 1),
            )


async def run_worker(queue: str) -> None:
    from core.settings import Settings
    from core.temporal import connect_temporal

    settings = Settings()
    client = await connect_temporal(settings)
    worker = Worker(
        client,
        task_queue=queue,
        workflows=[BareWorkflow, BareLocalFirstWorkflow],
        activities=[bare_policy, bare_step],
        max_concurrent_activities=settings.WORKER_MAX_CONCURRENT_ACTIVITIES,
        max_concurrent_workflow_tasks=settings.WORKER_MAX_CONCURRENT_WORKFLOW_TASKS,
        max_cached_workflows=settings.WORKER_MAX_CACHED_WORKFLOWS,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with worker:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queue", required=True)
    asyncio.run(run_worker(parser.parse_args().queue))


if __name__ == "__main__":
    main()
