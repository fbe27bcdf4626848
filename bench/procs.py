"""The processes a bench run starts (Temporal dev server, sinks, workers, APIs, Redis, Celery),
each on a free loopback port, and the CPU and memory they spend, read with psutil."""

from __future__ import annotations

import compileall
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Ports other people's stacks use on this machine; a bench never binds them.
RESERVED_PORTS = frozenset({1025, 6379, 7233, 8000, 8025, 8233})


def free_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port


def wait_port(
    port: int, *, within: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {within}s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User plus system CPU of the process and its live children (Celery's pool)."""
        total = 0.0
        for process in self.tree():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                continue
        return total

    def rss_mib(self) -> float:
        total = 0
        for process in self.tree():
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total / 2**20

    def stop(self, grace: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            for process in reversed(self.tree()):
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    continue
            self.popen.wait(5)


@dataclass
class Stack:
    """Owns every process of a run; `close` stops them in reverse order of start."""

    workdir: Path
    base_env: Mapping[str, str]
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        within: float = 60.0,
    ) -> Proc:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**self.base_env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        if port is not None:
            try:
                wait_port(port, within=within, proc=popen)
            except Exception:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not start; log tail:\n{tail}") from None
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as failure:  # keep stopping the rest
                print(f"could not stop {proc.name}: {failure}", file=sys.stderr)
        self.procs.clear()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def tool(name: str) -> str:
    """A binary installed beside this interpreter (temporal, celery), never downloaded."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError(f"{name} is not in {BIN}; `make bench` installs it")


# The project's packages, compiled once before a run: a deployed worker imports them from a
# wheel's bytecode, and the workflow sandbox imports the workflow module afresh for every run, so
# without bytecode (PYTHONDONTWRITEBYTECODE is common in containers and CI) each workflow would
# pay a compile of its module.
PROJECT_SOURCES = ("api", "activities", "bench", "core", "devsinks", "workflows", "worker.py")


def compile_project() -> None:
    for name in PROJECT_SOURCES:
        path = ROOT / name
        if path.is_dir():
            compileall.compile_dir(path, quiet=1)
        else:
            compileall.compile_file(path, quiet=1)


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONPATH", str(ROOT))
    return env
