"""`make run` beside servers of your own, as a new user runs it: the real make target (or
scripts/run-dev.sh as make calls it) in a subprocess, every port it binds moved to a free one
and its state in a directory of the test's own."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from core.settings import Settings
from devsinks.plan import WORKER_READY_LINE, Port
from devsinks.smtp import MailSink
from devsinks.stack import is_free
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import (
    ROOT,
    WEBHOOK_SECRET,
    SmtpSinkServer,
    WarehouseServer,
    free_port,
)
from tests.support import order_body, place_order, unique_email, wait_for_order_status, wait_until

STACK_PORTS = (
    "TEMPORAL_DEV_PORT",
    "TEMPORAL_UI_PORT",
    "API_PORT",
    "SINKS_HTTP_PORT",
    "SINKS_SMTP_PORT",
)
# Generous: a cold start of Temporal, the worker and the API on a busy 2-core machine.
START_SECONDS = 120.0


def free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def stack_env(data_dir: Path, **values: str) -> dict[str, str]:
    """This environment without anything that would name a server or move a port (a variable
    of the outer make, a setting, a Temporal profile), plus the test's own values."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if name not in Settings.model_fields
        and not name.startswith(("TEMPORAL_", "SINKS_", "MAKE", "MFLAGS"))
        and name not in {*STACK_PORTS, "ORDERFLOW_DATA_DIR", "DATABASE_URL"}
    }
    *ports, metrics = map(str, free_ports(len(STACK_PORTS) + 1))
    return {
        **inherited,
        **dict(zip(STACK_PORTS, ports, strict=True)),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "WORKER_METRICS_ADDRESS": f"127.0.0.1:{metrics}",
        # One worker, whatever the machine's cores would choose: the tests name its process.
        "WORKER_PROCESSES": "1",
        # The marker every process of this stack inherits; see stack_processes.
        "ORDERFLOW_DATA_DIR": str(data_dir),
        # No profile of the developer's may name a Temporal server.
        "TEMPORAL_CONFIG_FILE": str(data_dir.parent / "no-temporal-profile.toml"),
        "WEBHOOK_SIGNING_SECRET": WEBHOOK_SECRET,
        **values,
    }


def free_port_run(count: int) -> int:
    """The first of `count` consecutive ports free on loopback (worker i serves metrics on the
    first + i - 1)."""
    while True:
        first = free_port()
        if first + count <= 65536 and all(
            is_free(Port("probe", port, "")) for port in range(first, first + count)
        ):
            return first


def stack_processes(data_dir: Path) -> list[tuple[int, str]]:
    """Every live process started for this stack, wherever it was reparented: all of them
    inherited ORDERFLOW_DATA_DIR=<this test's directory>."""
    marker = f"ORDERFLOW_DATA_DIR={data_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(proc.name), command))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


class Stack:
    """`make run` in a subprocess: its output as it comes, and a way to stop it."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output = ""
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := await self.process.stdout.read(4096):
            self.output += chunk.decode(errors="replace")

    async def wait_for(self, text: str, within: float = START_SECONDS) -> None:
        def seen() -> bool:
            assert self.process.returncode is None or text in self.output, self.output
            return text in self.output

        await wait_until(seen, within=within, message=f"{text!r} in the output")

    async def exited(self, within: float) -> int:
        async with asyncio.timeout(within):
            code = await self.process.wait()
            await self._reader
        return code


@asynccontextmanager
async def running(argv: list[str], env: dict[str, str]) -> AsyncIterator[Stack]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # Its own process group, as a shell gives a foreground job: Ctrl-C is a SIGINT to it.
        start_new_session=True,
    )
    stack = Stack(process)
    try:
        yield stack
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


@contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    """A port the test holds, as another program on the machine would."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        yield holder


async def no_stack_processes_left(data_dir: Path) -> None:
    await wait_until(
        lambda: not stack_processes(data_dir),
        within=10,
        message=f"every process of the stack gone; left: {stack_processes(data_dir)}",
    )


@pytest.mark.slow
async def test_make_run_sends_to_your_smtp_server_and_warehouse_and_starts_no_sinks(
    tmp_path: Path,
    smtp_server: SmtpSinkServer,
    mail: MailSink,
    warehouse_server: WarehouseServer,
    warehouse: WarehouseReceiver,
) -> None:
    data = tmp_path / "data"
    env = stack_env(
        data,
        SMTP_HOST=smtp_server.host,
        SMTP_PORT=str(smtp_server.port),
        WAREHOUSE_WEBHOOK_URL=warehouse_server.url,
    )
    async with running(["make", "--no-print-directory", "run"], env) as stack:
        await stack.wait_for("orderflow is running")
        assert f"using your SMTP server at 127.0.0.1:{smtp_server.port}" in stack.output
        assert f"using your warehouse at {warehouse_server.url}" in stack.output
        assert "starting Temporal dev server, worker, API" in stack.output
        assert re.search(rf"Mail +yours at 127\.0\.0\.1:{smtp_server.port} ", stack.output)
        assert re.search(rf"Warehouse +yours at {re.escape(warehouse_server.url)} ", stack.output)
        assert not (data / "logs" / "sinks.log").exists()
        with listening(int(env["SINKS_HTTP_PORT"])), listening(int(env["SINKS_SMTP_PORT"])):
            pass  # free: no sink took them
        assert stack_processes(data), "the marker finds the stack's processes"

        email = unique_email()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['API_PORT']}") as api:
            order_id = await place_order(api, order_body(email))
            await wait_for_order_status(api, order_id, "completed")
        assert [m.message_id for m in mail.to(email)] == [
            f"<{order_id}.send_receipt@orderflow.localhost>"
        ]
        accepted = [d for d in warehouse.deliveries_for(order_id) if d.answered == 202]
        assert len(accepted) == 1 and accepted[0].signature_valid
        assert (data / "orderflow.db").exists() and (data / "temporal.db").exists()

        os.killpg(stack.process.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        await stack.exited(within=90)
        assert "orderflow: stopping API, worker, Temporal dev server" in stack.output
        assert "orderflow: stopped" in stack.output
        await no_stack_processes_left(data)


async def test_make_run_refuses_a_taken_port_by_service_and_variable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = stack_env(data)
    api_port, smtp_port = int(env["API_PORT"]), int(env["SINKS_SMTP_PORT"])
    with listening(api_port), listening(smtp_port):
        async with running(["bash", "scripts/run-dev.sh"], env) as stack:
            code = await stack.exited(within=30)
    assert code == 2, stack.output
    assert "nothing was started" in stack.output
    assert f"API wants 127.0.0.1:{api_port}, which is taken: set API_PORT=" in stack.output
    assert (
        f"SMTP sink wants 127.0.0.1:{smtp_port}, which is taken: set SINKS_SMTP_PORT="
        in stack.output
    )
    assert f"or SMTP_PORT={smtp_port} to send receipts to the mail server there" in stack.output
    assert "is running" not in stack.output
    assert not (data / "logs").exists()
    await no_stack_processes_left(data)


@pytest.mark.slow
async def test_make_run_on_your_temporal_names_the_process_that_died(
    tmp_path: Path, env: WorkflowEnvironment, own_database: str
) -> None:
    # A database of its own: the stack's worker sweeps every unstarted outbox row it finds onto
    # its queue, so in the session's database it would send other tests' receipts to its sink.
    data = tmp_path / "data"
    temporal = env.client.service_client.config.target_host
    stack_environment = stack_env(
        data,
        TEMPORAL_ADDRESS=temporal,
        TEMPORAL_TASK_QUEUE=f"orders-{os.urandom(6).hex()}",
        DATABASE_URL=own_database,
    )
    sinks = f"http://127.0.0.1:{stack_environment['SINKS_HTTP_PORT']}"
    async with running(["bash", "scripts/run-dev.sh"], stack_environment) as stack:
        await stack.wait_for("orderflow is running")
        assert f"using your Temporal at {temporal} (TEMPORAL_ADDRESS)" in stack.output
        assert "starting SMTP sink and warehouse receiver, worker, API" in stack.output
        assert not (data / "temporal.db").exists()

        email = unique_email()
        api_url = f"http://127.0.0.1:{stack_environment['API_PORT']}"
        async with httpx.AsyncClient(base_url=api_url) as api, httpx.AsyncClient() as http:
            order_id = await place_order(api, order_body(email))
            await wait_for_order_status(api, order_id, "completed")
            received = (await http.get(f"{sinks}/mail")).json()
            assert [m["to"] for m in received] == [[email]]
            deliveries = (await http.get(f"{sinks}/webhooks/deliveries")).json()
            assert [(d["body"]["order_id"], d["answered"]) for d in deliveries] == [(order_id, 202)]

        [(worker, _)] = [p for p in stack_processes(data) if p[1].endswith("worker.py ")]
        os.kill(worker, signal.SIGKILL)
        code = await stack.exited(within=60)
        assert code == 1, stack.output
        log = data / "logs" / "worker.log"
        assert (
            f"the worker (pid {worker}) stopped: killed by SIGKILL. Its log is {log}"
            in stack.output
        )
        assert "worker polling task queue" in stack.output  # the log's last lines, shown
        assert "orderflow: stopping API, SMTP sink and warehouse receiver" in stack.output
        await no_stack_processes_left(data)


@pytest.mark.slow
async def test_make_run_starts_worker_processes_each_polling_with_its_log_and_metrics(
    tmp_path: Path, own_database: str
) -> None:
    data = tmp_path / "data"
    metrics = free_port_run(2)
    env = stack_env(
        data,
        WORKER_PROCESSES="2",
        WORKER_METRICS_ADDRESS=f"127.0.0.1:{metrics}",
        DATABASE_URL=own_database,
    )
    async with running(["bash", "scripts/run-dev.sh"], env) as stack:
        await stack.wait_for("orderflow is running")
        assert "worker 1, worker 2, API (data in" in stack.output
        assert re.search(
            r"Workers +2 processes \(WORKER_PROCESSES\), logs worker-1\.log, worker-2\.log",
            stack.output,
        )
        workers = [pid for pid, command in stack_processes(data) if command.endswith("worker.py ")]
        assert len(workers) == 2
        async with httpx.AsyncClient() as http:
            for number, port in ((1, metrics), (2, metrics + 1)):
                # Each was ready only once it logged that it polls (the stack waits for it).
                assert WORKER_READY_LINE in (data / "logs" / f"worker-{number}.log").read_text()
                served = await http.get(f"http://127.0.0.1:{port}/metrics")
                assert served.status_code == 200, port

        os.killpg(stack.process.pid, signal.SIGINT)
        assert await stack.exited(within=90) == 0, stack.output
        assert "orderflow: stopping API, worker 2, worker 1, " in stack.output
        await no_stack_processes_left(data)
