"""The worker's admission (core/admission.py): slots beyond the minimum only while the event
loop keeps up, never beyond the maximum, and the room the relay reads."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, cast

import pytest
from temporalio.worker import SlotMarkUsedContext, SlotPermit, SlotReleaseContext

from core import admission
from core.admission import LagGatedSlots, LoopLag, WorkerLoad
from tests.support import wait_until

NO_CONTEXT: Any = None


@dataclass
class Used:
    permit: SlotPermit
    slot_info: object = None


def slots(lag: float, *, minimum: int = 2, maximum: int = 5) -> tuple[LagGatedSlots, LoopLag]:
    probe = LoopLag()
    probe.seconds = lag
    return LagGatedSlots(probe, minimum=minimum, maximum=maximum, target_lag=0.05), probe


@pytest.fixture(autouse=True)
def no_ramp(monkeypatch: pytest.MonkeyPatch) -> None:
    # The ramp spaces out slots in time; these tests look at the counts.
    monkeypatch.setattr(admission, "RAMP_SECONDS", 0.0)


def take(supplier: LagGatedSlots, n: int) -> list[SlotPermit]:
    permits = [supplier.try_reserve_slot(NO_CONTEXT) for _ in range(n)]
    return [permit for permit in permits if permit is not None]


def use(supplier: LagGatedSlots, permit: SlotPermit) -> None:
    supplier.mark_slot_used(cast(SlotMarkUsedContext, Used(permit)))


def release(supplier: LagGatedSlots, permit: SlotPermit) -> None:
    supplier.release_slot(cast(SlotReleaseContext, Used(permit)))


def test_a_loop_that_keeps_up_gets_every_slot_up_to_the_maximum() -> None:
    supplier, _ = slots(lag=0.001)
    assert len(take(supplier, 10)) == 5
    assert supplier.issued == 5


def test_a_lagging_loop_gets_the_minimum_only() -> None:
    supplier, _ = slots(lag=0.2)
    assert len(take(supplier, 10)) == 2


def test_slots_come_back_when_the_lag_falls_and_tasks_finish() -> None:
    supplier, probe = slots(lag=0.2)
    first = take(supplier, 10)
    for permit in first:
        use(supplier, permit)
    assert supplier.room() == 0
    probe.seconds = 0.001
    assert supplier.room() == 3
    more = take(supplier, 10)
    assert len(more) == 3
    for permit in first:
        release(supplier, permit)
    assert supplier.issued == 3
    assert supplier.used == 0


def test_the_room_counts_running_tasks_not_waiting_pollers() -> None:
    """A poller holds a permit while it waits for a task: the relay may still start work."""
    supplier, _ = slots(lag=0.001)
    pollers = take(supplier, 3)
    assert supplier.room() == 5
    use(supplier, pollers[0])
    assert supplier.room() == 4
    release(supplier, pollers[1])  # never used: a poller that went away
    assert (supplier.issued, supplier.used) == (2, 1)


def test_the_lag_follows_a_rise_at_once_and_a_fall_slowly() -> None:
    probe = LoopLag()
    probe.observe(0.3)
    assert probe.seconds == 0.3
    probe.observe(0.0)
    assert 0.2 < probe.seconds < 0.3


async def test_a_waiting_reservation_is_granted_when_a_slot_is_released() -> None:
    supplier, _ = slots(lag=0.001, minimum=1, maximum=1)
    [held] = take(supplier, 1)
    waiting = asyncio.create_task(supplier.reserve_slot(NO_CONTEXT))
    await asyncio.sleep(0)  # lets the reservation run until it waits
    assert not waiting.done()
    release(supplier, held)
    granted = await asyncio.wait_for(waiting, timeout=5)
    assert isinstance(granted, SlotPermit)


async def test_the_probe_measures_a_blocked_loop() -> None:
    load = WorkerLoad(target_lag=0.05, max_workflow_tasks=4, max_activities=4)
    load.lag.ensure_running()
    try:
        await asyncio.sleep(2 * admission.PROBE_SECONDS)
        busy_until = time.perf_counter() + 0.2
        while time.perf_counter() < busy_until:  # the loop busy, as a saturated worker's is
            pass
        await wait_until(lambda: load.lag.seconds > 0.1, within=5, message="lag measured")
        assert load.room() == 2
    finally:
        load.stop()
