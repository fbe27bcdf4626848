"""A dead letter and a cancel that find our own database gone are retried, under the real
`OrderWorkflow`'s real policy (`BOOKKEEPING_RETRY`), until the database answers, and the outage
is said once per burst, never with a traceback per attempt. For real: the bookkeeping
activities reach PostgreSQL through a TCP proxy the test cuts while they run their attempts.

The step activities reach the database on a link of their own that stays up, so the warehouse's
refusal parks the step at its first attempt and the dead letter is what meets the outage. The
attempts are read from the worker's own activity interceptor chain, so they count whether the
workflow runs the bookkeeping as activity tasks or as local activities."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio import client as temporal_client
from temporalio import worker as temporal_worker
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput

from activities.outages import bookkeeping_outage_log
from activities.retry import DATABASE_UNAVAILABLE
from activities.smtp import SmtpMailer
from core.contracts import OrderWorkflowStatus
from core.db import create_engine, create_sessionmaker
from core.models import DeadLetterStatus, Order
from core.names import RECORD_DEAD_LETTER_ACTIVITY
from core.outages import watch_database
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client
from tests.integration.api.test_outages import database_link, needs_postgres
from tests.support import letter_where, place_order, wait_for_order_status, wait_until
from tests.tcp_proxy import TcpProxy
from worker import create_activities, create_worker
from workflows.order_policy import BOOKKEEPING_RETRY

Sessions = async_sessionmaker[AsyncSession]
OUTAGE_LOGGER = "activities.outages"
CANCEL_ORDER = "cancel_order"
# The workflow's bookkeeping: what it records about the order besides the steps themselves.
BOOKKEEPING = {RECORD_DEAD_LETTER_ACTIVITY, "discard_dead_letter", CANCEL_ORDER}
ATTEMPTS_IN_THE_OUTAGE = 3
# What a busy machine may add to a retry's wait: the server's timer and the worker's poll.
LATE_BY = 1.5


@dataclass
class Attempt:
    activity: str
    number: int
    local: bool
    started: float
    failure: str | None = None


@dataclass
class AttemptLog(temporal_client.Interceptor, temporal_worker.Interceptor):
    """Every activity attempt the worker runs, local or not, and how it ended: a worker
    interceptor, carried by the client the worker is built on, outermost of the chain."""

    attempts: list[Attempt] = field(default_factory=list)

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Recording(next, self)

    def of(self, name: str) -> list[Attempt]:
        return [attempt for attempt in self.attempts if attempt.activity == name]

    def failed_with(self, name: str, error_type: str) -> list[Attempt]:
        return [attempt for attempt in self.of(name) if attempt.failure == error_type]


class _Recording(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, log: AttemptLog) -> None:
        super().__init__(next)
        self._log = log

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        attempt = Attempt(info.activity_type, info.attempt, info.is_local, time.monotonic())
        self._log.attempts.append(attempt)
        try:
            return await super().execute_activity(input)
        except ApplicationError as failure:
            attempt.failure = failure.type
            raise
        except BaseException as failure:
            attempt.failure = type(failure).__name__
            raise


@asynccontextmanager
async def cut_off_bookkeeping(
    env: WorkflowEnvironment, settings: Settings, sessions: Sessions, log: AttemptLog
) -> AsyncIterator[TcpProxy]:
    """The real worker (`create_worker`, `create_activities`) whose bookkeeping activities reach
    the database through the proxy it yields, and its step activities directly."""
    async with database_link(settings.DATABASE_URL) as (proxy, url):
        engine = create_engine(settings.model_copy(update={"DATABASE_URL": url}))
        outage = bookkeeping_outage_log()
        watch_database(engine, outage)
        mailer = SmtpMailer(settings.SMTP_HOST, settings.SMTP_PORT, settings.SMTP_TIMEOUT_SECONDS)
        config = env.client.config()
        config["interceptors"] = [log]
        client = Client(**config)
        try:
            async with httpx.AsyncClient() as http:
                direct = create_activities(settings, sessions, http, mailer, temporal=client)
                cut = create_activities(
                    settings, create_sessionmaker(engine), http, mailer, temporal=client
                )
                activities = [a for a in direct if a.__name__ not in BOOKKEEPING]
                activities += [a for a in cut if a.__name__ in BOOKKEEPING]
                assert len(activities) == len(direct)
                async with create_worker(client, settings, activities, database_outage=outage):
                    yield proxy
        finally:
            await mailer.aclose()
            await engine.dispose()


def policy_waits(count: int) -> list[float]:
    """The waits BOOKKEEPING_RETRY puts between its first `count` + 1 attempts."""
    assert BOOKKEEPING_RETRY.maximum_interval is not None
    first = BOOKKEEPING_RETRY.initial_interval.total_seconds()
    cap = BOOKKEEPING_RETRY.maximum_interval.total_seconds()
    return [min(first * BOOKKEEPING_RETRY.backoff_coefficient**n, cap) for n in range(count)]


def assert_retried_under_the_bookkeeping_policy(attempts: list[Attempt]) -> None:
    """Attempts 1, 2, ... one after another, each after the wait the policy gives it, the last
    one through, every one before it failed on the database."""
    assert [a.number for a in attempts] == list(range(1, len(attempts) + 1)), attempts
    assert all(a.failure == DATABASE_UNAVAILABLE for a in attempts[:-1]), attempts
    assert attempts[-1].failure is None, attempts
    waits = [later.started - earlier.started for earlier, later in itertools.pairwise(attempts)]
    for waited, due in zip(waits, policy_waits(len(waits)), strict=True):
        assert due - 0.2 <= waited <= due + LATE_BY, (waits, policy_waits(len(waits)))


def outage_said(caplog: pytest.LogCaptureFixture) -> list[str]:
    said = [r.getMessage() for r in caplog.records if r.name == OUTAGE_LOGGER and r.levelno >= 30]
    return [m.split(" (")[0].split(" after")[0] for m in said]


@pytest.mark.slow
@needs_postgres
async def test_a_dead_letter_and_a_cancel_wait_out_a_database_cut_under_the_real_policy(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: Sessions,
    warehouse: WarehouseReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The policy the workflow runs its bookkeeping under retries without end, and waits grow.
    assert BOOKKEEPING_RETRY.maximum_attempts == 0
    assert BOOKKEEPING_RETRY.backoff_coefficient > 1
    settings = settings.model_copy(update={"WORKFLOW_START_MODE": "request"})
    log = AttemptLog()
    warehouse.faults.configure(fail_rate=1.0, status=400)
    with caplog.at_level(logging.INFO):
        async with (
            cut_off_bookkeeping(env, settings, sessions, log) as proxy,
            api_client(settings) as api,
        ):
            await proxy.cut()
            order_id = await place_order(api)

            async def letters_refused() -> bool:
                refused = log.failed_with(RECORD_DEAD_LETTER_ACTIVITY, DATABASE_UNAVAILABLE)
                return len(refused) >= ATTEMPTS_IN_THE_OUTAGE

            await wait_until(letters_refused, within=30, message="the dead letter refused")
            assert await letter_where(sessions, order_id, DeadLetterStatus.OPEN) is None
            await proxy.restore()
            await wait_for_order_status(api, order_id, "needs_attention")
            letter = await letter_where(sessions, order_id, DeadLetterStatus.OPEN)
            assert letter is not None and letter.error_type == "WarehouseRejected"
            assert_retried_under_the_bookkeeping_policy(log.of(RECORD_DEAD_LETTER_ACTIVITY))

            await proxy.cut()
            cancelling = await api.post(f"/orders/{order_id}/cancel")
            assert cancelling.status_code == 202, cancelling.text

            async def cancels_refused() -> bool:
                refused = log.failed_with(CANCEL_ORDER, DATABASE_UNAVAILABLE)
                return len(refused) >= ATTEMPTS_IN_THE_OUTAGE

            await wait_until(cancels_refused, within=30, message="the cancel refused")
            await proxy.restore()
            handle = env.client.get_workflow_handle(order_id, result_type=OrderWorkflowStatus)
            result = await handle.result()
            assert_retried_under_the_bookkeeping_policy(log.of(CANCEL_ORDER))

    assert (result.status, result.steps["notify_warehouse"].status) == ("cancelled", "skipped")
    async with sessions() as session:
        order = await session.get(Order, order_id)
    assert order is not None and order.status == "cancelled"
    discarded = await letter_where(sessions, order_id, DeadLetterStatus.DISCARDED)
    assert discarded is not None and discarded.id == letter.id
    assert discarded.discard_reason == "order cancelled"
    # One burst per cut, each said when it began and when it ended.
    assert outage_said(caplog) == ["database unavailable", "database recovered"] * 2
    tracebacks = [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]
    assert tracebacks == [], [r.getMessage() for r in tracebacks]
