"""The load generator, run as a process of its own so its CPU is not the measured process's:
fires a bounded number of requests (or workflow starts) at a fixed concurrency, within a
deadline, and prints one JSON line with every latency.

    python -m bench.loadgen http URL --count 1000 --concurrency 16 --deadline 120
    python -m bench.loadgen start --queue Q --count 1000 --concurrency 16   # bare start_workflow
    python -m bench.loadgen bare-burst --queue Q --count 500 --concurrency 16 [--workflow NAME]
    python -m bench.loadgen histories --queue Q --sample 20   # events and bytes per history
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import httpx

from bench.rush_sinks import FLAKY_MAILBOX_MARK, FLAKY_SKU, POISON_SKU

WARMUP = 10


def order_body(marker_sku: str | None = None) -> dict[str, Any]:
    """An order; `marker_sku` adds an item the rush's receivers react to (bench/rush_sinks.py),
    and for the flaky one a recipient its SMTP server refuses twice first."""
    mailbox = f"buyer-{uuid.uuid4().hex[:12]}"
    items = [
        {"sku": "BOOK-1", "quantity": 2, "unit_price_cents": 1250},
        {"sku": "PEN-9", "quantity": 1, "unit_price_cents": 199},
    ]
    if marker_sku is not None:
        items.append({"sku": marker_sku, "quantity": 1, "unit_price_cents": 100})
        if marker_sku == FLAKY_SKU:
            mailbox += FLAKY_MAILBOX_MARK
    return {
        "customer_email": f"{mailbox}@example.com",
        "currency": "USD",
        "items": items,
        "payment_token": "tok_visa",
    }


@dataclass
class LoadResult:
    count: int
    concurrency: int
    started_at: float  # wall clock, for matching against server-side times
    elapsed: float
    latencies_ms: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    timed_out: bool = False


async def drive(
    call: Callable[[int], Awaitable[str]], count: int, concurrency: int, deadline: float
) -> LoadResult:
    """Runs `call` `count` times, `concurrency` at a time; stops issuing at the deadline."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    issued = 0
    stop_at = time.monotonic() + deadline
    timed_out = False

    async def lane() -> None:
        nonlocal issued, timed_out
        while issued < count:
            if time.monotonic() > stop_at:
                timed_out = True
                return
            index = issued
            issued += 1
            began = time.perf_counter()
            try:
                outcome = await call(index)
            except Exception as failure:
                outcome = type(failure).__name__
            latencies.append((time.perf_counter() - began) * 1000)
            outcomes[outcome] += 1

    started_at = time.time()
    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return LoadResult(
        count=len(latencies),
        concurrency=concurrency,
        started_at=started_at,
        elapsed=time.perf_counter() - began,
        latencies_ms=latencies,
        outcomes=dict(outcomes),
        timed_out=timed_out,
    )


async def http_load(
    url: str,
    count: int,
    concurrency: int,
    deadline: float,
    warmup: int,
    *,
    flaky_every: int = 0,
    poison: bool = False,
) -> LoadResult:
    """`flaky_every` N: every N-th order is refused twice first by the rush's receivers;
    `poison`: every order is refused by its warehouse for good."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    def body(index: int) -> dict[str, Any]:
        if poison:
            return order_body(POISON_SKU)
        if flaky_every and index % flaky_every == 0:
            return order_body(FLAKY_SKU)
        return order_body()

    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:

        async def post(index: int) -> str:
            response = await client.post(
                url, json=body(index), headers={"Idempotency-Key": f"bench-{uuid.uuid4().hex}"}
            )
            return str(response.status_code)

        if warmup:
            # Warm the connections and the server's code paths before the measured requests.
            await drive(post, warmup, min(concurrency, warmup), deadline)
        return await drive(post, count, concurrency, deadline)


async def start_load(queue: str, count: int, concurrency: int, deadline: float) -> LoadResult:
    """The Temporal floor: the exact start the API makes (core.temporal.start_order_workflow),
    from a client built the same way, on a queue no worker polls, with no HTTP and no database."""
    from core.policy import step_policy
    from core.settings import Settings
    from core.temporal import connect_temporal, start_order_workflow

    settings = Settings()
    client = await connect_temporal(settings)
    policy = step_policy(settings)

    async def start(_index: int) -> str:
        await start_order_workflow(
            client,
            f"floor_{uuid.uuid4().hex}",
            queue,
            policy=policy,
            rpc_timeout=timedelta(seconds=10),
        )
        return "started"

    await drive(start, WARMUP, min(concurrency, WARMUP), deadline)
    return await drive(start, count, concurrency, deadline)


async def bare_burst(
    queue: str, count: int, concurrency: int, deadline: float, already: int, workflow: str
) -> LoadResult:
    """The ceiling's burst: starts `count` bare workflows (of the type named), then waits until
    every one closed. `elapsed` runs from the first start to the last close as Temporal recorded
    it."""
    from bench.bare import BareInput
    from core.settings import Settings
    from core.temporal import connect_temporal

    client = await connect_temporal(Settings())
    run = uuid.uuid4().hex[:8]

    async def start(index: int) -> str:
        await client.start_workflow(
            workflow,
            BareInput(f"bare_{run}_{index}"),
            id=f"bare_{run}_{index}",
            task_queue=queue,
            rpc_timeout=timedelta(seconds=10),
        )
        return "started"

    result = await drive(start, count, concurrency, deadline)
    query = f"TaskQueue = '{queue}' AND ExecutionStatus = 'Completed'"
    stop_at = time.monotonic() + deadline
    while time.monotonic() < stop_at:
        done = (await client.count_workflows(query)).count
        if done >= already + result.count:
            break
        await asyncio.sleep(0.2)
    else:
        result.timed_out = True
    last_close = 0.0
    async for execution in client.list_workflows(query):
        if execution.id.startswith(f"bare_{run}_") and execution.close_time is not None:
            last_close = max(last_close, execution.close_time.timestamp())
    result.elapsed = (last_close - result.started_at) if last_close else result.elapsed
    return result


async def history(queue: str) -> dict[str, Any]:
    """The event counts of one closed workflow on the queue: how much history an order costs."""
    from core.settings import Settings
    from core.temporal import connect_temporal

    client = await connect_temporal(Settings())
    async for execution in client.list_workflows(f"TaskQueue = '{queue}'", limit=1):
        events = Counter[str]()
        fetched = await client.get_workflow_handle(execution.id).fetch_history()
        for event in fetched.events:
            events[event.WhichOneof("attributes") or "unknown"] += 1
        return {"workflow_id": execution.id, "events": sum(events.values()), "by_type": events}
    return {}


async def histories(queue: str, sample: int) -> dict[str, Any]:
    """Events and bytes of up to `sample` closed workflows on the queue, as the server keeps
    them: the history fetched event by event (each event's protobuf size) and the server's own
    `history_size_bytes` from describe, which `temporal workflow describe` shows too."""
    from core.settings import Settings
    from core.temporal import connect_temporal

    client = await connect_temporal(Settings())
    rows: list[dict[str, Any]] = []
    query = (
        f"TaskQueue = '{queue}' AND WorkflowType = 'OrderWorkflow' "
        "AND ExecutionStatus = 'Completed'"
    )
    async for execution in client.list_workflows(query, limit=sample):
        handle = client.get_workflow_handle(execution.id)
        fetched = await handle.fetch_history()
        info = (await handle.describe()).raw_description.workflow_execution_info
        rows.append(
            {
                "workflow_id": execution.id,
                "events": len(fetched.events),
                "event_bytes": sum(event.ByteSize() for event in fetched.events),
                "history_size_bytes": info.history_size_bytes,
                "history_length": info.history_length,
                "state_transitions": info.state_transition_count,
            }
        )
    return {"sample": len(rows), "workflows": rows}


async def task_timeouts(queue: str) -> dict[str, Any]:
    """Over every OrderWorkflow on the queue: how many workflow tasks it took, and how many of
    them timed out or failed (a timed-out task's local activities run again)."""
    from temporalio.api.enums.v1 import EventType

    from core.settings import Settings
    from core.temporal import connect_temporal

    client = await connect_temporal(Settings())
    ids = [
        execution.id
        async for execution in client.list_workflows(
            f"TaskQueue = '{queue}' AND WorkflowType = 'OrderWorkflow'"
        )
    ]
    counted: Counter[str] = Counter()
    worst: dict[str, int] = {}
    gate = asyncio.Semaphore(16)

    async def read(workflow_id: str) -> None:
        async with gate:
            timed_out = 0
            async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
                if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                    counted["workflow_tasks"] += 1
                elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
                    counted["workflow_task_timeouts"] += 1
                    timed_out += 1
                elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                    counted["workflow_task_failures"] += 1
            if timed_out:
                worst[workflow_id] = timed_out

    await asyncio.gather(*(read(workflow_id) for workflow_id in ids))
    return {"workflows": len(ids), **counted, "workflows_with_timeouts": len(worst)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "mode", choices=["http", "start", "bare-burst", "history", "histories", "task-timeouts"]
    )
    parser.add_argument("url", nargs="?")
    parser.add_argument("--queue", default="bench-floor")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--already", type=int, default=0, help="bare workflows done before")
    parser.add_argument("--workflow", default="BareWorkflow", help="the bare workflow type")
    parser.add_argument("--sample", type=int, default=20, help="workflows `histories` reads")
    parser.add_argument("--flaky-every", type=int, default=0, help="every N-th order flaky")
    parser.add_argument("--poison", action="store_true", help="every order refused for good")
    args = parser.parse_args()
    if args.mode == "task-timeouts":
        _finish(asyncio.run(task_timeouts(args.queue)))
    if args.mode == "history":
        _finish(asyncio.run(history(args.queue)))
    if args.mode == "histories":
        _finish(asyncio.run(histories(args.queue, args.sample)))
    if args.mode == "http":
        result = asyncio.run(
            http_load(
                args.url,
                args.count,
                args.concurrency,
                args.deadline,
                args.warmup,
                flaky_every=args.flaky_every,
                poison=args.poison,
            )
        )
    elif args.mode == "start":
        result = asyncio.run(start_load(args.queue, args.count, args.concurrency, args.deadline))
    else:
        result = asyncio.run(
            bare_burst(
                args.queue,
                args.count,
                args.concurrency,
                args.deadline,
                args.already,
                args.workflow,
            )
        )
    _finish(asdict(result))


def _finish(output: dict[str, Any]) -> None:
    json.dump(output, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    # The Temporal client's native runtime can abort while the interpreter finalises; the
    # figures are written, so leave without finalising.
    os._exit(0)


if __name__ == "__main__":
    main()
