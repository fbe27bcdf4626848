"""The service's Prometheus metrics: every name in one place, the API's counters, and the backlog
gauges (outbox, dead letters) that are read from the database at scrape time, so each API replica
reports the shared truth rather than what it happened to see itself."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import client as temporal_client
from temporalio.exceptions import WorkflowAlreadyStartedError

from core.contracts import STEPS
from core.models import DeadLetter, DeadLetterStatus, WorkflowOutbox, utcnow
from core.names import ORDER_WORKFLOW

# API (prometheus_client, served at GET /metrics).
HTTP_REQUESTS = "orderflow_http_requests_total"
HTTP_REQUEST_DURATION = "orderflow_http_request_duration_seconds"
ORDERS_ACCEPTED = "orderflow_orders_accepted_total"
ORDERS_DEDUPLICATED = "orderflow_orders_deduplicated_total"
ORDERS_DECLINED = "orderflow_orders_declined_total"
OUTBOX_BACKLOG = "orderflow_outbox_backlog"
OUTBOX_OLDEST_AGE = "orderflow_outbox_oldest_age_seconds"
DEAD_LETTERS_OPEN = "orderflow_dead_letters_open"
DATABASE_UP = "orderflow_database_up"
# Worker (recorded through the Temporal SDK's meter, served on WORKER_METRICS_ADDRESS).
STEP_ATTEMPTS = "orderflow_step_attempts_total"
SIDE_EFFECT_DURATION = "orderflow_side_effect_duration_seconds"
# How late the worker's event loop runs: what gates its slots (core/admission.py).
LOOP_LAG_METRIC = "orderflow_worker_loop_lag_seconds"

DEDUPLICATED_BY = ("key", "workflow_id")

ORDERFLOW_METRICS = frozenset(
    {
        HTTP_REQUESTS,
        HTTP_REQUEST_DURATION,
        ORDERS_ACCEPTED,
        ORDERS_DEDUPLICATED,
        ORDERS_DECLINED,
        OUTBOX_BACKLOG,
        OUTBOX_OLDEST_AGE,
        DEAD_LETTERS_OPEN,
        DATABASE_UP,
        STEP_ATTEMPTS,
        SIDE_EFFECT_DURATION,
        LOOP_LAG_METRIC,
    }
)
# The SDK's own metrics that the dashboard and the alerts use (with the worker runtime's
# durations_as_seconds=True they are in seconds, without a unit suffix).
TEMPORAL_SDK_METRICS = frozenset(
    {
        "temporal_activity_schedule_to_start_latency",
        "temporal_workflow_task_schedule_to_start_latency",
        "temporal_activity_execution_failed",
        "temporal_activity_execution_latency",
        # A step's first attempt runs as a local activity (STEP_FIRST_ATTEMPT=local).
        "temporal_local_activity_execution_failed",
        "temporal_local_activity_execution_latency",
        "temporal_worker_task_slots_available",
    }
)

# A scrape answers without the backlog gauges rather than hang on a stuck database.
SCRAPE_DATABASE_TIMEOUT_SECONDS = 2.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Unregistered: each API app builds its own registry from these plus its database collector,
# so several apps in one process (the tests) never clash over a global registry.
http_requests = Counter(
    HTTP_REQUESTS,
    "HTTP requests answered, by route template, method and status code.",
    ["method", "route", "status"],
    registry=None,
)
http_request_duration = Histogram(
    HTTP_REQUEST_DURATION,
    "Time from request to the end of the response, by route template, method and status code.",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
    registry=None,
)
orders_accepted = Counter(
    ORDERS_ACCEPTED, "Orders committed with their outbox entry (answered 202).", registry=None
)
orders_deduplicated = Counter(
    ORDERS_DEDUPLICATED,
    "Repeats that made no new order: by=key when the Idempotency-Key answered for an earlier "
    "request, by=workflow_id when Temporal found the order's workflow already started.",
    ["by"],
    registry=None,
)
orders_declined = Counter(
    ORDERS_DECLINED, "Orders refused because the card was declined (402).", registry=None
)
for _by in DEDUPLICATED_BY:
    orders_deduplicated.labels(by=_by)

API_COLLECTORS: tuple[Collector, ...] = (
    http_requests,
    http_request_duration,
    orders_accepted,
    orders_deduplicated,
    orders_declined,
)


def record_order_accepted() -> None:
    orders_accepted.inc()


def record_order_declined() -> None:
    orders_declined.inc()


def record_order_deduplicated(by: str) -> None:
    orders_deduplicated.labels(by=by).inc()


def api_registry() -> CollectorRegistry:
    """The API's counters and the usual process metrics, in a registry of the app's own."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (*API_COLLECTORS, PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


@dataclass(frozen=True)
class Backlog:
    """What waits in the database: outbox entries not yet started, dead letters not handled."""

    outbox_backlog: int
    outbox_oldest_age_seconds: float
    dead_letters_open: dict[str, int] = field(default_factory=dict)


async def read_backlog(session: AsyncSession, now: datetime | None = None) -> Backlog:
    pending = WorkflowOutbox.started_at.is_(None)
    count, oldest = (
        await session.execute(
            select(func.count(), func.min(WorkflowOutbox.created_at)).where(pending)
        )
    ).one()
    age = max(((now or utcnow()) - oldest).total_seconds(), 0.0) if oldest else 0.0
    rows = await session.execute(
        select(DeadLetter.step, func.count())
        .where(DeadLetter.status == DeadLetterStatus.OPEN)
        .group_by(DeadLetter.step)
    )
    # Every step is reported, zero included, so an alert sees 0 rather than no series at all.
    open_by_step = dict.fromkeys(STEPS, 0)
    open_by_step.update({step: int(n) for step, n in rows.all()})
    return Backlog(int(count), age, open_by_step)


class BacklogCollector(Collector):
    """Exposes one scrape's database reading; `None` means the database did not answer."""

    def __init__(self, backlog: Backlog | None) -> None:
        self._backlog = backlog

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            DATABASE_UP, "1 when this scrape read the backlog gauges from the database."
        )
        up.add_metric([], 1.0 if self._backlog else 0.0)
        yield up
        if self._backlog is None:
            return
        yield GaugeMetricFamily(
            OUTBOX_BACKLOG,
            "Orders whose workflow start is not confirmed yet (outbox entries pending).",
            value=self._backlog.outbox_backlog,
        )
        yield GaugeMetricFamily(
            OUTBOX_OLDEST_AGE,
            "Age of the oldest pending outbox entry; 0 when none is pending.",
            value=self._backlog.outbox_oldest_age_seconds,
        )
        open_letters = GaugeMetricFamily(
            DEAD_LETTERS_OPEN, "Dead letters waiting for an operator, by step.", labels=["step"]
        )
        for step, count in sorted(self._backlog.dead_letters_open.items()):
            open_letters.add_metric([step], count)
        yield open_letters


class _Scrape(Collector):
    def __init__(self, parts: Iterable[Collector]) -> None:
        self._parts = tuple(parts)

    def collect(self) -> Iterator[Metric]:
        for part in self._parts:
            yield from part.collect()


async def scrape(
    registry: CollectorRegistry,
    sessions: async_sessionmaker[AsyncSession],
) -> Collector:
    """Everything one GET /metrics answers: the app's registry and a fresh database reading."""
    backlog: Backlog | None
    try:
        async with asyncio.timeout(SCRAPE_DATABASE_TIMEOUT_SECONDS), sessions() as session:
            backlog = await read_backlog(session)
    except Exception:  # a scrape must still answer, with orderflow_database_up 0
        backlog = None
    return _Scrape((registry, BacklogCollector(backlog)))


class WorkflowStartMetrics(temporal_client.Interceptor):
    """Counts the starts Temporal answered with an existing workflow: the order's workflow ID is
    its order ID, so that is a duplicate start the server absorbed (USE_EXISTING / closed)."""

    def intercept_client(
        self, next: temporal_client.OutboundInterceptor
    ) -> temporal_client.OutboundInterceptor:
        return _WorkflowStartMetricsOutbound(next)


class _WorkflowStartMetricsOutbound(temporal_client.OutboundInterceptor):
    async def start_workflow(
        self, input: temporal_client.StartWorkflowInput
    ) -> temporal_client.WorkflowHandle[Any, Any]:
        # Only plain starts of an order's workflow; a signal-with-start (cancel) is not a repeat.
        if input.workflow != ORDER_WORKFLOW or input.start_signal is not None:
            return await super().start_workflow(input)
        try:
            handle = await super().start_workflow(input)
        except WorkflowAlreadyStartedError:
            record_order_deduplicated("workflow_id")
            raise
        # The SDK keeps the server's answer on the handle; `started` is false when the
        # conflict policy handed back the running workflow instead of starting one.
        response = getattr(handle, "_start_workflow_response", None)
        if response is not None and not getattr(response, "started", True):
            record_order_deduplicated("workflow_id")
        return handle
