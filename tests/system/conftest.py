"""The system suite's set-up: one PostgreSQL database (created on the machine's server, dropped
afterwards), one Temporal dev server on a database file, the SMTP sink and the warehouse
receiver, all for the session; per scenario, a fresh task queue with two worker processes and
two API processes, each on links of its own to PostgreSQL and Temporal.

The session says what it ran for the report (tests/system/report.py): its date and commit, each
scenario's outcome, or that it was skipped. It is skipped only when nothing listens at the
PostgreSQL server's address; any other failure to reach it (a refused login, a missing database)
fails the suite, and with CI set even that skip fails the run (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from core.db import create_engine, create_sessionmaker
from core.settings import Settings
from tests.conftest import _admin_sql, _migrate, free_port
from tests.system.checks import Fault, Figures, check_orders, wait_until_settled
from tests.system.load import Client as ShopClient
from tests.system.processes import Process, Service, TemporalServer, api_command, worker_command
from tests.system.report import FAILED, PASSED, RESULTS, Run
from tests.system.sinks import Sinks, running_sinks
from tests.tcp_proxy import TcpProxy
from tests.worker_processes import worker_environment

# How the test's call phase ended, for the scenarios it opened.
CALL_FAILED = pytest.StashKey[bool]()
SERVER_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
# What every scenario's processes run with unless it says otherwise: failed attempts are retried
# within seconds and the relay looks often, so a scenario drains in its time slot. (A scenario
# that kills attempts shortens STEP_ATTEMPT_TIMEOUT_SECONDS, so the dead ones are retried soon.)
KILLED_ATTEMPTS_ENV: dict[str, object] = {"STEP_ATTEMPT_TIMEOUT_SECONDS": 5}
SUITE_ENV: dict[str, object] = {
    "RETRY_MAX_ATTEMPTS": 10,
    "RETRY_INITIAL_INTERVAL_SECONDS": 0.5,
    "RETRY_MAX_INTERVAL_SECONDS": 2,
    "OUTBOX_GRACE_SECONDS": 1,
    "OUTBOX_SWEEP_INTERVAL_SECONDS": 0.5,
    "IDEMPOTENCY_LEASE_SECONDS": 10,
    # Six connections (plus six on demand) per process instead of ten plus ten: four processes
    # at the shipped pools could take 80 of PostgreSQL's default 100, which the machine shares.
    "DATABASE_POOL_SIZE": 6,
    "DATABASE_MAX_OVERFLOW": 6,
    "WORKER_GRACEFUL_SHUTDOWN_SECONDS": 2,
}


def size(name: str, default: float) -> float:
    """A scenario size, overridable from the environment (SYSTEM_<NAME>)."""
    return float(os.environ.get(f"SYSTEM_{name}", default))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.system)
            item.add_marker(pytest.mark.ci_must_run)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@dataclass
class System:
    """What the scenarios share: the database, the Temporal server, the downstreams."""

    database_url: str
    sessions: async_sessionmaker[AsyncSession]
    temporal: TemporalServer
    client: Client
    sinks: Sinks
    logs: Path
    run: Run
    # The scenarios the running test opened a stack for.
    opened: list[str] = field(default_factory=list)

    @asynccontextmanager
    async def stack(
        self, name: str, env: dict[str, object] | None = None, *, workers: int = 2, apis: int = 2
    ) -> AsyncIterator[Stack]:
        """A scenario's processes on a fresh task queue, with `env` over SUITE_ENV; all killed
        at the end."""
        env = env or {}
        self.opened.append(name)
        self.sinks.heal()
        stack = Stack(self, name, f"system-{name}-{uuid.uuid4().hex[:8]}", env)
        try:
            for number in range(workers):
                stack.workers.append(await stack.service(f"worker-{number}", env, http=False))
            for number in range(apis):
                stack.apis.append(await stack.service(f"api-{number}", env, http=True))
            for service in stack.workers + stack.apis:
                service.process.start()
            await asyncio.gather(*(s.ready() for s in stack.workers + stack.apis))
            stack.shop = ShopClient([api.url for api in stack.apis], prefix=stack.prefix)
            yield stack
        finally:
            if stack.shop is not None:
                await stack.shop.aclose()
            for service in stack.services:
                await service.process.kill()
                await service.database.aclose()
                await service.temporal.aclose()
            self.sinks.heal()


@dataclass
class Stack:
    system: System
    name: str
    task_queue: str
    env: dict[str, object]
    workers: list[Service] = field(default_factory=list)
    apis: list[Service] = field(default_factory=list)
    extra: list[Service] = field(default_factory=list)
    shop: ShopClient | None = None
    # The faults injected into the workers so far: the only cause a repeated effect may have.
    faults: list[Fault] = field(default_factory=list)
    _described: tuple[str, str] = ("", "")

    @property
    def prefix(self) -> str:
        return self.task_queue

    @property
    def services(self) -> list[Service]:
        return self.workers + self.apis + self.extra

    @property
    def client(self) -> ShopClient:
        assert self.shop is not None
        return self.shop

    def database_links(self) -> list[TcpProxy]:
        return [service.database for service in self.services]

    def temporal_links(self) -> list[TcpProxy]:
        return [service.temporal for service in self.services]

    async def service(self, name: str, env: dict[str, object], *, http: bool) -> Service:
        """A process (not started yet) with its links to PostgreSQL and Temporal open."""
        database = TcpProxy("127.0.0.1", self._database_port())
        temporal = TcpProxy("127.0.0.1", self.system.temporal.port)
        await database.start()
        await temporal.start()
        url = make_url(self.system.database_url).set(host="127.0.0.1", port=database.port)
        settings = Settings(
            DATABASE_URL=url.render_as_string(hide_password=False),
            TEMPORAL_ADDRESS=temporal.address,
            TEMPORAL_TASK_QUEUE=self.task_queue,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=self.system.sinks.smtp_port,
            WAREHOUSE_WEBHOOK_URL=self.system.sinks.warehouse_url,
        )
        port = free_port() if http else None
        environment = worker_environment(
            settings,
            **{**SUITE_ENV, "WORKER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}", **env},
        )
        log = self.system.logs / f"{self.name}-{name}.log"
        command = api_command(port) if port is not None else worker_command()
        return Service(Process(name, command, environment, log), database, temporal, port)

    async def add_api(self, name: str, **env: object) -> Service:
        """One more API process beside the scenario's two, with settings of its own."""
        api = await self.service(name, {**self.env, **env}, http=True)
        self.extra.append(api)
        api.process.start()
        await api.ready()
        return api

    def _database_port(self) -> int:
        port = make_url(self.system.database_url).port
        return int(port or 5432)

    async def cut(self, links: list[TcpProxy], seconds: float) -> None:
        """Cuts the links for `seconds` (a fault's duration, not a wait for a condition), and
        notes the fault against the workers whose links they are."""
        hit = frozenset(
            identity_of(worker)
            for worker in self.workers
            if worker.database in links or worker.temporal in links
        )
        start = time.time()
        await asyncio.gather(*(link.cut() for link in links))
        try:
            await asyncio.sleep(seconds)
        finally:
            for link in links:
                await link.restore()
            self.faults.append(Fault("cut", hit, start, time.time()))

    async def kill(self, worker: Service) -> None:
        """SIGKILLs the worker, notes the fault, and starts it again."""
        identity = identity_of(worker)
        killed = time.time()
        await worker.process.kill()
        self.faults.append(Fault("kill", frozenset({identity}), killed, killed))
        worker.process.start()
        await worker.ready()

    def every_worker_lost_temporal(self, start: float, end: float) -> None:
        """Notes the Temporal server's absence as a fault on every worker's link to it."""
        hit = frozenset(identity_of(worker) for worker in self.workers)
        self.faults.append(Fault("temporal down", hit, start, end))

    async def finish(
        self,
        *,
        injected: str,
        checked: str,
        drain_from: float | None = None,
        within: float = 180.0,
        extra: dict[str, Any] | None = None,
        accepted: dict[str, str] | None = None,
        allowed_5xx: frozenset[int] = frozenset(),
    ) -> Figures:
        """Waits until every order is settled, checks them all and records the figures.
        `accepted` adds orders the client never heard were accepted (its request died);
        `allowed_5xx` the server errors the scenario's fault explains (a 503 while the database
        is cut): any other the client saw fails the scenario, though it retried it."""
        accepted = {**self.client.accepted(), **(accepted or {})}
        started = drain_from if drain_from is not None else time.monotonic()
        check = partial(
            check_orders,
            sessions=self.system.sessions,
            temporal=self.system.client,
            sinks=self.system.sinks,
            task_queue=self.task_queue,
            prefix=self.prefix,
            accepted=accepted,
            faults=self.faults,
        )
        try:
            await wait_until_settled(self.system.sessions, self.prefix, len(accepted), within)
        except AssertionError as unsettled:
            # Say what is wrong with the orders that never settled, not only that they did not.
            try:
                await check()
            except AssertionError as problems:
                raise AssertionError(f"{unsettled}\n{problems}") from None
            raise
        drained = time.monotonic() - started
        server_errors = {
            status: seen
            for status, seen in self.client.statuses().items()
            if 500 <= status < 600 and status not in allowed_5xx
        }
        assert not server_errors, f"the API answered {server_errors} (retried by the client)"
        figures = await check()
        figures.drain_seconds = round(drained, 1)
        figures.answers = {str(k): v for k, v in sorted(self.client.statuses().items())}
        figures.extra = extra or {}
        if errors := self.client.transport_errors():
            figures.extra["no_answer_because"] = dict(errors)
        self._described = (injected, checked)
        self.record(figures)
        return figures

    def record(self, figures: Figures) -> None:
        """Writes the scenario's figures (again, once a scenario has added to them)."""
        record(self.name, *self._described, figures)


def identity_of(worker: Service) -> str:
    """The SDK's default worker identity, which Temporal records on every task it hands out and
    the ledger on every claim the worker takes."""
    return f"{worker.process.pid}@{socket.gethostname()}"


def record(name: str, injected: str, checked: str, figures: Figures) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"scenario": name, "injected": injected, "checked": checked, **asdict(figures)}
    payload["recorded_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")


async def _server_reachable(url: Any) -> bool:
    """False only when nothing listens at the server's address (the connection is refused): the
    machine has no PostgreSQL. Anything else (a refused login, a missing database, no answer in
    time) is raised, so the suite fails instead of passing for skipped."""
    try:
        await asyncio.wait_for(_admin_sql(url, "SELECT 1"), 10)
    except ConnectionRefusedError:
        return False
    return True


@pytest.fixture(scope="session")
async def system() -> AsyncIterator[System]:
    server = make_url(os.environ.get("TEST_DATABASE_URL") or SERVER_URL)
    # The report renders this run alone: no figure of an earlier run stays behind, run or not.
    shutil.rmtree(RESULTS, ignore_errors=True)
    run = Run.begin()
    try:
        reachable = await _server_reachable(server)
    except Exception as failure:
        run.setup_failed = f"PostgreSQL at {server.host}:{server.port}: {type(failure).__name__}"
        run.save()
        raise
    if not reachable:
        run.skipped = f"nothing listens at {server.host}:{server.port} for PostgreSQL"
        run.save()
        pytest.skip(f"system suite skipped: {run.skipped}")
    run.save()
    name = f"orderflow_system_{uuid.uuid4().hex[:12]}"
    await _admin_sql(server, f'CREATE DATABASE "{name}"')
    url = server.set(database=name).render_as_string(hide_password=False)
    logs = RESULTS / "logs"
    logs.mkdir(parents=True)
    temporal = TemporalServer(logs / "temporal.db", logs / "temporal.log")
    engine = create_engine(Settings(DATABASE_URL=url))
    try:
        await asyncio.to_thread(_migrate, url)
        client = await temporal.start()
        async with running_sinks() as sinks:
            yield System(url, create_sessionmaker(engine), temporal, client, sinks, logs, run)
    finally:
        await engine.dispose()
        await temporal.process.kill()
        await _admin_sql(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        print(f"\nsystem suite logs: {logs}")


@pytest.fixture(autouse=True)
def _scenario_outcomes(request: pytest.FixtureRequest, system: System) -> Iterator[None]:
    """Records how each scenario the test opened ended, for the report."""
    system.opened.clear()
    yield
    failed = request.node.stash.get(CALL_FAILED, True)
    for name in system.opened:
        system.run.outcomes[name] = FAILED if failed else PASSED
    system.run.save()
