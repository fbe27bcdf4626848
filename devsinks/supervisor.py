"""Runs the processes of a planned stack in order, each once the one before is ready; says which
one stopped, with its exit status, its log and the log's last lines, if one does; and stops
them all, last started first, on Ctrl-C, SIGTERM or the death of any one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from devsinks.plan import Plan, Service

LOG_TAIL_LINES = 15
READY_POLL_SECONDS = 0.1


@dataclass
class Running:
    service: Service
    process: asyncio.subprocess.Process
    exited: asyncio.Task[int]
    log: Path


def answers(address: str, timeout: float = 2.0) -> bool:
    """Whether something accepts a TCP connection at host:port."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def log_tail(log: Path) -> str:
    try:
        with log.open(errors="replace") as lines:
            tail = deque(lines, maxlen=LOG_TAIL_LINES)
    except OSError:
        return "    (no log)"
    return "".join(f"    | {line}" for line in tail).rstrip() or "    (the log is empty)"


class Supervisor:
    def __init__(self, plan: Plan, out: TextIO) -> None:
        self.plan = plan
        self.out = out
        self.running: list[Running] = []
        self.stop_requested = asyncio.Event()
        self._signals = 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def request_stop(self) -> None:
        self._signals += 1
        if self._signals > 1:
            self.say("orderflow: asked again; killing what is still running")
            for running in self.running:
                self._signal(running, signal.SIGKILL)
        self.stop_requested.set()

    async def start_all(self) -> bool:
        """Starts every service in order; False (having said why) when one died, was not ready
        in time, or a stop was asked for first."""
        self.plan.log_dir.mkdir(parents=True, exist_ok=True)
        for service in self.plan.services:
            try:
                running = await self._spawn(service)
            except OSError as failure:
                self.say(f"orderflow: could not start the {service.title}: {failure}")
                return False
            if not await self._ready(running):
                return False
        return True

    async def _spawn(self, service: Service) -> Running:
        log = self.plan.log_of(service)
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                *service.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                env={**self.plan.env, **service.env},
                # Its own process group: a Ctrl-C reaches the stack alone, which then stops the
                # services in order (the worker finishes its activities while Temporal is up).
                process_group=0,
            )
        running = Running(service, process, asyncio.create_task(process.wait()), log)
        self.running.append(running)
        return running

    async def _ready(self, running: Running) -> bool:
        service = running.service
        loop = asyncio.get_running_loop()
        deadline = loop.time() + service.start_seconds
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            async with httpx.AsyncClient(timeout=2.0) as http:
                while True:
                    if running.exited.done():
                        self._report_death(running, "while starting")
                        return False
                    if stop.done():
                        return False
                    if await self._is_ready(running, http):
                        return True
                    if loop.time() > deadline:
                        self.say(
                            f"orderflow: the {service.title} was not ready within "
                            f"{service.start_seconds:.0f} s; its log is {running.log}:\n"
                            f"{log_tail(running.log)}"
                        )
                        return False
                    await asyncio.wait({running.exited, stop}, timeout=READY_POLL_SECONDS)
        finally:
            stop.cancel()

    async def _is_ready(self, running: Running, http: httpx.AsyncClient) -> bool:
        service = running.service
        # A port answering is only ours while our process lives; the loop checks that first.
        if not all(answers(port.address, timeout=0.5) for port in service.ports):
            return False
        line = service.ready_line
        if line is not None and line.encode() not in running.log.read_bytes():
            return False
        if service.ready_url is not None:
            try:
                return (await http.get(service.ready_url)).status_code == 200
            except httpx.HTTPError:
                return False
        return True

    async def watch(self) -> bool:
        """Waits for a stop request (True) or the first service to die (False, said)."""
        stop = asyncio.ensure_future(self.stop_requested.wait())
        exits = {running.exited: running for running in self.running}
        done, _ = await asyncio.wait({stop, *exits}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for task in done:
            if task in exits:
                self._report_death(exits[task], "")
                return False
        return True

    def _report_death(self, running: Running, when: str) -> None:
        when = f" {when}" if when else ""
        self.say(
            f"\norderflow: the {running.service.title} (pid {running.process.pid}) stopped"
            f"{when}: {describe_exit(running.exited.result())}. Its log is {running.log}; "
            f"the last lines:\n{log_tail(running.log)}"
        )

    def _signal(self, running: Running, signum: signal.Signals) -> None:
        if running.exited.done():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(running.process.pid, signum)

    async def stop_all(self) -> None:
        """Stops what runs, last started first; kills one that outstays its stop_seconds."""
        alive = [running for running in self.running if not running.exited.done()]
        if alive:
            names = ", ".join(running.service.title for running in reversed(alive))
            self.say(f"orderflow: stopping {names}...")
        for running in reversed(self.running):
            self._signal(running, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(running.exited), running.service.stop_seconds)
            except TimeoutError:
                self.say(
                    f"orderflow: the {running.service.title} did not stop within "
                    f"{running.service.stop_seconds:.0f} s; killing it"
                )
                self._signal(running, signal.SIGKILL)
                await running.exited
