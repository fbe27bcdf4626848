"""Side effects that happen once: a worker interrupted at each crash point of each step, by an
exception or by SIGKILL, and what the customer and the warehouse saw afterwards.

Run as a module (`python -m tests.integration.worker.test_crash_points`) it is the worker that
kills itself: the real worker on the test's task queue, with a checkpoint that sends SIGKILL to
its own process at the crash point named in CRASH_AT."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request, Response
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.checkpoint import (
    AFTER_EFFECT,
    AFTER_RECORD,
    BEFORE_EFFECT,
    CRASH_POINTS,
    Checkpoint,
)
from activities.retry import STEP_CLAIMED, Backoff
from activities.smtp import SmtpMailer
from activities.warehouse import WarehouseActivities
from core.contracts import STEPS, StepInput
from core.db import create_engine, create_sessionmaker
from core.ledger import ATTEMPT_HEADER
from core.models import DeadLetter, InterruptedClaim, OrderStep, StepStatus
from core.settings import Settings
from core.states import StepOutcome
from core.temporal import connect_temporal
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import (
    ROOT,
    WEBHOOK_SECRET,
    api_client,
    running_worker,
    serving_warehouse,
)
from tests.support import order_body, place_order, wait_for_order_status, wait_until
from tests.tcp_proxy import tcp_proxy
from worker import create_activities
from workflows.order import OrderWorkflow

RECEIPT, WAREHOUSE = STEPS


class InjectedCrash(RuntimeError):
    pass


def crash_once(step: str, point: str) -> tuple[Any, list[int]]:
    """A checkpoint that fails the given step's attempt at the given point, the first time only;
    it also notes the attempt it interrupted."""
    interrupted: list[int] = []

    async def checkpoint(at: str) -> None:
        info = activity.info()
        if at == point and info.activity_type == step and not interrupted:
            interrupted.append(info.attempt)
            raise InjectedCrash(f"injected crash in {step} at {point}")

    return checkpoint, interrupted


@dataclass
class Seen:
    """What the outside world saw of one order, and how its steps ended."""

    raw_emails: int
    distinct_message_ids: int
    deliveries: int
    accepted: int
    outcomes: dict[str, list[tuple[int, str]]]  # step -> (attempt, outcome) of completed attempts

    def line(self) -> str:
        return (
            f"e-mails raw={self.raw_emails} distinct Message-IDs={self.distinct_message_ids}; "
            f"webhook deliveries={self.deliveries} accepted={self.accepted}; "
            f"completions={self.outcomes}"
        )


async def observe(
    client: Client,
    order_id: str,
    email: str,
    mail: MailSink,
    warehouse: WarehouseReceiver,
) -> Seen:
    receipts = mail.to(email)
    deliveries = warehouse.deliveries_for(order_id)
    accepted = [d for d in deliveries if d.answered == 202 and not d.duplicate]
    return Seen(
        raw_emails=len(receipts),
        distinct_message_ids=len({m.message_id for m in receipts}),
        deliveries=len(deliveries),
        accepted=len(accepted),
        outcomes=await completed_attempts(client, order_id),
    )


async def wait_for_workflow(client: Client, order_id: str) -> None:
    # The ledger marks the order completed before Temporal hears of the last step; the history
    # holds every attempt only once the workflow itself has closed.
    handle = client.get_workflow_handle(order_id)
    try:
        await asyncio.wait_for(handle.result(), timeout=60)
    except TimeoutError:
        history = await handle.fetch_history()
        pending = (await handle.describe()).raw_description
        events = [
            EventType.Name(event.event_type)[len("EVENT_TYPE_") :] for event in history.events
        ]
        raise AssertionError(
            f"workflow {order_id} still open after 60 s; history: {events}; "
            f"pending workflow task: {pending.pending_workflow_task}; "
            f"pending activities: {list(pending.pending_activities)}"
        ) from None


async def completed_attempts(client: Client, order_id: str) -> dict[str, list[tuple[int, str]]]:
    """From the workflow's history: which attempt of each step completed, with what outcome,
    counting the step's attempts: a local first attempt is a marker, and the activity tasks after
    it carry the attempts already made in their input."""
    history = await client.get_workflow_handle(order_id).fetch_history()
    scheduled: dict[int, tuple[str, int]] = {}
    attempt_of: dict[int, int] = {}
    completed: dict[str, list[tuple[int, str]]] = {}
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            attributes = event.activity_task_scheduled_event_attributes
            offset = json.loads(attributes.input.payloads[0].data).get("attempt_offset", 0)
            scheduled[event.event_id] = (attributes.activity_type.name, offset)
        elif event.HasField("activity_task_started_event_attributes"):
            started = event.activity_task_started_event_attributes
            attempt_of[started.scheduled_event_id] = started.attempt
        elif event.HasField("activity_task_completed_event_attributes"):
            done = event.activity_task_completed_event_attributes
            step, offset = scheduled[done.scheduled_event_id]
            if step in STEPS:
                result = json.loads(done.result.payloads[0].data)
                completed.setdefault(step, []).append(
                    (offset + attempt_of[done.scheduled_event_id], result["outcome"])
                )
        elif event.HasField("marker_recorded_event_attributes"):
            marker = event.marker_recorded_event_attributes
            if "result" not in marker.details:
                continue  # a local attempt that failed
            meta = json.loads(marker.details["data"].payloads[0].data)
            if meta["activity_type"] in STEPS:
                result = json.loads(marker.details["result"].payloads[0].data)
                completed.setdefault(meta["activity_type"], []).append(
                    (meta["attempt"], result["outcome"])
                )
    return completed


async def step_row(sessions: async_sessionmaker[AsyncSession], order_id: str, step: str) -> Any:
    async with sessions() as session:
        return await session.get(OrderStep, (order_id, step))


# What the retry sees after each crash point: the only window is between the effect and the
# ledger's record of it, where the retry repeats the effect under the same key.
REPEATS_EFFECT = {BEFORE_EFFECT: False, AFTER_EFFECT: True, AFTER_RECORD: False}
RETRY_OUTCOME = {
    BEFORE_EFFECT: "performed",
    AFTER_EFFECT: "performed",
    AFTER_RECORD: "already_done",
}


def assert_once(step: str, point: str, seen: Seen) -> None:
    # The customer has one receipt (by Message-ID) and the warehouse accepted one delivery.
    assert seen.distinct_message_ids == 1
    assert seen.accepted == 1
    repeats = REPEATS_EFFECT[point]
    assert seen.raw_emails == (2 if step == RECEIPT and repeats else 1)
    assert seen.deliveries == (2 if step == WAREHOUSE and repeats else 1)
    # The crashed attempt never completed; the retry did, and knew whether it had work left.
    assert seen.outcomes[step] == [(2, RETRY_OUTCOME[point])]
    other = WAREHOUSE if step == RECEIPT else RECEIPT
    assert seen.outcomes[other] == [(1, "performed")]


@pytest.fixture(params=["local", "activity"])
def first_attempt(request: pytest.FixtureRequest) -> str:
    """STEP_FIRST_ATTEMPT: the step's first attempt as a local activity inside the workflow
    task, or as an activity task."""
    return str(request.param)


@pytest.mark.parametrize("point", CRASH_POINTS)
@pytest.mark.parametrize("step", STEPS)
async def test_attempt_failing_at_a_crash_point_leaves_one_effect(
    step: str,
    point: str,
    first_attempt: str,
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    api: httpx.AsyncClient,
    mail: MailSink,
    warehouse: WarehouseReceiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoint, interrupted = crash_once(step, point)
    body = order_body()
    settings = settings.model_copy(update={"STEP_FIRST_ATTEMPT": first_attempt})
    async with running_worker(env.client, settings, sessions, checkpoint=checkpoint):
        order_id = await place_order(api, body)
        await wait_for_order_status(api, order_id, "completed")
        await wait_for_workflow(env.client, order_id)

    assert interrupted == [1]
    seen = await observe(env.client, order_id, body["customer_email"], mail, warehouse)
    with capsys.disabled():
        print(f"\n[crash point] {first_attempt} raise  {step}:{point}: {seen.line()}")
    assert_once(step, point, seen)
    row = await step_row(sessions, order_id, step)
    assert row.status == StepStatus.SUCCEEDED
    if point == AFTER_RECORD:
        # The ledger committed before the crash, so the retry found it done and did nothing.
        assert row.occurrence_attempts == 1


def subprocess_env(settings: Settings, crash_at: str, marker: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        env[name] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    env["CRASH_AT"] = crash_at
    env["CRASH_MARKER"] = str(marker)
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture
def kill_settings(settings: Settings, first_attempt: str) -> Settings:
    # A killed worker's activity task is only retried when its start-to-close timeout runs out
    # (a killed local attempt, when its workflow task's timeout does).
    return settings.model_copy(
        update={"STEP_ATTEMPT_TIMEOUT_SECONDS": 3.0, "STEP_FIRST_ATTEMPT": first_attempt}
    )


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "crashed"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "point"),
    [
        (RECEIPT, AFTER_EFFECT),
        (WAREHOUSE, AFTER_EFFECT),
        (RECEIPT, BEFORE_EFFECT),
        (WAREHOUSE, AFTER_RECORD),
    ],
)
async def test_worker_killed_at_a_crash_point_leaves_one_effect(
    step: str,
    point: str,
    first_attempt: str,
    kill_settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    mail: MailSink,
    warehouse: WarehouseReceiver,
    marker: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    local = first_attempt == "local"
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.worker.test_crash_points",
        cwd=ROOT,
        env=subprocess_env(kill_settings, f"{step}:{point}", marker),
    )
    body = order_body()
    try:
        async with AsyncExitStack() as stack:
            # Local-first, the attempt runs where the workflow task does: the doomed process is
            # a whole worker and takes the first workflow task alone. Otherwise the workflow runs
            # elsewhere the whole time, as it would on any surviving worker.
            if not local:
                await stack.enter_async_context(
                    workflow_worker(env.client, kill_settings, sessions)
                )
            api = await stack.enter_async_context(api_client(kill_settings))
            order_id = await place_order(api, body)
            returncode = await asyncio.wait_for(doomed.wait(), timeout=60)
            assert returncode == -signal.SIGKILL
            assert await asyncio.to_thread(marker.read_text) == f"{step}:{point}"

            # The survivor stays until the workflow closes: after a crash past the ledger record
            # the order already reads completed while Temporal still retries the killed attempt.
            survivor = (
                running_worker(env.client, kill_settings, sessions)
                if local
                else activity_worker(env.client, kill_settings, sessions)
            )
            async with survivor:
                await wait_for_order_status(api, order_id, "completed")
                await wait_for_workflow(env.client, order_id)
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()

    seen = await observe(env.client, order_id, body["customer_email"], mail, warehouse)
    with capsys.disabled():
        print(f"\n[crash point] {first_attempt} SIGKILL {step}:{point}: {seen.line()}")
    assert seen.distinct_message_ids == 1
    assert seen.accepted == 1
    repeats = REPEATS_EFFECT[point]
    if step == RECEIPT:
        assert seen.raw_emails == (2 if repeats else 1)
    else:
        assert seen.deliveries == (2 if repeats else 1)
    [(attempt, outcome)] = seen.outcomes[step]
    assert outcome == RETRY_OUTCOME[point]
    if local:
        # The workflow task died with the worker and timed out; the survivor ran the workflow
        # task again, and with it the same first attempt.
        assert attempt == 1
        assert await workflow_task_timeouts(env.client, order_id) >= 1
    else:
        # The killed attempt timed out; a later attempt on the surviving worker completed it.
        assert attempt >= 2


def hold_once(step: str) -> tuple[Checkpoint, asyncio.Event, asyncio.Event]:
    """A checkpoint that holds the step's first run just before its effect, claim taken, until
    the test releases it; `holding` says it got there."""
    holding, release = asyncio.Event(), asyncio.Event()

    async def checkpoint(at: str) -> None:
        if at == BEFORE_EFFECT and activity.info().activity_type == step and not holding.is_set():
            holding.set()
            await release.wait()

    return checkpoint, holding, release


async def refused_for_a_live_claim(client: Client, order_id: str) -> bool:
    """Whether a run of the order's step has failed with StepClaimed: as a pending activity's
    last failure, a local attempt's failure marker, or the activity's last failure."""
    handle = client.get_workflow_handle(order_id)
    described = (await handle.describe()).raw_description
    for pending in described.pending_activities:
        if pending.last_failure.application_failure_info.type == STEP_CLAIMED:
            return True
    async for event in handle.fetch_history_events():
        if event.HasField("marker_recorded_event_attributes"):
            failure = event.marker_recorded_event_attributes.failure
        elif event.HasField("activity_task_failed_event_attributes"):
            # The last attempt the step had: its failure ends the activity.
            failure = event.activity_task_failed_event_attributes.failure
        else:
            continue
        if failure.application_failure_info.type == STEP_CLAIMED:
            return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
async def test_a_second_run_while_the_first_holds_the_claim_waits_for_its_outcome(
    step: str,
    first_attempt: str,
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    api: httpx.AsyncClient,
    mail: MailSink,
    warehouse: WarehouseReceiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Worker A claims the step and is about to perform it when its link to Temporal is cut:
    Temporal gives the work to worker B (the workflow task times out and B runs the same local
    first attempt again; or the activity attempt times out and B runs the next). B finds A's
    live claim and does not perform the effect: it waits for the claim's outcome. A, still
    alive, performs the effect and records it; B's next attempt finds the step done."""
    # The claim must outlive the workflow task timeout (10 s) for B to meet it live. Two
    # attempts only: one met by a live claim may end the step's attempts, which is no failure
    # of the step (it is waited out, never parked).
    settings = settings.model_copy(
        update={
            "STEP_ATTEMPT_TIMEOUT_SECONDS": 15.0,
            "STEP_FIRST_ATTEMPT": first_attempt,
            "RETRY_MAX_ATTEMPTS": 2,
        }
    )
    checkpoint, holding, release = hold_once(step)
    server = env.client.service_client.config.target_host
    host, _, port = server.rpartition(":")
    body = order_body()
    async with tcp_proxy(host, int(port)) as link:
        cut_off = await Client.connect(link.address, namespace=env.client.namespace)
        async with running_worker(cut_off, settings, sessions, checkpoint=checkpoint):
            order_id = await place_order(api, body)
            await wait_until(holding.is_set, within=30, message="A holds the claim")
            await link.cut()
            async with running_worker(env.client, settings, sessions):
                await wait_until(
                    lambda: refused_for_a_live_claim(env.client, order_id),
                    within=60,
                    interval=0.2,
                    message="B refused by A's live claim",
                )
                release.set()
                await wait_for_workflow(env.client, order_id)
            await link.restore()

    seen = await observe(env.client, order_id, body["customer_email"], mail, warehouse)
    with capsys.disabled():
        print(f"\n[crash point] {first_attempt} held {step}: {seen.line()}")
    assert seen.raw_emails == 1
    assert seen.deliveries == 1
    assert seen.accepted == 1
    async with sessions() as session:
        letters = await session.scalar(
            select(func.count()).select_from(DeadLetter).where(DeadLetter.order_id == order_id)
        )
    assert letters == 0
    # The run that met the live claim performed nothing; a later one found the step done.
    [(_attempt, outcome)] = seen.outcomes[step]
    assert outcome == "already_done"
    if first_attempt == "local":
        assert await workflow_task_timeouts(env.client, order_id) >= 1
    # One claim only, A's: the one that delivered the effect and recorded it; none was
    # interrupted (B never claimed).
    row = await step_row(sessions, order_id, step)
    if step == RECEIPT:
        [receipt] = mail.to(body["customer_email"])
        delivered_by = receipt.message[ATTEMPT_HEADER]
    else:
        [delivery] = warehouse.deliveries_for(order_id)
        delivered_by = delivery.attempt
    assert (row.status, row.claim_token) == (StepStatus.SUCCEEDED, delivered_by)
    async with sessions() as session:
        interrupted = (
            await session.scalars(
                select(InterruptedClaim).where(InterruptedClaim.order_id == order_id)
            )
        ).all()
    assert interrupted == []


async def workflow_task_timeouts(client: Client, order_id: str) -> int:
    history = await client.get_workflow_handle(order_id).fetch_history()
    return sum(
        event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT for event in history.events
    )


async def _doomed_worker() -> None:
    """A worker that SIGKILLs its own process when a step reaches the crash point in CRASH_AT."""
    settings = Settings()
    step, point = os.environ["CRASH_AT"].split(":")
    marker = Path(os.environ["CRASH_MARKER"])

    async def checkpoint(at: str) -> None:
        if at == point and activity.info().activity_type == step:
            await asyncio.to_thread(marker.write_text, f"{step}:{point}")
            os.kill(os.getpid(), signal.SIGKILL)

    engine = create_engine(settings)
    client = await connect_temporal(settings)
    sessions = create_sessionmaker(engine)
    if settings.STEP_FIRST_ATTEMPT == "local":
        # The first attempt runs in the workflow task: this process must run the workflow.
        async with running_worker(client, settings, sessions, checkpoint=checkpoint):
            await asyncio.Event().wait()
    async with activity_worker(client, settings, sessions, checkpoint=checkpoint):
        await asyncio.Event().wait()


# The process that is killed runs the step activities only; the workflow runs elsewhere the whole
# time, as it would on any surviving worker.
@asynccontextmanager
async def activity_worker(
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    *,
    checkpoint: Checkpoint | None = None,
) -> AsyncIterator[Worker]:
    async with httpx.AsyncClient() as http:
        mailer = SmtpMailer(settings.SMTP_HOST, settings.SMTP_PORT, settings.SMTP_TIMEOUT_SECONDS)
        activities = create_activities(settings, sessions, http, mailer, checkpoint=checkpoint)
        async with Worker(
            client, task_queue=settings.TEMPORAL_TASK_QUEUE, activities=activities
        ) as worker:
            yield worker


@asynccontextmanager
async def workflow_worker(
    client: Client, settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Worker]:
    async with httpx.AsyncClient() as http:
        mailer = SmtpMailer(settings.SMTP_HOST, settings.SMTP_PORT, settings.SMTP_TIMEOUT_SECONDS)
        async with Worker(
            client,
            task_queue=settings.TEMPORAL_TASK_QUEUE,
            workflows=[OrderWorkflow],
            # The workflow's local activity (its policy) runs here; step activities do not.
            activities=create_activities(settings, sessions, http, mailer),
            no_remote_activities=True,
        ) as worker:
            yield worker


if __name__ == "__main__":
    asyncio.run(_doomed_worker())


class ArrivalsReceiver(WarehouseReceiver):
    """A warehouse that notes each call as it arrives, before its answer (which its faults may
    delay), so a test can act while a call is in flight."""

    def __init__(self) -> None:
        super().__init__(WEBHOOK_SECRET.encode())
        self.arrivals = 0

    async def receive(self, request: Request) -> Response:
        self.arrivals += 1
        return await super().receive(request)


async def test_a_run_cancelled_while_its_effect_is_in_flight_sees_it_through(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The attempt is cancelled (as when the workflow task running it times out) while the
    warehouse holds its call: the run still takes the answer and records it, so the next run
    finds the step done instead of calling again. (A run cut there gave its claim back, and the
    next run delivered the webhook a second time.)"""
    receiver = ArrivalsReceiver()
    receiver.faults.configure(latency_ms=1500)
    async with serving_warehouse(receiver) as url, httpx.AsyncClient() as http:
        slow = settings.model_copy(update={"WAREHOUSE_WEBHOOK_URL": url})
        async with api_client(slow) as api:
            order_id = await place_order(api)
        steps = WarehouseActivities(sessions, http, Backoff(slow), slow)
        environment = ActivityEnvironment()
        first = asyncio.create_task(environment.run(steps.notify_warehouse, StepInput(order_id)))
        await wait_until(lambda: receiver.arrivals == 1, message="the call in flight")
        environment.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        again = await ActivityEnvironment().run(
            steps.notify_warehouse, StepInput(order_id, attempt_offset=1)
        )

    assert again.outcome == StepOutcome.ALREADY_DONE
    assert [d.answered for d in receiver.deliveries_for(order_id)] == [202]
    async with sessions() as session:
        step = await session.get(OrderStep, (order_id, WAREHOUSE))
    assert step is not None and step.status == StepStatus.SUCCEEDED
