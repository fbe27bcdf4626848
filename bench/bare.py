"""The ceiling: a workflow with OrderWorkflow's exact activity shape (one local activity, then two
concurrent activities) whose bodies do nothing, run by a worker with the same settings.

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
from temporalio.worker import Worker

BARE_WORKFLOW = "BareWorkflow"


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
        retry = RetryPolicy(maximum_attempts=5)
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


async def run_worker(queue: str) -> None:
    from core.settings import Settings
    from core.temporal import connect_temporal

    settings = Settings()
    client = await connect_temporal(settings)
    worker = Worker(
        client,
        task_queue=queue,
        workflows=[BareWorkflow],
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
