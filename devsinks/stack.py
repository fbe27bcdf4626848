"""`make run` (`python -m devsinks.stack`): plans the stack from the environment, refuses before
starting anything when a port it needs is taken (naming the service and the variable that moves
it), says which servers of yours it uses, then runs and supervises the rest.

Python rather than bash: it reads the services' own defaults (core.settings) instead of a copy,
tries each port the way the service will bind it, and knows which child died."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sys
from typing import TextIO
from urllib.parse import urlsplit

from devsinks.plan import Plan, PlanError, Port, plan
from devsinks.supervisor import Supervisor, answers

CURL = """\
Place an order:
  curl -i -X POST {api}/orders \\
    -H 'Content-Type: application/json' -H "Idempotency-Key: $(uuidgen || date +%s%N)" \\
    -d '{{"customer_email":"ada@example.com","currency":"USD","payment_token":"tok_visa","items":[{{"sku":"BOOK-1","quantity":2,"unit_price_cents":1250}}]}}'"""  # noqa: E501


def is_free(port: Port) -> bool:
    """Whether the service could bind the port now. With SO_REUSEADDR, as the servers bind, so
    the closing connections of a stack that just stopped do not count; a listener does."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((port.host, port.port))
        except OSError:
            return False
        return True


def free_port_near(port: Port, avoid: set[int]) -> int | None:
    for candidate in range(port.port + 1, min(port.port + 100, 65536)):
        if candidate not in avoid and is_free(dataclasses.replace(port, port=candidate)):
            return candidate
    return None


def url_address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def check_ports(stack: Plan) -> tuple[list[str], list[Port]]:
    """A line for each port that is taken or wanted twice, and the optional ports that are taken
    (their services start without them)."""
    wanted = [port.port for port in stack.ports]
    problems: list[str] = []
    gave_way: list[Port] = []
    for index, port in enumerate(stack.ports):
        earlier = [p.service for p in stack.ports[:index] if p.port == port.port]
        if earlier:
            problems.append(
                f"  {port.service} and {earlier[0]} both want port {port.port}: "
                f"set {port.variable} to another port"
            )
        elif is_free(port):
            continue
        elif port.optional:
            gave_way.append(port)
        else:
            near = free_port_near(port, set(wanted))
            instead = f", or {port.instead}" if port.instead else ""
            problems.append(
                f"  {port.service} wants {port.address}, which is taken: "
                f"set {port.variable}{f'={near}' if near else ' to a free port'}{instead}"
            )
    return problems, gave_way


def check_yours(stack: Plan) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for the servers of yours: without Temporal the worker cannot run; a
    mail server or warehouse that does not answer yet only means retries."""
    refusals: list[str] = []
    warnings: list[str] = []
    for what, where, variable in stack.yours:
        address = url_address(where) if "://" in where else where
        if answers(address):
            continue
        if what == "Temporal":
            refusals.append(
                f"  your Temporal at {where} ({variable}) does not answer: start it, or unset "
                f"{variable} to have make run start a dev server"
            )
        else:
            warnings.append(
                f"your {what} at {where} ({variable}) does not answer yet; the worker retries "
                "and dead-letters what it cannot deliver"
            )
    return refusals, warnings


def print_running(stack: Plan, out: TextIO) -> None:
    width = max(len(label) for label, _ in stack.summary)
    lines = [f"  {label:<{width}}  {where}" for label, where in stack.summary]
    api = next(where for label, where in stack.summary if label == "API docs")
    print(
        f"\norderflow is running (Ctrl-C stops everything; logs in {stack.log_dir}/)",
        *lines,
        "",
        CURL.format(api=api.removesuffix("/docs")),
        sep="\n",
        file=out,
        flush=True,
    )


async def run(stack: Plan, out: TextIO) -> int:
    supervisor = Supervisor(stack, out)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, supervisor.request_stop)
    try:
        if not await supervisor.start_all():
            return 0 if supervisor.stop_requested.is_set() else 1
        print_running(stack, out)
        return 0 if await supervisor.watch() else 1
    finally:
        await supervisor.stop_all()
        print("orderflow: stopped", file=out, flush=True)


def main(out: TextIO = sys.stdout) -> int:
    env = dict(os.environ)
    try:
        stack = plan(env)
        problems, gave_way = check_ports(stack)
        if gave_way:
            stack = plan(env, gave_way=gave_way)
    except PlanError as bad:
        print(f"make run cannot start: {bad}", file=out)
        return 2
    refusals, warnings = check_yours(stack)
    warnings[:0] = [
        f"{port.address} is taken, so the {port.service} are off (set {port.variable} to a free "
        "host:port to have them)"
        for port in gave_way
    ]
    if not stack.env.get("API_KEYS"):
        warnings.append("API_KEYS is not set: the API accepts requests from anyone (dev only).")
    for what, where, variable in stack.yours:
        print(f"orderflow: using your {what} at {where} ({variable})", file=out)
    if problems or refusals:
        print(
            "make run cannot start; nothing was started:", *problems, *refusals, sep="\n", file=out
        )
        return 2
    titles = ", ".join(service.title for service in stack.services)
    print(f"orderflow: starting {titles} (data in {stack.data_dir}/)", file=out)
    for warning in warnings:
        print(f"WARNING: {warning}", file=out)
    out.flush()
    return asyncio.run(run(stack, out))


if __name__ == "__main__":
    sys.exit(main())
