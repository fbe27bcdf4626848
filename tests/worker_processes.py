"""Real worker processes (`python worker.py`) for the scale-out and shutdown tests, and the
Temporal views that tell which process is doing what."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from temporalio.api.enums.v1 import EventType, PendingActivityState, TaskQueueType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
    DescribeTaskQueueResponse,
)
from temporalio.client import Client

from core.settings import Settings
from tests.conftest import ROOT, WEBHOOK_SECRET, free_port
from tests.support import wait_until


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def identity(self) -> str:
        """The SDK's default worker identity, which Temporal records on every task it hands out."""
        return f"{self.pid}@{socket.gethostname()}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def exited(self, within: float = 60) -> int:
        await wait_until(
            lambda: self.process.poll() is not None, within=within, message=f"{self.pid} exits"
        )
        return int(self.process.returncode)


def worker_environment(settings: Settings, **overrides: object) -> dict[str, str]:
    """What `python worker.py` reads: the test's database, dev server, queue and sinks."""
    environment = {
        name: value
        for name, value in os.environ.items()
        # Nothing from the caller's shell may point the worker elsewhere.
        if not name.startswith(("TEMPORAL_", "DATABASE_", "SMTP_", "WAREHOUSE_", "WORKER_"))
    }
    environment.update(
        PYTHONUNBUFFERED="1",
        ORDERFLOW_ENV="test",
        LOG_LEVEL="INFO",
        DATABASE_URL=settings.DATABASE_URL,
        TEMPORAL_ADDRESS=settings.TEMPORAL_ADDRESS,
        TEMPORAL_NAMESPACE=settings.TEMPORAL_NAMESPACE,
        TEMPORAL_TASK_QUEUE=settings.TEMPORAL_TASK_QUEUE,
        SMTP_HOST=settings.SMTP_HOST,
        SMTP_PORT=str(settings.SMTP_PORT),
        WAREHOUSE_WEBHOOK_URL=settings.WAREHOUSE_WEBHOOK_URL,
        WEBHOOK_SIGNING_SECRET=WEBHOOK_SECRET,
        RETRY_MAX_ATTEMPTS="5",
        RETRY_INITIAL_INTERVAL_SECONDS="0.1",
        RETRY_MAX_INTERVAL_SECONDS="0.5",
        OUTBOX_GRACE_SECONDS="0.5",
        OUTBOX_SWEEP_INTERVAL_SECONDS="0.2",
    )
    environment.update({name: str(value) for name, value in overrides.items()})
    return environment


@contextmanager
def worker_processes(
    count: int, settings: Settings, logs: Path, **overrides: object
) -> Iterator[list[WorkerProcess]]:
    """`count` worker processes on the test's task queue; any still running at the end are
    killed (a test that wants a graceful stop sends SIGTERM itself)."""
    started: list[WorkerProcess] = []
    try:
        for number in range(count):
            log = logs / f"worker-{number}.log"
            with log.open("wb") as sink:
                process = subprocess.Popen(
                    [sys.executable, "worker.py"],
                    cwd=ROOT,
                    # Each process its own metrics port, as replicas on one host need.
                    env=worker_environment(
                        settings,
                        **{"WORKER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}", **overrides},
                    ),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            started.append(WorkerProcess(process, log))
        yield started
    finally:
        for worker in started:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait(timeout=30)


async def describe_queue(
    client: Client, task_queue: str, kind: TaskQueueType.ValueType
) -> DescribeTaskQueueResponse:
    return await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=kind,
            report_config=True,
        )
    )


async def wait_until_polling(workers: list[WorkerProcess]) -> None:
    """Until every process has started polling. (The server's poller list is no help here: it
    shows only the queue's root partition, and a long poll may sit on another for a minute.)"""

    def all_polling() -> bool:
        for worker in workers:
            assert worker.process.poll() is None, worker.output()
        return all("worker polling task queue" in worker.output() for worker in workers)

    try:
        await wait_until(all_polling, within=60, message="every worker process polling")
    except AssertionError as failure:
        outputs = "\n".join(f"--- {worker.identity}:\n{worker.output()}" for worker in workers)
        raise AssertionError(f"{failure}\n{outputs}") from None


async def running_activity(client: Client, workflow_id: str, activity: str) -> str:
    """Waits until a worker has started the activity; returns that worker's identity."""

    async def started_by() -> str | None:
        described = await client.get_workflow_handle(workflow_id).describe()
        for pending in described.raw_description.pending_activities:
            if (
                pending.activity_type.name == activity
                and pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
            ):
                return pending.last_worker_identity or None
        return None

    identity: str = await wait_until(started_by, within=60, message=f"{activity} started")
    return identity


@dataclass
class ActivityRun:
    activity: str
    attempt: int
    started_by: str
    outcome: str  # "completed", "failed", "timed_out", ...


async def activity_runs(client: Client, workflow_id: str) -> list[ActivityRun]:
    """Each activity's recorded (last) attempt: who ran it and how it ended, from the history."""
    events: list[HistoryEvent] = [
        event async for event in client.get_workflow_handle(workflow_id).fetch_history_events()
    ]
    scheduled = {
        event.event_id: event.activity_task_scheduled_event_attributes.activity_type.name
        for event in events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    started = {
        event.event_id: event.activity_task_started_event_attributes
        for event in events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    }
    closing = {
        EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "completed",
        EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "failed",
        EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "timed_out",
        EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "canceled",
    }
    runs = []
    for event in events:
        if event.event_type not in closing:
            continue
        attributes = getattr(event, str(event.WhichOneof("attributes")))
        attempt = started.get(attributes.started_event_id)
        runs.append(
            ActivityRun(
                activity=scheduled[attributes.scheduled_event_id],
                attempt=attempt.attempt if attempt else 0,
                started_by=attempt.identity if attempt else "",
                outcome=closing[event.event_type],
            )
        )
    return runs


async def workflow_task_identities(client: Client, workflow_id: str) -> set[str]:
    """Every worker that completed a workflow task of this workflow."""
    return {
        event.workflow_task_completed_event_attributes.identity
        async for event in client.get_workflow_handle(workflow_id).fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    }
