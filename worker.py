"""The worker process: builds the clients the activities use, runs OrderWorkflow, the bulk
redrives' RedriveWorkflow and their activities on the task queue, relays the outbox's orders
whose workflow nobody started, and keeps the retention cleanup's Temporal Schedule up to date
(RetentionWorkflow runs here too).

Run it with `python worker.py`; it reads the same environment variables as the API."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker

from activities.checkpoint import Checkpoint
from activities.dead_letters import DeadLetterActivities
from activities.metrics import StepMetricsInterceptor, worker_runtime
from activities.orders import OrderActivities
from activities.outages import DatabaseOutageInterceptor, bookkeeping_outage_log
from activities.policy import PolicyActivities
from activities.receipt import Mailer, ReceiptActivities
from activities.redrive import RedriveActivities
from activities.retention import RetentionActivities
from activities.retry import Backoff, LedgerOutages
from activities.smtp import SmtpMailer
from activities.warehouse import WarehouseActivities
from core.admission import WorkerLoad
from core.db import create_engine, create_sessionmaker
from core.logging import configure_logging
from core.outages import OutageLog, watch_database
from core.relay import run_relay
from core.retention import ensure_retention_schedule
from core.settings import Settings, get_settings
from core.temporal import connect_temporal
from core.tracing import sandbox_runner, tracing_from_environment
from workflows.order import OrderWorkflow
from workflows.redrive import RedriveWorkflow
from workflows.retention import RetentionWorkflow

log = logging.getLogger("orderflow.worker")
# Ample for the relay's pass in progress to finish normally; one stuck longer is cancelled.
RELAY_STOP_SECONDS = 15.0


def create_activities(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
    mailer: Mailer,
    *,
    checkpoint: Checkpoint | None = None,
    temporal: Client | None = None,
) -> list[Callable[..., Any]]:
    """The activities, built on the given clients; the bulk redrive's need `temporal` (it sends
    the orders' workflows their updates) and are left out without it."""
    backoff = Backoff(settings)
    # One per process for both steps, so an outage burst is one warning, not one per step.
    outages = LedgerOutages(backoff)
    receipts = ReceiptActivities(
        sessions, mailer, backoff, settings, outages=outages, checkpoint=checkpoint
    )
    warehouse = WarehouseActivities(
        sessions, http, backoff, settings, outages=outages, checkpoint=checkpoint
    )
    dead_letters = DeadLetterActivities(sessions)
    policy = PolicyActivities(settings)
    activities: list[Callable[..., Any]] = [
        receipts.send_receipt,
        warehouse.notify_warehouse,
        dead_letters.record_dead_letter,
        dead_letters.discard_dead_letter,
        OrderActivities(sessions).cancel_order,
        policy.load_step_policy,
        RetentionActivities(sessions).purge_expired,
    ]
    if temporal is not None:
        redrive = RedriveActivities(sessions, temporal)
        activities += [
            redrive.snapshot_redrive,
            redrive.list_redrive_page,
            redrive.send_redrive_retry,
            redrive.redrive_outcomes,
        ]
    return activities


def create_worker(
    client: Client,
    settings: Settings,
    activities: Sequence[Callable[..., Any]],
    *,
    task_queue: str | None = None,
    database_outage: OutageLog | None = None,
    load: WorkerLoad | None = None,
) -> Worker:
    """`database_outage` is where the bookkeeping activities' database outages are said once per
    burst; `run` ends its bursts when the engine answers again. `load` admits the work (its
    slots); the relay reads it too."""
    return Worker(
        client,
        task_queue=task_queue or settings.TEMPORAL_TASK_QUEUE,
        workflows=[OrderWorkflow, RetentionWorkflow, RedriveWorkflow],
        activities=activities,
        tuner=(load or WorkerLoad.from_settings(settings)).tuner(),
        max_cached_workflows=settings.WORKER_MAX_CACHED_WORKFLOWS,
        max_task_queue_activities_per_second=settings.WORKER_MAX_TASK_QUEUE_ACTIVITIES_PER_SECOND,
        graceful_shutdown_timeout=timedelta(seconds=settings.WORKER_GRACEFUL_SHUTDOWN_SECONDS),
        # The first is the outermost: the step metrics count an attempt as the outage made it.
        interceptors=[
            StepMetricsInterceptor(),
            DatabaseOutageInterceptor(database_outage or bookkeeping_outage_log()),
        ],
        workflow_runner=sandbox_runner(),
    )


async def run(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        engine = create_engine(settings)
        stack.push_async_callback(engine.dispose)
        sessions = create_sessionmaker(engine)
        http = await stack.enter_async_context(httpx.AsyncClient())
        mailer = SmtpMailer(settings.SMTP_HOST, settings.SMTP_PORT, settings.SMTP_TIMEOUT_SECONDS)
        stack.push_async_callback(mailer.aclose)
        # Off unless OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT say where spans go.
        tracing = tracing_from_environment("orderflow-worker")
        stack.callback(tracing.shutdown)
        # Serves the SDK's metrics and our step metrics on WORKER_METRICS_ADDRESS.
        runtime = worker_runtime(settings.WORKER_METRICS_ADDRESS)
        if runtime is not None:
            log.info("worker metrics on http://%s/metrics", settings.WORKER_METRICS_ADDRESS)
        client = await connect_temporal(
            settings, interceptors=tracing.interceptors(), runtime=runtime
        )
        database_outage = bookkeeping_outage_log()
        watch_database(engine, database_outage)
        load = WorkerLoad.from_settings(
            settings, runtime.metric_meter if runtime is not None else None
        )
        stack.callback(load.stop)
        worker = create_worker(
            client,
            settings,
            create_activities(settings, sessions, http, mailer, temporal=client),
            database_outage=database_outage,
            load=load,
        )

        try:
            await ensure_retention_schedule(client, settings)
        except Exception:
            # Retention can wait; orders cannot. The next worker start tries again.
            log.exception("could not create or update the retention schedule")

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)

        relay = asyncio.create_task(
            run_relay(sessions, client, settings, stop=stop, worker_room=load.room),
            name="outbox-relay",
        )
        running = asyncio.create_task(worker.run(), name="worker")
        log.info("worker polling task queue %s", settings.TEMPORAL_TASK_QUEUE)
        stopped = asyncio.create_task(stop.wait())
        # A relay that ended on its own failed: the worker stops with it rather than run on
        # without one (in outbox mode nothing else starts workflows), and says why below.
        await asyncio.wait({running, stopped, relay}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        stop.set()  # the relay ends after its pass in progress
        try:
            if not running.done():
                # Stops polling at once and lets running activities finish within the grace period.
                log.info("shutting down: finishing running activities")
                await worker.shutdown()
            await running
        finally:
            # Awaited, not cancelled: a pass cut off mid-query breaks its database connection,
            # and the engine is disposed right after this.
            try:
                await asyncio.wait_for(relay, RELAY_STOP_SECONDS)
            except TimeoutError:
                log.warning("outbox relay still busy after %ss; cancelled", RELAY_STOP_SECONDS)
        log.info("worker stopped")


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    if settings.WORKER_NICENESS:
        os.nice(settings.WORKER_NICENESS)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
