"""The system suite: the service on real processes under compound faults. Each scenario ends
with the same check over every accepted order (tests/system/checks.py) and writes its figures
for docs/reliability.md (`make test-system` renders the table)."""

from __future__ import annotations

import asyncio
import random
import time

from tests.support import order_body, wait_until
from tests.system.conftest import System, size
from tests.system.load import Placed


async def test_duplicate_storm(system: System) -> None:
    """50 concurrent identical POST /orders with one key, across the two API processes."""
    copies = int(size("STORM_REQUESTS", 50))
    async with system.stack("duplicate_storm") as stack:
        shop = stack.client
        key, body = shop.new_key(), order_body()
        storm = [Placed(key, body) for _ in range(copies)]
        shop.placed.extend(storm)
        await asyncio.gather(*(shop.settle(p, api=n) for n, p in enumerate(storm)))
        assert len({p.order_id for p in storm}) == 1, {p.order_id for p in storm}
        first = [p.answers[0].status for p in storm]
        figures = await stack.finish(
            injected=f"{copies} concurrent identical POST /orders, one key, two API processes",
            checked="one order, charge, workflow, receipt and accepted webhook for the key",
            repeats_allowed=False,
            extra={"first_answers": {str(s): first.count(s) for s in sorted(set(first))}},
        )
    assert figures.orders == 1


async def test_workers_killed_mid_stream(system: System) -> None:
    """A paced stream while worker processes are SIGKILLed at random points and restarted, with
    the SMTP server and the warehouse slowed so that attempts are in flight at each kill."""
    count, kills = int(size("STREAM_ORDERS", 300)), 3
    rng = random.Random(int(size("SEED", time.time())))
    async with system.stack("workers_killed") as stack:
        system.sinks.slow(250)
        shop = stack.client
        stream = asyncio.create_task(shop.stream(count, per_second=size("STREAM_RATE", 15)))
        # One kill at a random point in each part of the stream, so they do not bunch up.
        points = [
            rng.randrange(count * n // kills + count // 20, count * (n + 1) // kills)
            for n in range(kills)
        ]
        victims = []
        for point in points:
            await wait_until(lambda p=point: len(shop.placed) >= p, within=120, message="stream")
            victim = rng.choice(stack.workers)
            victims.append(f"{victim.name} at order {point}")
            await victim.restart()
        await stream
        drain_from = time.monotonic()
        system.sinks.heal()
        figures = await stack.finish(
            injected=f"{count} orders at {size('STREAM_RATE', 15):g}/s; {kills} SIGKILLs of a "
            "worker at random points, each restarted; SMTP and warehouse slowed to 250 ms",
            checked="invariants; receipt repeats only from attempts in flight at a kill",
            repeats_allowed=True,
            drain_from=drain_from,
            extra={"kills": victims},
        )
    assert figures.orders == count


async def test_temporal_server_killed_and_restarted(system: System) -> None:
    """The Temporal server SIGKILLed mid-stream and started again on the same database file."""
    count = int(size("TEMPORAL_KILL_ORDERS", 150))
    async with system.stack("temporal_killed") as stack:
        shop = stack.client
        stream = asyncio.create_task(shop.stream(count, per_second=15))
        await wait_until(lambda: len(shop.placed) >= count // 3, within=120, message="stream")
        down = time.monotonic()
        await system.temporal.process.kill()
        system.temporal.process.start()
        system.client = await system.temporal.connected()
        downtime = time.monotonic() - down
        await stream
        drain_from = time.monotonic()
        figures = await stack.finish(
            injected=f"{count} orders at 15/s; the Temporal server SIGKILLed after {count // 3} "
            f"and restarted on its database file ({downtime:.1f} s down)",
            checked="invariants; orders accepted while it was down started by the sweeper",
            repeats_allowed=True,
            drain_from=drain_from,
            extra={"server_down_seconds": round(downtime, 1)},
        )
    assert figures.orders == count
