"""The HTTP API: builds its long-lived resources in the lifespan and mounts the routers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI

from api.admin import actions as admin_actions
from api.admin import pages as admin_pages
from api.admin.redrives import PageRedrives
from api.admin.views import STATIC_MOUNT, static_files
from api.deps import check_api_keys
from api.dispatcher import WorkflowDispatcher
from api.errors import TemporalOutageWatch, install_error_answers, outage_logs
from api.intake import OrderIntake
from api.limits import install_limits
from api.metrics import install_metrics
from api.routes import dead_letters, health, orders
from core.db import create_engine, create_sessionmaker
from core.logging import configure_logging
from core.metrics import WorkflowStartMetrics
from core.outages import DATABASE, TEMPORAL, watch_database
from core.payments import SandboxGateway
from core.policy import step_policy
from core.settings import Settings, get_settings
from core.temporal import connect_temporal
from core.tracing import Tracing, tracing_from_environment

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, tracing: Tracing | None = None) -> FastAPI:
    app_settings = settings or get_settings()
    configure_logging(app_settings)
    # Off unless OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT say where spans go.
    app_tracing = tracing or tracing_from_environment("orderflow-api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_api_keys(app_settings, log)
        engine = create_engine(app_settings)
        watch_database(engine, outage_logs(app)[DATABASE])
        sessions = create_sessionmaker(engine)
        # Lazy: the API serves (and keeps taking orders into the outbox) while Temporal is down.
        temporal = await connect_temporal(
            app_settings,
            lazy=True,
            interceptors=[
                *app_tracing.interceptors(),
                WorkflowStartMetrics(),
                TemporalOutageWatch(outage_logs(app)[TEMPORAL]),
            ],
        )
        dispatcher = WorkflowDispatcher(
            sessions,
            temporal,
            app_settings.TEMPORAL_TASK_QUEUE,
            mode=app_settings.WORKFLOW_START_MODE,
            timeout=timedelta(seconds=app_settings.WORKFLOW_START_TIMEOUT_SECONDS),
            policy=step_policy(app_settings),
        )
        app.state.settings = app_settings
        app.state.sessions = sessions
        app.state.temporal = temporal
        app.state.dispatcher = dispatcher
        app.state.redrives = PageRedrives(temporal, app_settings.TEMPORAL_TASK_QUEUE)
        app.state.intake = OrderIntake(
            sessions,
            SandboxGateway(sessions),
            lease=timedelta(seconds=app_settings.IDEMPOTENCY_LEASE_SECONDS),
            key_ttl=timedelta(seconds=app_settings.IDEMPOTENCY_KEY_TTL_SECONDS),
        )
        try:
            yield
        finally:
            await dispatcher.aclose()
            await engine.dispose()
            app_tracing.flush()

    app = FastAPI(
        title="orderflow",
        summary="Accepts orders in milliseconds and finishes their follow-ups on Temporal.",
        lifespan=lifespan,
    )
    install_limits(app)
    install_error_answers(app)
    install_metrics(app)
    app_tracing.instrument_app(app)
    app.include_router(orders.router)
    app.include_router(dead_letters.router)
    app.include_router(health.router)
    app.include_router(admin_pages.router)
    app.include_router(admin_actions.router)
    app.mount(STATIC_MOUNT, static_files(), name="admin-static")
    return app


app = create_app()
