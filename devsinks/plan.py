"""What `make run` starts, read from the environment: a stand-in for every server you have not
named (the Temporal dev server, the SMTP sink, the warehouse receiver) plus WORKER_PROCESSES
workers and the API, the ports each binds and the variable that moves each, and the servers of
yours it uses.

Naming a server is how you say it is yours: TEMPORAL_ADDRESS (or a Temporal profile that has an
address), SMTP_HOST / SMTP_PORT, WAREHOUSE_WEBHOOK_URL. Anything not named gets its stand-in."""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError, create_model
from sqlalchemy import make_url
from temporalio.envconfig import ClientConfig

from core.settings import Settings

LOOPBACK = "127.0.0.1"
API_PORT_DEFAULT = 8000
# The line worker.py logs once it is connected and polling: the stack waits for it.
WORKER_READY_LINE = "worker polling task queue"


class PlanError(Exception):
    """A setting the stack cannot use; the message says which and why."""


def _default(name: str) -> str:
    return str(Settings.model_fields[name].get_default(call_default_factory=True))


def _setting(env: Mapping[str, str], name: str) -> Any:
    """The setting as the services will read it, with its type and bounds from Settings: a value
    they would refuse at start is refused here, before anything starts."""
    if name not in env:
        return Settings.model_fields[name].get_default(call_default_factory=True)
    known = Settings.model_fields[name]
    definition: Any = (known.annotation, known)
    alone = create_model(f"Setting{name}", **{name: definition})
    try:
        return getattr(alone.model_validate({name: env[name]}), name)
    except ValidationError as bad:
        reason = bad.errors()[0]["msg"]
        raise PlanError(f"{name}={env[name]!r}: {reason}") from None


def _url_port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


@dataclass(frozen=True)
class Port:
    """A port the stack binds, who binds it and how to move it."""

    service: str
    port: int
    variable: str
    # Another way out when it is taken, e.g. using the server that holds it.
    instead: str = ""
    # An optional port: when it is taken the service starts without it.
    optional: bool = False
    host: str = LOOPBACK

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Service:
    name: str  # also its log: <data>/logs/<name>.log
    title: str
    argv: list[str]
    ports: list[Port]
    # Its own values over the plan's environment (each worker's metrics address).
    env: dict[str, str] = field(default_factory=dict)
    # How long it may take to be ready, and to stop after SIGTERM before it is killed.
    start_seconds: float = 60.0
    stop_seconds: float = 15.0
    ready_url: str | None = None  # answers 200 once the service is ready
    ready_line: str | None = None  # appears in its log once it is ready


@dataclass
class Plan:
    data_dir: Path
    env: dict[str, str]
    services: list[Service]
    # The servers of yours the stack uses instead of a stand-in: (what, where, variable).
    yours: list[tuple[str, str, str]] = field(default_factory=list)
    # Printed once everything is up: (label, where).
    summary: list[tuple[str, str]] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def log_of(self, service: Service) -> Path:
        return self.log_dir / f"{service.name}.log"

    @property
    def ports(self) -> list[Port]:
        return [port for service in self.services for port in service.ports]


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise PlanError(f"{name}={raw!r} is not a port number (1-65535)")
    return int(raw)


def _host_port(value: str, name: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise PlanError(f"{name}={value!r} is not host:port")
    return host.strip("[]"), int(port)


def plan(
    env: Mapping[str, str], python: str = sys.executable, *, gave_way: Collection[Port] = ()
) -> Plan:
    """The stack for this environment. Its `env` is what the children get: this environment
    plus the address of each stand-in, so the workers and the API talk to what was started.
    `gave_way` are optional ports found taken: their services start without them."""
    data_dir = Path(env.get("ORDERFLOW_DATA_DIR") or ".data")
    stack = Plan(
        data_dir, {**env, "SINKS_DATA_DIR": env.get("SINKS_DATA_DIR") or str(data_dir)}, []
    )
    api_port = _port(env, "API_PORT", API_PORT_DEFAULT)
    api = f"http://{LOOPBACK}:{api_port}"
    database = make_url(env.get("DATABASE_URL") or _default("DATABASE_URL"))
    stack.summary += [
        ("API docs", f"{api}/docs"),
        ("Review page", f"{api}/admin"),
        ("Database", database.render_as_string(hide_password=True)),
    ]
    _temporal(stack, env)
    _sinks(stack, env, python)
    _workers(stack, env, python, gave_way)
    argv = [python, "-m", "uvicorn", "api.main:app", "--log-level", "warning"]
    argv += ["--host", LOOPBACK, "--port", str(api_port)]
    ports = [Port("API", api_port, "API_PORT")]
    stack.services.append(Service("api", "API", argv, ports, ready_url=f"{api}/readyz"))
    return stack


def _temporal(stack: Plan, env: Mapping[str, str]) -> None:
    yours = ClientConfig.load_client_connect_config(override_env_vars=env).get("target_host")
    if yours:
        ui = env.get("TEMPORAL_UI_URL") or _default("TEMPORAL_UI_URL")
        stack.yours.append(("Temporal", yours, "TEMPORAL_ADDRESS"))
        stack.summary.append(("Temporal", f"yours at {yours} (TEMPORAL_ADDRESS), UI {ui}"))
        return
    grpc = _port(env, "TEMPORAL_DEV_PORT", _host_port(_default("TEMPORAL_ADDRESS"), "")[1])
    ui_port = _port(env, "TEMPORAL_UI_PORT", _url_port(_default("TEMPORAL_UI_URL")))
    address = f"{LOOPBACK}:{grpc}"
    stack.env["TEMPORAL_ADDRESS"] = address
    ui = stack.env.setdefault("TEMPORAL_UI_URL", f"http://{LOOPBACK}:{ui_port}")
    database = stack.data_dir / "temporal.db"
    argv = ["temporal", "server", "start-dev", "--db-filename", str(database)]
    argv += f"--ip {LOOPBACK} --port {grpc} --ui-ip {LOOPBACK} --ui-port {ui_port}".split()
    argv += ["--search-attribute", "OrderStatus=Keyword", "--log-level", "warn"]
    argv += ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]
    # Below the API, as the worker is (WORKER_NICENESS): on one machine the dev server's work
    # is the backlog's, and a customer's request comes first.
    niceness = int(env.get("WORKER_NICENESS") or _default("WORKER_NICENESS"))
    if niceness:
        argv = ["nice", "-n", str(niceness), *argv]
    there = f"TEMPORAL_ADDRESS={address} to use the Temporal server there"
    ports = [
        Port("Temporal dev server", grpc, "TEMPORAL_DEV_PORT", instead=there),
        Port("Temporal Web UI", ui_port, "TEMPORAL_UI_PORT"),
    ]
    stack.services.append(Service("temporal", "Temporal dev server", argv, ports, stop_seconds=20))
    namespace = env.get("TEMPORAL_NAMESPACE") or _default("TEMPORAL_NAMESPACE")
    stack.summary.append(
        (
            "Temporal",
            f"dev server {address} (state in {database}), UI {ui}/namespaces/{namespace}/workflows",
        )
    )


def _sinks(stack: Plan, env: Mapping[str, str], python: str) -> None:
    """The SMTP sink unless SMTP_HOST or SMTP_PORT name a server, the warehouse receiver unless
    WAREHOUSE_WEBHOOK_URL does; one process serves whichever of the two is needed."""
    sinks = f"http://{LOOPBACK}:{_port(env, 'SINKS_HTTP_PORT', _url_port(_default('SINKS_URL')))}"
    args: list[str] = []
    ports: list[Port] = []
    if "SMTP_HOST" in env or "SMTP_PORT" in env:
        where = f"{env.get('SMTP_HOST') or _default('SMTP_HOST')}:"
        where += str(_port(env, "SMTP_PORT", int(_default("SMTP_PORT"))))
        stack.yours.append(("SMTP server", where, "SMTP_HOST/SMTP_PORT"))
        stack.summary.append(("Mail", f"yours at {where} (SMTP_HOST/SMTP_PORT)"))
        args.append("--no-smtp")
    else:
        port = _port(env, "SINKS_SMTP_PORT", int(_default("SMTP_PORT")))
        stack.env.update(SMTP_HOST=LOOPBACK, SMTP_PORT=str(port))
        there = f"SMTP_PORT={port} to send receipts to the mail server there"
        ports.append(Port("SMTP sink", port, "SINKS_SMTP_PORT", instead=there))
        maildir = Path(stack.env["SINKS_DATA_DIR"]) / "mail"
        stack.summary.append(("Mail", f"sink {LOOPBACK}:{port}: {maildir}/*.eml, {sinks}/mail"))
    if "WAREHOUSE_WEBHOOK_URL" in env:
        where = env["WAREHOUSE_WEBHOOK_URL"]
        stack.yours.append(("warehouse", where, "WAREHOUSE_WEBHOOK_URL"))
        stack.summary.append(("Warehouse", f"yours at {where} (WAREHOUSE_WEBHOOK_URL)"))
        args.append("--no-warehouse")
    else:
        url = f"{sinks}{urlsplit(_default('WAREHOUSE_WEBHOOK_URL')).path}"
        stack.env["WAREHOUSE_WEBHOOK_URL"] = url
        journal = Path(stack.env["SINKS_DATA_DIR"]) / "warehouse.jsonl"
        stack.summary.append(
            ("Warehouse", f"receiver {url}: {journal}, {sinks}/webhooks/deliveries")
        )
    if len(args) == 2:
        return
    port = _url_port(sinks)
    stack.env["SINKS_HTTP_PORT"] = str(port)
    stack.env.setdefault("SINKS_URL", sinks)
    ports.append(Port("dev sinks' HTTP side", port, "SINKS_HTTP_PORT"))
    title = {"--no-smtp": "warehouse receiver", "--no-warehouse": "SMTP sink"}.get(
        "".join(args), "SMTP sink and warehouse receiver"
    )
    stack.services.append(Service("sinks", title, [python, "-m", "devsinks", *args], ports))
    faults = ".venv/bin/orderflow sinks fault|heal ..."
    if stack.env["SINKS_URL"] != _default("SINKS_URL"):
        faults = f"SINKS_URL={stack.env['SINKS_URL']} {faults}"
    stack.summary.append(("Sink faults", faults))


def _workers(stack: Plan, env: Mapping[str, str], python: str, gave_way: Collection[Port]) -> None:
    """WORKER_PROCESSES workers: `worker` alone, or `worker-1`..`worker-N` (their logs too), the
    metrics of worker i on the port of WORKER_METRICS_ADDRESS + i - 1, since two processes
    cannot serve one."""
    count: int = _setting(env, "WORKER_PROCESSES")
    metrics = env.get("WORKER_METRICS_ADDRESS", _default("WORKER_METRICS_ADDRESS"))
    host, base = _host_port(metrics, "WORKER_METRICS_ADDRESS") if metrics else ("", 0)
    if metrics and base + count - 1 > 65535:
        raise PlanError(
            f"WORKER_METRICS_ADDRESS={metrics!r} leaves no port for each of the "
            f"WORKER_PROCESSES={count} workers: the last would be {base + count - 1}"
        )
    try:
        graceful = float(
            env.get("WORKER_GRACEFUL_SHUTDOWN_SECONDS")
            or _default("WORKER_GRACEFUL_SHUTDOWN_SECONDS")
        )
    except ValueError as bad:
        raise PlanError(f"WORKER_GRACEFUL_SHUTDOWN_SECONDS: {bad}") from None
    served: list[str] = []
    for number in range(1, count + 1):
        name, title = (
            ("worker", "worker") if count == 1 else (f"worker-{number}", f"worker {number}")
        )
        ports: list[Port] = []
        address = ""
        if metrics:
            off = "WORKER_METRICS_ADDRESS= (empty) to turn them off"
            # Only the default gives way when taken; an address you set is one you want.
            optional = "WORKER_METRICS_ADDRESS" not in env
            port = Port(
                f"{title} metrics", base + number - 1, "WORKER_METRICS_ADDRESS", off, optional, host
            )
            if port not in gave_way:
                ports.append(port)
                address = port.address
                served.append(f"http://{address}/metrics")
        stack.services.append(
            Service(
                name,
                title,
                [python, "worker.py"],
                ports,
                env={"WORKER_METRICS_ADDRESS": address},
                ready_line=WORKER_READY_LINE,
                # Running activities get their grace period, the outbox sweep in progress its own.
                stop_seconds=graceful + 20,
            )
        )
    processes = "1 process" if count == 1 else f"{count} processes"
    logs = ", ".join(stack.log_of(service).name for service in stack.services[-count:])
    stack.summary.append(("Workers", f"{processes} (WORKER_PROCESSES), logs {logs}"))
    if served:
        stack.summary.append(("Worker metrics", ", ".join(served)))
