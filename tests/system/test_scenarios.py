"""The system suite: the service on real processes under compound faults. Each scenario ends
with the same check over every accepted order (tests/system/checks.py) and writes its figures
for docs/reliability.md (`make test-system` renders the table)."""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import httpx
from sqlalchemy import func, select

from activities.retry import capped_exponential
from core.ledger import effect_key
from core.models import (
    DeadLetter,
    DeadLetterStatus,
    InterruptedClaim,
    OrderStep,
    StepStatus,
)
from core.settings import Settings
from tests.support import order_body, wait_for_workflow_closed, wait_until
from tests.system.checks import (
    Fault,
    orders_by_key,
    settled_count,
    started_by,
    wait_until_settled,
    workflow_task_timeouts,
)
from tests.system.conftest import KILLED_ATTEMPTS_ENV, Stack, System, identity_of, size
from tests.system.load import Placed
from tests.system.sinks import FLAKY_MAILBOX, FLAKY_SKU, POISON_SKU
from tests.worker_processes import workflow_task_identities


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
            extra={"first_answers": {str(s): first.count(s) for s in sorted(set(first))}},
        )
    assert figures.orders == 1


async def test_workers_killed_mid_stream(system: System) -> None:
    """A paced stream while worker processes are SIGKILLed at random points and restarted, with
    the SMTP server and the warehouse slowed so that attempts are in flight at each kill."""
    count, kills = int(size("STREAM_ORDERS", 300)), 3
    rng = random.Random(int(size("SEED", time.time())))
    async with system.stack("workers_killed", KILLED_ATTEMPTS_ENV) as stack:
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
            await shop.sent(point)
            # The worker holding the most claims right now, that is running the most attempts
            # (a kill of an idle worker would prove little).
            busy = [
                (await live_claims(system, identity_of(worker)), rng.random(), n)
                for n, worker in enumerate(stack.workers)
            ]
            _, _, chosen = max(busy)
            victim = stack.workers[chosen]
            held = await live_claims(system, identity_of(victim))
            await stack.kill(victim)
            victims.append(f"{victim.name} at order {point} holding {held} claims")
        await stream
        drain_from = time.monotonic()
        system.sinks.heal()
        figures = await stack.finish(
            injected=f"{count} orders at {size('STREAM_RATE', 15):g}/s; {kills} SIGKILLs of a "
            "worker at random points, each restarted; SMTP and warehouse slowed to 250 ms",
            checked="invariants; every repeat from an attempt in flight at a kill; at least one "
            "kill interrupted attempts",
            drain_from=drain_from,
            extra={"kills": victims},
        )
        # The premise: the kills hit attempts in flight (their claims, taken over since).
        interrupted = [await claims_in_flight(system, fault) for fault in stack.faults]
        figures.extra["attempts_interrupted_per_kill"] = interrupted
        stack.record(figures)
    assert any(interrupted), f"no kill hit an attempt in flight: {victims}"
    assert figures.orders == count


async def test_temporal_server_killed_and_restarted(system: System) -> None:
    """The Temporal server SIGKILLed mid-stream and started again on the same database file."""
    count = int(size("TEMPORAL_KILL_ORDERS", 150))
    async with system.stack("temporal_killed") as stack:
        shop = stack.client
        stream = asyncio.create_task(shop.stream(count, per_second=15))
        await shop.sent(count // 3)
        down = time.time()
        await system.temporal.process.kill()
        system.temporal.process.start()
        system.client = await system.temporal.connected()
        up = time.time()
        stack.every_worker_lost_temporal(down, up)
        await stream
        drain_from = time.monotonic()
        # The premise: orders were accepted while the server was down.
        meanwhile = [
            p.order_id
            for p in shop.placed
            if p.order_id and any(a.status == 202 and down <= a.at <= up for a in p.answers)
        ]
        figures = await stack.finish(
            injected=f"{count} orders at 15/s; the Temporal server SIGKILLed after {count // 3} "
            f"and restarted on its database file ({up - down:.1f} s down)",
            checked="invariants; orders accepted while it was down started by a worker's relay",
            drain_from=drain_from,
            extra={
                "server_down_seconds": round(up - down, 1),
                "accepted_while_down": len(meanwhile),
            },
        )
        workers = {worker.process.pid for worker in stack.workers}
        starters = {await started_by(system.client, order_id) for order_id in meanwhile}
    assert meanwhile, "no order was accepted while the server was down"
    assert starters <= workers, f"started by {starters}, the workers are {workers}"
    assert figures.orders == count


async def test_api_killed_between_commit_and_start(system: System) -> None:
    """An API process dies right after committing an order, before it starts the workflow (the
    fault point FAULT_EXIT_AFTER_ORDER_COMMIT); the relay starts it. Half of those orders the
    client retries with the same key on another API process (and gets the same order), half it
    abandons; a stream through the healthy API processes runs meanwhile."""
    faults = int(size("API_KILLS", 4))
    async with system.stack("api_killed_after_commit") as stack:
        shop = stack.client
        stream = asyncio.create_task(shop.stream(60, per_second=10))
        doomed = await stack.add_api("api-doomed", FAULT_EXIT_AFTER_ORDER_COMMIT="true")
        faulted: list[Placed] = []
        for n in range(faults):
            if not doomed.process.running:
                doomed.process.start()
                await doomed.ready()
            # One request to the doomed process: it commits, then exits without answering.
            placed = Placed(shop.new_key(), order_body())
            faulted.append(placed)
            await shop.settle(placed, retry=False, url=doomed.url)
            assert placed.answers[-1].status == 0, placed.answers
            await wait_until(lambda: not doomed.process.running, message="the API exits")
            assert doomed.process.process is not None
            assert doomed.process.process.returncode == 70
            if n % 2:
                shop.placed.append(placed)
                await shop.settle(placed)  # the same key, on the healthy processes
        await stream
        drain_from = time.monotonic()
        committed = await orders_by_key(system.sessions, [p.key for p in faulted])
        assert len(committed) == faults, committed
        figures = await stack.finish(
            injected=f"{faults} times an API process exited between the order commit and the "
            "workflow start; half the clients retried with the same key, half gave up",
            checked="invariants; each order the dead process committed was started by a "
            "worker's relay and completed",
            drain_from=drain_from,
            accepted=committed,
        )
        worker_pids = {worker.process.pid for worker in stack.workers}
        for order_id in committed.values():
            assert await started_by(system.client, order_id) in worker_pids
    assert figures.orders == 60 + faults


def outage_env(outage: float, **changes: object) -> dict[str, object]:
    """The shipped retry schedule (1 s doubling) and the shipped attempts, its cap scaled from a
    two-minute outage to this one."""
    return {
        "RETRY_MAX_ATTEMPTS": Settings.model_fields["RETRY_MAX_ATTEMPTS"].default,
        "RETRY_INITIAL_INTERVAL_SECONDS": 1,
        "RETRY_BACKOFF_COEFFICIENT": 2,
        "RETRY_MAX_INTERVAL_SECONDS": max(2.0, 60 * outage / 120),
        "STEP_TOTAL_TIMEOUT_SECONDS": 900,
        **changes,
    }


def attempt_histogram(deliveries: list[float], start: float, width: float) -> list[int]:
    counts: list[int] = []
    for at in deliveries:
        bucket = int((at - start) // width)
        counts.extend([0] * (bucket + 1 - len(counts)))
        counts[bucket] += 1
    return counts


def warehouse_times(system: System, order_ids: set[str]) -> dict[str, list[float]]:
    """Per order, when each of its webhook deliveries arrived."""
    times: dict[str, list[float]] = {}
    for delivery in system.sinks.warehouse.deliveries:
        order_id = str(delivery.body.get("order_id", ""))
        if order_id in order_ids:
            times.setdefault(order_id, []).append(delivery.received_at)
    return times


# Enough retries that "more than half under three quarters of the ceiling" separates full
# jitter (three in four expected) from none (almost none) beyond chance.
JITTER_SAMPLES = 100


async def test_warehouse_outage_within_the_budget(system: System) -> None:
    """The warehouse answers 503 for the outage while the orders arrive, then recovers: with a
    time budget longer than the outage nothing is dead-lettered, and the retries are spread."""
    count, outage = int(size("OUTAGE_ORDERS", 500)), size("OUTAGE_SECONDS", 30)
    async with system.stack("warehouse_outage", outage_env(outage)) as stack:
        shop = stack.client
        system.sinks.warehouse.faults.configure(fail_rate=1.0, status=503)
        began = time.time()
        stream = asyncio.create_task(shop.stream(count, per_second=count / outage))
        await asyncio.sleep(outage)  # the outage's length, a fault, not a wait for a condition
        system.sinks.warehouse.faults.reset()
        healed = time.time()
        await stream
        drain_from = time.monotonic()
        figures = await stack.finish(
            injected=f"{count} orders during a {outage:g} s warehouse outage "
            "(503 to every call), then recovery; time budget 900 s",
            checked="invariants; no dead letter; retries spread (histogram)",
            drain_from=drain_from,
        )
        times = warehouse_times(system, set(shop.accepted().values()))
        attempts = sorted(at for each in times.values() for at in each)
        gaps = [b - a for each in times.values() for a, b in itertools.pairwise(each)]
        under = below_their_ceiling(requested_delays(stack, times), env=outage_env(outage))
        figures.extra |= {
            "outage_seconds": outage,
            "healed_after_seconds": round(healed - began, 1),
            "histogram_bucket_seconds": 2,
            "attempt_histogram": attempt_histogram(attempts, began, 2),
            "retry_gap_seconds": summary(gaps),
            "retries_asking_under_three_quarters_of_their_ceiling": f"{sum(under)} of {len(under)}",
        }
        stack.record(figures)
    assert figures.dead_letters == 0
    # Full jitter, not lockstep: without jitter every failed attempt asks for its whole capped
    # exponential delay; with full jitter for a uniform share of it, under three quarters of it
    # three times in four. (What the warehouse sees also carries the machine's queueing.)
    assert len(under) >= JITTER_SAMPLES, f"{len(under)} retries are too few to judge the jitter"
    assert sum(under) > 0.5 * len(under), f"{sum(under)} of {len(under)} under 3/4 of the ceiling"


RETRY_LINE = re.compile(
    r"order_id=(\S+) .*step=notify_warehouse attempt=(\d+) .*next_delay_s=([\d.]+)"
)


def requested_delays(stack: Stack, orders: Iterable[str]) -> list[tuple[int, float]]:
    """(the step attempt, the delay it asked for before the next) of each retried webhook
    attempt of these orders, from the workers' one line per failed attempt."""
    wanted = set(orders)
    delays = []
    for worker in stack.workers:
        for match in RETRY_LINE.finditer(worker.process.output()):
            if match.group(1) in wanted:
                delays.append((int(match.group(2)), float(match.group(3))))
    return delays


def below_their_ceiling(delays: list[tuple[int, float]], *, env: dict[str, object]) -> list[bool]:
    """For each requested delay: whether it is under three quarters of the capped exponential
    ceiling of its attempt (the whole ceiling, without jitter)."""
    initial = float(str(env["RETRY_INITIAL_INTERVAL_SECONDS"]))
    coefficient = float(str(env["RETRY_BACKOFF_COEFFICIENT"]))
    cap = float(str(env["RETRY_MAX_INTERVAL_SECONDS"]))
    return [
        delay < 0.75 * capped_exponential(initial, coefficient, attempt - 1, cap)
        for attempt, delay in delays
    ]


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "n": len(ordered),
        "min": round(ordered[0], 2),
        "p50": round(ordered[len(ordered) // 2], 2),
        "p90": round(ordered[len(ordered) * 9 // 10], 2),
        "max": round(ordered[-1], 2),
        "stdev": round(statistics.pstdev(ordered), 2),
    }


async def test_warehouse_outage_longer_than_the_budget(system: System) -> None:
    """The same outage with a time budget a third of its length: the orders whose budget ran
    out are dead-lettered, the later ones are not; after recovery one bulk retry completes all
    of them, no faster than the configured rate."""
    count, outage = int(size("BUDGET_ORDERS", 200)), size("OUTAGE_SECONDS", 30)
    budget, rate = outage / 3, size("REDRIVE_RATE", 20)
    env = outage_env(outage, STEP_TOTAL_TIMEOUT_SECONDS=budget)
    async with system.stack("warehouse_outage_over_budget", env) as stack:
        shop = stack.client
        system.sinks.warehouse.faults.configure(fail_rate=1.0, status=503)
        stream = asyncio.create_task(shop.stream(count, per_second=count / outage))
        await asyncio.sleep(outage)  # the outage's length, a fault, not a wait for a condition
        system.sinks.warehouse.faults.reset()
        await stream
        accepted = shop.accepted()
        await wait_until_settled(system.sessions, stack.prefix, len(accepted), 120)
        letters = await open_letters(system, list(accepted.values()))
        assert 0 < len(letters) < count, f"{len(letters)} of {count} dead-lettered"
        error_types = sorted({letter.error_type for letter in letters})

        redrive_began, drain_from = time.time(), time.monotonic()
        api_url = stack.apis[0].url
        async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
            locations = []
            for error_type in error_types:
                answer = await http.post(
                    "/dead-letters/retry",
                    json={
                        "step": "notify_warehouse",
                        "error_type": error_type,
                        "per_second": rate,
                        "limit": 1000,
                    },
                )
                assert answer.status_code == 202, answer.text
                locations.append(answer.headers["Location"])

            async def finished(location: str) -> dict[str, Any] | None:
                progress: dict[str, Any] = (await http.get(location)).json()
                return progress if progress["state"] == "finished" else None

            redrives = [
                await wait_until(
                    partial(finished, location),
                    within=len(letters) / rate + 120,
                    interval=0.5,
                    message="the bulk retry finished",
                )
                for location in locations
            ]
        # Every letter of the outage was sent its retry once, none skipped.
        assert sum(redrive["sent"] for redrive in redrives) == len(letters), redrives
        assert sum(redrive["skipped"] for redrive in redrives) == 0, redrives
        figures = await stack.finish(
            injected=f"{count} orders across a {outage:g} s warehouse outage with a {budget:g} s "
            f"time budget; then POST /dead-letters/retry at {rate:g}/s",
            checked="invariants; the overflow dead-lettered; the bulk retry completes every "
            "one, paced",
            drain_from=drain_from,
        )
        # When each letter's retry reached the warehouse, per bulk retry (one per error type).
        redelivered = warehouse_times(system, {letter.order_id for letter in letters})
        paces: dict[str, list[float]] = {}
        for letter in letters:
            first = min(at for at in redelivered[letter.order_id] if at >= redrive_began)
            paces.setdefault(letter.error_type, []).append(first)
        redriven = sorted(at for each in paces.values() for at in each)
        figures.extra |= {
            "dead_lettered_in_outage": len(letters),
            "dead_letter_error_types": error_types,
            "redrive_per_second": rate,
            "redrive_seconds": round(redriven[-1] - redriven[0], 1),
            "letters_per_redrive": {kind: len(times) for kind, times in paces.items()},
        }
        stack.record(figures)
    assert figures.dead_letters == 0
    # Each bulk retry paced on its own: its n-th letter reaches the warehouse no earlier than
    # (n-1)/rate after it began (two at once may go twice as fast together).
    for kind, times in paces.items():
        times.sort()
        assert times[-1] - redrive_began >= (len(times) - 1) / rate, (kind, times)


async def open_letters(system: System, order_ids: list[str]) -> list[DeadLetter]:
    async with system.sessions() as session:
        return list(
            await session.scalars(
                select(DeadLetter).where(
                    DeadLetter.order_id.in_(order_ids), DeadLetter.status == DeadLetterStatus.OPEN
                )
            )
        )


async def test_poison_sku(system: System) -> None:
    """Every tenth order carries a SKU the warehouse refuses with 400: those are dead-lettered
    at their first attempt, and the others go through at their first attempt too."""
    count = int(size("POISON_ORDERS", 100))
    poisoned = order_body()["items"] + [{"sku": POISON_SKU, "quantity": 1, "unit_price_cents": 5}]
    async with system.stack("poison_sku") as stack:
        system.sinks.warehouse.poison_skus.add(POISON_SKU)
        shop = stack.client
        placed = await shop.stream(
            count, per_second=20, body=lambda n: order_body(items=poisoned) if n % 10 == 0 else None
        )
        drain_from = time.monotonic()
        figures = await stack.finish(
            injected=f"{count} orders at 20/s, every tenth with a SKU the warehouse answers 400",
            checked="invariants; poison orders dead-lettered at attempt 1, permanent; the rest "
            "complete at attempt 1",
            drain_from=drain_from,
        )
        poison = {p.order_id for n, p in enumerate(placed) if n % 10 == 0}
        letters = await open_letters(system, [p.order_id for p in placed if p.order_id])
        assert {letter.order_id for letter in letters} == poison
        assert all(letter.permanent and letter.attempts == 1 for letter in letters), letters
        async with system.sessions() as session:
            steps = (
                await session.scalars(
                    select(OrderStep).where(
                        OrderStep.order_id.in_([p.order_id for p in placed if p.order_id]),
                        OrderStep.step == "notify_warehouse",
                    )
                )
            ).all()
        healthy = [step for step in steps if step.order_id not in poison]
        assert all(step.attempts == 1 for step in healthy), [s.attempts for s in healthy]
        assert figures.dead_letters == len(poison)


async def test_database_and_temporal_links_cut(system: System) -> None:
    """Mid-stream, every process's link to PostgreSQL is cut for a few seconds (the API answers
    503 with Retry-After; the client retries with the same key and gets its one order); later
    every link to Temporal is cut for 15 s."""
    count = int(size("CUT_ORDERS", 200))
    database_cut, temporal_cut = size("DATABASE_CUT_SECONDS", 7), size("TEMPORAL_CUT_SECONDS", 15)
    async with system.stack("links_cut") as stack:
        shop = stack.client
        stream = asyncio.create_task(shop.stream(count, per_second=10))
        await shop.sent(count // 4)
        cut_at = time.time()
        await stack.cut(stack.database_links(), database_cut)
        restored_at = time.time()
        # The Temporal cut is judged on its own: only once every API reaches its database again.
        await asyncio.gather(*(api.ready(probe="/readyz") for api in stack.apis))
        await shop.sent(count * 3 // 5)
        temporal_cut_at = time.time()
        await stack.cut(stack.temporal_links(), temporal_cut)
        temporal_restored_at = time.time()
        await stream
        drain_from = time.monotonic()
        during_cut = [
            answer
            for placed in shop.placed
            for answer in placed.answers
            if cut_at <= answer.at <= restored_at + 1 and answer.status != 202
        ]
        # The order path does not need Temporal: the relay starts the workflows once it is back.
        temporal_answers = [
            answer
            for placed in shop.placed
            for answer in placed.answers
            if temporal_cut_at <= answer.at - answer.took and answer.at <= temporal_restored_at
        ]
        figures = await stack.finish(
            injected=f"{count} orders at 10/s; every link to PostgreSQL cut for "
            f"{database_cut:g} s, later every link to Temporal for {temporal_cut:g} s",
            checked="invariants; each retried key one order; during the database cut the API "
            "answers 503 + Retry-After; nothing dead-lettered",
            drain_from=drain_from,
            allowed_5xx=frozenset({503}),
            extra={
                "answers_during_database_cut": {
                    str(status): sum(1 for a in during_cut if a.status == status)
                    for status in sorted({a.status for a in during_cut})
                },
                "answers_during_temporal_cut": dict(Counter(a.status for a in temporal_answers)),
            },
        )
    assert figures.orders == count
    assert figures.dead_letters == 0
    assert during_cut, "no request met the database cut"
    # Status 0 is a request that got no HTTP answer at all (its reason is in the figures); the
    # client retried it like any other. What the API answered must be 503 + Retry-After.
    refused = [
        (a.status, a.retry_after)
        for a in during_cut
        if a.status and (a.status != 503 or not a.retry_after)
    ]
    assert not refused, f"answers other than 503 + Retry-After during the cut: {refused[:10]}"
    assert temporal_answers, "no request met the Temporal cut"
    assert {a.status for a in temporal_answers} == {202}, Counter(
        a.status for a in temporal_answers
    )


def flaky_order() -> dict[str, Any]:
    """An order both downstreams refuse twice before they take it."""
    items = order_body()["items"] + [{"sku": FLAKY_SKU, "quantity": 1, "unit_price_cents": 5}]
    email = f"buyer-{uuid.uuid4().hex[:12]}{FLAKY_MAILBOX}example.com"
    return order_body(email=email, items=items)


def refused_order() -> dict[str, Any]:
    items = order_body()["items"] + [{"sku": POISON_SKU, "quantity": 1, "unit_price_cents": 5}]
    return order_body(items=items)


WARM_UP_ORDERS = 20


class DrainCurve:
    """Samples how many of the scenario's orders have settled, every second, and counts them
    per window: a steady drain settles about as many in each window while work remains."""

    def __init__(self, system: System, prefix: str, window: float = 10.0) -> None:
        self._system = system
        self._prefix = prefix
        self._window = window
        self.samples: list[tuple[float, int]] = []

    async def sample(self, until_settled: int) -> None:
        started = time.monotonic()
        already = await settled_count(self._system.sessions, self._prefix)
        while True:
            settled = await settled_count(self._system.sessions, self._prefix)
            self.samples.append((time.monotonic() - started, settled - already))
            if settled >= until_settled:
                return
            await asyncio.sleep(1)  # the sampling period, not a wait for a condition

    def windows(self) -> list[int]:
        """Orders settled in each window, the last (partial) one included."""
        counts: list[int] = []
        for at, settled in self.samples:
            bucket = int(at // self._window)
            while len(counts) <= bucket:
                counts.append(counts[-1] if counts else 0)
            counts[bucket] = settled
        return [counts[0]] + [b - a for a, b in itertools.pairwise(counts)]


async def test_rush_onto_one_worker(system: System) -> None:
    """A rush from many customers at once onto one worker with slow downstreams (SMTP 150 ms,
    warehouse 250 ms), a tenth of the orders refused twice first by both, then a rush of orders
    the warehouse refuses for good. Nothing is killed or cut: no effect may be delivered twice,
    the warehouse must never hear again of an order it refused, no workflow task may time out,
    and the worker drains the backlog at a steady pace."""
    count, refused = int(size("RUSH_ORDERS", 1000)), int(size("RUSH_REFUSED", 300))
    customers = int(size("RUSH_CUSTOMERS", 32))
    async with system.stack("rush", workers=1) as stack:
        system.sinks.slow(150, 250)
        system.sinks.warehouse.flaky_skus.add(FLAKY_SKU)
        system.sinks.warehouse.poison_skus.add(POISON_SKU)
        shop = stack.client
        # A warm worker, as a rush meets in a shop already open: its first workflows import the
        # sandbox's modules.
        warm = await shop.rush(WARM_UP_ORDERS, 4)
        await wait_until_settled(system.sessions, stack.prefix, len(warm), within=60)
        curve = DrainCurve(system, stack.prefix)
        sampling = asyncio.create_task(curve.sample(len(warm) + count + refused))
        began = time.monotonic()
        placed = await shop.rush(
            count, customers, body=lambda n: flaky_order() if n % 10 == 0 else None
        )
        poisoned = await shop.rush(refused, customers, body=lambda n: refused_order())
        placing = time.monotonic() - began
        await asyncio.wait_for(sampling, timeout=600)
        figures = await stack.finish(
            injected=f"{count} orders from {customers} customers at once onto one worker, SMTP "
            "150 ms and warehouse 250 ms, every tenth refused twice first by both; then "
            f"{refused} orders the warehouse refuses (400)",
            checked="invariants; no repeated delivery; no call after a 400; no workflow task "
            "timeout; no 10 s window below half the median while work remains",
            drain_from=began,
        )
        windows = curve.windows()
        took = sorted(answer.took * 1000 for p in placed + poisoned for answer in p.answers)
        orders = [p.order_id for p in placed + poisoned if p.order_id]
        gate = asyncio.Semaphore(16)

        async def timeouts(order_id: str) -> int:
            async with gate:
                return await workflow_task_timeouts(system.client, order_id)

        timed_out = sum(await asyncio.gather(*(timeouts(order_id) for order_id in orders)))
        refused_keys = [effect_key(p.order_id, "notify_warehouse") for p in poisoned if p.order_id]
        called_again = {
            key: len(calls)
            for key in refused_keys
            if len(calls := system.sinks.warehouse.calls_for(key)) != 1
        }
        figures.extra |= {
            "placed_in_seconds": round(placing, 1),
            "accepted_ms": {
                "p50": round(took[len(took) // 2], 1),
                "p99": round(took[len(took) * 99 // 100], 1),
            },
            "settled_per_10s": windows,
            "workflow_task_timeouts": timed_out,
            "calls_after_a_400": sum(called_again.values()) - len(called_again),
        }
        stack.record(figures)
    assert figures.receipt_repeats == 0 and figures.webhook_repeats == 0
    assert not called_again, f"the warehouse heard again of orders it refused: {called_again}"
    assert timed_out == 0, f"{timed_out} workflow tasks timed out"
    busy = windows[:-1]
    assert len(busy) >= 2, windows
    assert min(busy) >= 0.5 * statistics.median(busy), f"an uneven drain: {windows}"


async def test_worker_link_to_temporal_cut(system: System) -> None:
    """One worker's link to Temporal is cut for 30 s while it holds tasks (the downstreams are
    slowed, so its attempts are in flight); the other worker takes over what times out, and the
    cut-off one takes work again once the link is back."""
    count, cut = int(size("WORKER_CUT_ORDERS", 80)), size("WORKER_CUT_SECONDS", 30)
    async with system.stack("worker_link_cut", KILLED_ATTEMPTS_ENV) as stack:
        system.sinks.slow(1000)
        shop = stack.client
        isolated = stack.workers[0]
        identity = identity_of(isolated)
        stream = asyncio.create_task(shop.stream(count, per_second=10))
        await shop.sent(count // 3)
        # The premise: the worker is running attempts when its link goes (with the downstreams
        # slowed to 1 s, each holds its claim for about that long).
        held = await wait_until(
            lambda: claimed_by(system, identity),
            within=30,
            interval=0.1,
            message="the isolated worker running attempts",
        )
        await stack.cut([isolated.temporal], cut)
        assert isolated.process.running, isolated.process.output()[-3000:]
        await stream
        system.sinks.heal()
        healed_at = time.monotonic()
        # After the cut, the worker that was cut off takes work again. Its pollers come back on
        # the SDK's reconnect backoff, not at once, so orders keep coming in rounds until one of
        # them is run by it.
        later: list[Placed] = []

        async def cut_off_worker_ran_one() -> bool:
            round_ = await shop.stream(20, per_second=20)
            later.extend(round_)
            for placed in round_:
                assert placed.order_id is not None
                await wait_for_workflow_closed(system.client, placed.order_id)
                if identity in await workflow_task_identities(system.client, placed.order_id):
                    return True
            return False

        await wait_until(
            cut_off_worker_ran_one,
            within=120,
            interval=0,
            message="the cut-off worker running a workflow task again",
        )
        back_after = time.monotonic() - healed_at
        drain_from = time.monotonic()
        figures = await stack.finish(
            injected=f"{count} + {len(later)} orders; one worker's link to Temporal cut for "
            f"{cut:g} s while it ran {len(held)} attempts; SMTP and warehouse slowed to 1 s "
            "during the cut",
            checked="invariants; the other worker finishes what timed out; the cut-off worker "
            "works again after the cut",
            drain_from=drain_from,
            extra={
                "attempts_held_at_cut": len(held),
                "cut_off_worker_back_after_s": round(back_after, 1),
            },
        )
        # What the isolated worker held was finished by the other one: its workflow tasks
        # timed out on the server, and the other worker completed them.
        other = identity_of(stack.workers[1])
        finished_elsewhere = [
            order_id
            for order_id in held
            if other in await workflow_task_identities(system.client, order_id)
        ]
    assert figures.orders == count + len(later)
    assert finished_elsewhere == held, (
        f"held at the cut {held}, finished by {other}: {finished_elsewhere}"
    )


async def claimed_by(system: System, identity: str) -> list[str]:
    """The orders whose step attempts the worker with this identity is running now."""
    now = datetime.now(UTC)
    async with system.sessions() as session:
        orders = await session.scalars(
            select(OrderStep.order_id).where(
                OrderStep.claimed_by == identity,
                OrderStep.claim_token.is_not(None),
                OrderStep.claimed_until > now,
                OrderStep.status != StepStatus.SUCCEEDED,
            )
        )
        return sorted(set(orders))


async def live_claims(system: System, identity: str) -> int:
    """How many claims the worker with this identity holds now: attempts it is running."""
    now = datetime.now(UTC)
    async with system.sessions() as session:
        held = await session.scalar(
            select(func.count())
            .select_from(OrderStep)
            .where(
                OrderStep.claimed_by == identity,
                OrderStep.claim_token.is_not(None),
                OrderStep.claimed_until > now,
                OrderStep.status != StepStatus.SUCCEEDED,
            )
        )
    return int(held or 0)


async def claims_in_flight(system: System, fault: Fault) -> int:
    """How many claims the fault interrupted: live on a worker it hit while it hit, and ended
    without an outcome (taken over once their lease ran out, or given back)."""
    async with system.sessions() as session:
        claims = (
            await session.scalars(
                select(InterruptedClaim).where(InterruptedClaim.worker.in_(fault.workers))
            )
        ).all()
    return sum(1 for claim in claims if fault.hit(claim))
