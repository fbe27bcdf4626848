"""Steps ride out an outage of our own database: an attempt that cannot reach the ledger is a
retryable DatabaseUnavailable, and a step whose attempts run out on it is waited out, not
dead-lettered. For real: the worker's link to PostgreSQL goes through a TCP proxy the test cuts,
with a retry budget (two attempts) that the outage outlasts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.exceptions import (
    ApplicationError,
    ApplicationErrorCategory,
    RetryState,
    TimeoutType,
)
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.checkpoint import BEFORE_EFFECT, Checkpoint
from activities.receipt import ReceiptActivities
from activities.retry import DATABASE_UNAVAILABLE, Backoff, LedgerOutages
from activities.smtp import SmtpMailer
from activities.warehouse import WarehouseActivities
from core.contracts import STEPS, StepInput
from core.db import create_engine, create_sessionmaker
from core.models import DeadLetter, OrderStep
from core.settings import Settings
from core.states import StepOutcome
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, free_port, running_worker
from tests.integration.api.test_outages import database_link, needs_postgres
from tests.support import (
    activity_error,
    activity_timeout,
    order_body,
    place_order,
    wait_for_order_status,
    wait_until,
)
from tests.tcp_proxy import TcpProxy
from workflows.order_policy import database_down

Sessions = async_sessionmaker[AsyncSession]
RECEIPT, WAREHOUSE = STEPS
OUTAGE_LOGGER = "activities.retry"
ORDERS = 3


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the steps' outage log said, at WARNING."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == OUTAGE_LOGGER and r.levelno == logging.WARNING
    ]


def database_tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records at WARNING or above with a traceback of a DatabaseUnavailable attempt."""
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and r.exc_info
        and isinstance(r.exc_info[1], ApplicationError)
        and r.exc_info[1].type == DATABASE_UNAVAILABLE
    ]


# --- the classification, in the activities and in the workflow ----------------------------------


def unreachable_sessions() -> Sessions:
    """Sessions on a PostgreSQL address where nothing listens: every ledger call is refused."""
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere"
    return create_sessionmaker(create_engine(Settings(DATABASE_URL=url)))


async def test_an_unreachable_ledger_is_a_retryable_database_unavailable_logged_once(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = unreachable_sessions()
    outages = LedgerOutages(Backoff(settings))
    async with httpx.AsyncClient() as http:
        mailer = SmtpMailer(settings.SMTP_HOST, settings.SMTP_PORT, 5)
        receipts = ReceiptActivities(sessions, mailer, Backoff(settings), settings, outages=outages)
        warehouse = WarehouseActivities(
            sessions, http, Backoff(settings), settings, outages=outages
        )
        environment = ActivityEnvironment()
        caught: list[ApplicationError] = []
        with caplog.at_level(logging.INFO, logger=OUTAGE_LOGGER):
            for run in (receipts.send_receipt, warehouse.notify_warehouse):
                with pytest.raises(ApplicationError) as raised:
                    await environment.run(run, StepInput("order-1", attempt_offset=3))
                caught.append(raised.value)
        await mailer.aclose()
    for error in caught:
        assert error.type == DATABASE_UNAVAILABLE
        assert not error.non_retryable
        assert error.next_retry_delay is not None and error.next_retry_delay > timedelta(0)
        assert error.category == ApplicationErrorCategory.BENIGN
        # The step attempt (offset 3 + the activity's first), for the workflow to count on from.
        assert list(error.details) == [4]
        assert "claiming the step" in error.message
    assert outages.outage.failures == 2
    assert len(warnings(caplog)) == 1


async def test_a_query_that_is_wrong_is_not_an_outage(
    settings: Settings, sessions: Sessions
) -> None:
    async with httpx.AsyncClient() as http:
        warehouse = WarehouseActivities(sessions, http, Backoff(settings), settings)
        # The database answers; the order does not exist: a bug, not the database being down.
        with pytest.raises(LookupError):
            await ActivityEnvironment().run(warehouse.notify_warehouse, StepInput("no-such-order"))


class ClaimAnswerLost:
    """Sessions whose first write transaction commits and then loses its answer, as a link cut
    between the database's commit and its reply does."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions
        self.lost = 0

    def __call__(self) -> AsyncSession:
        return self._sessions()

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions.begin() as session:
            yield session
        if not self.lost:
            self.lost += 1
            raise ConnectionResetError("the link went down before the commit's answer")


async def test_a_claim_whose_answer_was_lost_is_taken_over_at_once_by_the_next_attempt(
    settings: Settings, sessions: Sessions, warehouse: WarehouseReceiver
) -> None:
    """The claim landed but its attempt saw an outage: nobody runs it, so the retry in this
    process performs the step at once instead of waiting out a lease nobody holds."""
    async with api_client(settings) as api:
        order_id = await place_order(api)
    lossy = ClaimAnswerLost(sessions)
    async with httpx.AsyncClient() as http:
        steps = WarehouseActivities(
            lossy,  # type: ignore[arg-type]
            http,
            Backoff(settings),
            settings,
            outages=LedgerOutages(Backoff(settings)),
        )
        with pytest.raises(ApplicationError) as first:
            await ActivityEnvironment().run(steps.notify_warehouse, StepInput(order_id))
        assert first.value.type == DATABASE_UNAVAILABLE
        assert lossy.lost == 1
        # The claim is on the row, live for the attempt's whole lease.
        async with sessions() as session:
            step = await session.get(OrderStep, (order_id, WAREHOUSE))
            assert step is not None and step.claim_token is not None
        result = await ActivityEnvironment().run(
            steps.notify_warehouse, StepInput(order_id, attempt_offset=1)
        )
    assert result.outcome == StepOutcome.PERFORMED
    assert warehouse.accepted_orders().count(order_id) == 1


def database_unavailable(attempt: int) -> ApplicationError:
    return ApplicationError(
        "database unavailable", attempt, type=DATABASE_UNAVAILABLE, next_retry_delay=timedelta(2)
    )


@pytest.mark.parametrize(
    ("failure", "down_at"),
    [
        # A local attempt's failure arrives bare.
        (database_unavailable(1), 1),
        (activity_error(database_unavailable(2), RetryState.MAXIMUM_ATTEMPTS_REACHED), 2),
        (activity_error(database_unavailable(4), RetryState.TIMEOUT), 4),
        (
            activity_error(
                activity_timeout(TimeoutType.SCHEDULE_TO_CLOSE, database_unavailable(3)),
                RetryState.TIMEOUT,
            ),
            3,
        ),
        # The last attempt itself hung: whatever came before, that is no database failure.
        (
            activity_error(
                activity_timeout(TimeoutType.START_TO_CLOSE, database_unavailable(3)),
                RetryState.MAXIMUM_ATTEMPTS_REACHED,
            ),
            None,
        ),
        (
            activity_error(
                ApplicationError("503", type="WarehouseUnavailable"),
                RetryState.MAXIMUM_ATTEMPTS_REACHED,
            ),
            None,
        ),
        (ApplicationError("no", type="WarehouseRejected", non_retryable=True), None),
    ],
)
def test_which_give_ups_the_workflow_waits_out(failure: BaseException, down_at: int | None) -> None:
    down = database_down(failure)
    assert (down[0] if down else None) == down_at


# --- for real: the worker's link to PostgreSQL cut --------------------------------------------


@dataclass
class Cut:
    """A checkpoint that cuts the worker's database link the first time an attempt of one of
    `steps` (a local one or an activity task, as asked) reaches the downstream: the effect
    happens, its record cannot. It notes which order and step it cut."""

    proxy: TcpProxy
    steps: tuple[str, ...]
    local: bool
    at: tuple[str, str] | None = None

    async def __call__(self, point: str) -> None:
        info = activity.info()
        if point != BEFORE_EFFECT or self.at is not None or info.activity_type not in self.steps:
            return
        if info.is_local == self.local:
            self.at = (info.workflow_id or "", info.activity_type)
            await self.proxy.cut()


@asynccontextmanager
async def worker_through_proxy(
    env: WorkflowEnvironment,
    settings: Settings,
    checkpoint: Callable[[TcpProxy], Checkpoint] | None = None,
) -> AsyncIterator[TcpProxy]:
    async with database_link(settings.DATABASE_URL) as (proxy, url):
        through = settings.model_copy(update={"DATABASE_URL": url})
        engine = create_engine(through)
        try:
            cut = checkpoint(proxy) if checkpoint else None
            worker_sessions = create_sessionmaker(engine)
            async with running_worker(env.client, through, worker_sessions, checkpoint=cut):
                yield proxy
        finally:
            await engine.dispose()


def tight(settings: Settings) -> Settings:
    """A budget a cut of a few seconds outlasts: two attempts, 50-200 ms apart (Temporal holds a
    retry about a second), so without riding out a step is dead-lettered within seconds."""
    return settings.model_copy(
        update={
            "RETRY_MAX_ATTEMPTS": 2,
            "RETRY_INITIAL_INTERVAL_SECONDS": 0.05,
            "RETRY_MAX_INTERVAL_SECONDS": 0.2,
            "STEP_FIRST_ATTEMPT": "local",
        }
    )


async def scheduled_activities(client: Client, order_id: str) -> list[str]:
    return [
        event.activity_task_scheduled_event_attributes.activity_type.name
        async for event in client.get_workflow_handle(order_id).fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


async def gave_up_once(client: Client, order_id: str, steps: tuple[str, ...] = STEPS) -> bool:
    """Whether each of the steps has used up one run of its budget: it is run again after its
    attempts ran out (a second activity of its own), or it is being dead-lettered."""
    scheduled = await scheduled_activities(client, order_id)
    if "record_dead_letter" in scheduled:
        return True
    return all(scheduled.count(step) >= 2 for step in steps)


async def dead_letters(sessions: Sessions, order_ids: list[str]) -> list[DeadLetter]:
    async with sessions() as session:
        query = select(DeadLetter).where(DeadLetter.order_id.in_(order_ids))
        return list((await session.scalars(query)).all())


def assert_each_delivered_once(
    placed: dict[str, str], mail: MailSink, warehouse: WarehouseReceiver
) -> None:
    for order_id, email in placed.items():
        message_ids = {m.message_id for m in mail.to(email)}
        assert len(message_ids) == 1, message_ids
        assert warehouse.accepted_orders().count(order_id) == 1


async def place(api: httpx.AsyncClient, count: int) -> dict[str, str]:
    """Places `count` orders; returns their IDs with their customers' addresses."""
    placed: dict[str, str] = {}
    for _ in range(count):
        body = order_body()
        placed[await place_order(api, body)] = body["customer_email"]
    return placed


async def wait_until_gave_up(
    client: Client, order_ids: list[str], steps: tuple[str, ...] = STEPS
) -> None:
    for order_id in order_ids:
        await wait_until(
            lambda o=order_id: gave_up_once(client, o, steps),  # type: ignore[misc]
            within=60,
            message=f"{order_id}'s {steps} used up their attempts",
        )


@needs_postgres
async def test_steps_ride_out_a_cut_in_their_local_first_attempt(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: Sessions,
    mail: MailSink,
    warehouse: WarehouseReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = tight(settings)
    with caplog.at_level(logging.INFO):
        async with worker_through_proxy(env, budget) as proxy, api_client(budget) as api:
            # The API's own link is not cut: the orders are accepted, their steps find the
            # worker's database gone at the very first ledger read, in the local attempt.
            await proxy.cut()
            placed = await place(api, ORDERS)
            await wait_until_gave_up(env.client, list(placed))
            await proxy.restore()
            for order_id in placed:
                await wait_for_order_status(api, order_id, "completed")

    assert await dead_letters(sessions, list(placed)) == []
    assert_each_delivered_once(placed, mail, warehouse)
    # One burst, one warning (and one when it ended), and no traceback per failed attempt.
    assert [m.split(" (")[0].split(" after")[0] for m in warnings(caplog)] == [
        "database unavailable",
        "database recovered",
    ]
    assert database_tracebacks(caplog) == []


@needs_postgres
async def test_steps_ride_out_a_cut_after_their_effect_in_a_later_attempt(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: Sessions,
    mail: MailSink,
    warehouse: WarehouseReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first (local) attempt of every step fails downstream; the second, an activity task,
    performs the effect and the link is cut before its record: the documented window, so the
    retry after the outage repeats the effect with the same key."""
    budget = tight(settings)
    mail.faults.configure(fail_next=ORDERS, status=451)
    warehouse.faults.configure(fail_next=ORDERS, status=503)

    cuts: list[Cut] = []

    def cut(proxy: TcpProxy) -> Cut:
        cuts.append(Cut(proxy, STEPS, local=False))
        return cuts[0]

    with caplog.at_level(logging.INFO):
        async with worker_through_proxy(env, budget, cut) as proxy, api_client(budget) as api:
            placed = await place(api, ORDERS)
            at = await wait_until(lambda: cuts[0].at, within=60, message="the link cut")
            cut_order, cut_step = at
            await wait_until_gave_up(env.client, [cut_order], (cut_step,))
            await proxy.restore()
            for order_id in placed:
                await wait_for_order_status(api, order_id, "completed")

    assert await dead_letters(sessions, list(placed)) == []
    assert_each_delivered_once(placed, mail, warehouse)
    # The cut attempt had performed the effect: the retry after the outage repeated it.
    if cut_step == RECEIPT:
        assert len(mail.to(placed[cut_order])) == 2
    else:
        assert len(warehouse.deliveries_for(cut_order)) == 3  # 503, accepted, duplicate
    assert warnings(caplog)[0].startswith("database unavailable")
    assert len(warnings(caplog)) == 2
    assert database_tracebacks(caplog) == []


@needs_postgres
async def test_a_rejection_that_cannot_be_recorded_is_dead_lettered_once_the_database_answers(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: Sessions,
    mail: MailSink,
    warehouse: WarehouseReceiver,
) -> None:
    budget = tight(settings)
    warehouse.faults.configure(fail_rate=1.0, status=400)
    async with (
        worker_through_proxy(env, budget, lambda p: Cut(p, (WAREHOUSE,), local=True)) as proxy,
        api_client(budget) as api,
    ):
        order_id = await place_order(api)
        await wait_until_gave_up(env.client, [order_id], (WAREHOUSE,))
        await proxy.restore()
        await wait_for_order_status(api, order_id, "needs_attention")

    [letter] = await dead_letters(sessions, [order_id])
    assert letter.step == WAREHOUSE
    assert letter.error_type == "WarehouseRejected"
    assert letter.permanent
    # Asked once before the outage (unrecorded), and once after it, which was dead-lettered.
    assert [d.answered for d in warehouse.deliveries_for(order_id)][-1] == 400
