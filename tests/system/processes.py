"""The real processes of the system suite: a Temporal dev server on a database file (killable
and restartable on the same file), and worker and API processes each reaching PostgreSQL and
Temporal through a link of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from temporalio.client import Client

from core.contracts import ORDER_STATUS_ATTRIBUTE
from tests.conftest import ROOT, free_port, installed_binary
from tests.support import wait_until
from tests.tcp_proxy import TcpProxy

STARTUP_SECONDS = 90.0


@dataclass
class Process:
    """One OS process of the system under test, restartable with the same command and log."""

    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        with self.log.open("ab") as sink:
            sink.write(f"\n===== start {self.starts} of {self.name}\n".encode())
            sink.flush()
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def output_of_this_start(self) -> str:
        return self.output().rpartition(f"===== start {self.starts} of {self.name}\n")[2]

    async def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        process = self.process
        await wait_until(lambda: process.poll() is not None, within=30, message=f"{self.name} dies")

    async def stop(self) -> None:
        """SIGTERM (a clean stop), SIGKILL if it takes too long."""
        if not self.running:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        process = self.process
        try:
            await wait_until(lambda: process.poll() is not None, within=20, message="stop")
        except AssertionError:
            await self.kill()


@dataclass
class TemporalServer:
    """`temporal server start-dev` on a database file: SIGKILL it, start it again on the same
    file and port, and every workflow is still there."""

    db_file: Path
    log: Path
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        command = [
            installed_binary("temporal"),
            "server",
            "start-dev",
            "--db-filename",
            str(self.db_file),
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--headless",
            "--log-level",
            "error",
            "--search-attribute",
            f"{ORDER_STATUS_ATTRIBUTE.name}=Keyword",
        ]
        self.process = Process("temporal", command, dict(os.environ), self.log)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Client:
        self.process.start()
        return await self.connected()

    async def connected(self) -> Client:
        async def connect() -> Client | None:
            assert self.process.running, self.process.output()[-3000:]
            try:
                client = await Client.connect(self.address)
                await client.count_workflows()
            except Exception:
                return None
            return client

        client: Client = await wait_until(
            connect, within=STARTUP_SECONDS, interval=0.2, message="Temporal dev server serving"
        )
        return client


@dataclass
class Service:
    """A worker or an API process, with its own links to PostgreSQL and to Temporal."""

    process: Process
    database: TcpProxy
    temporal: TcpProxy
    http_port: int | None = None

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def url(self) -> str:
        assert self.http_port is not None
        return f"http://127.0.0.1:{self.http_port}"

    async def ready(self, *, probe: str = "/healthz") -> None:
        """Waits until the process serves: a worker polls its task queue; an API answers 200
        on `probe` (`/readyz` also needs its database and Temporal reachable)."""
        if self.http_port is None:
            # The worker logs this line once it polls the task queue.
            def polling() -> bool:
                assert self.process.running, self.process.output()[-3000:]
                return "worker polling task queue" in self.process.output_of_this_start()

            await wait_until(
                polling, within=STARTUP_SECONDS, interval=0.1, message=f"{self.name} polling"
            )
            return

        async def serving() -> bool:
            assert self.process.running, self.process.output()[-3000:]
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"{self.url}{probe}")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(
            serving, within=STARTUP_SECONDS, interval=0.1, message=f"{self.name} {probe} 200"
        )

    async def restart(self) -> None:
        await self.process.kill()
        self.process.start()
        await self.ready()


def worker_command() -> list[str]:
    return [sys.executable, "worker.py"]


def api_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "api.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
