"""How much work one worker process takes on: no more than it finishes well inside Temporal's
workflow task timeout. Past what the machine can do, every task a worker takes only makes all of
them slower, until they outlive the workflow task timeout and the server hands them out again
(measured under a rush on two cores: 100 workflow tasks in flight held their slots 4-5 s each
and 1,000 of them logged "duration exceeded 5 seconds"; 16 held theirs 0.5-1 s, at the same
throughput, and none did).

Two bounds, one per slot kind (workflow tasks, activities):
- a fixed maximum (WORKER_MAX_CONCURRENT_WORKFLOW_TASKS, WORKER_MAX_CONCURRENT_ACTIVITIES);
- the worker's own event loop: beyond a small minimum, a slot is handed out only while the loop's
  lag (how late it wakes a probe that asked to sleep a fixed time) is under
  WORKER_LOOP_LAG_TARGET_SECONDS. That is this process's saturation, whatever else runs on the
  machine: the SDK's resource-based tuner reads the whole machine's CPU, which one saturated
  Python process on a machine with idle cores leaves low.

The relay reads the same state (`room`), so in outbox mode new orders wait in the outbox, where
they cost nothing, while the worker's slots are full."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from contextlib import suppress

from temporalio.common import MetricGaugeFloat, MetricMeter
from temporalio.worker import (
    CustomSlotSupplier,
    FixedSizeSlotSupplier,
    SlotMarkUsedContext,
    SlotPermit,
    SlotReleaseContext,
    SlotReserveContext,
    WorkerTuner,
)

from core.metrics import LOOP_LAG_METRIC
from core.settings import Settings

# How often the probe measures the loop's lag.
PROBE_SECONDS = 0.025
# The lag follows a rise at once and a fall over a few probes, so one quiet probe in a busy
# stretch does not open the gate.
LAG_DECAY = 0.8
# After the minimum, at most one more slot per this long: a task takes a moment to load the
# loop, and the lag must see it before the next one is handed out.
RAMP_SECONDS = 0.01
# A workflow task runs at most its two steps' first attempts at once.
LOCAL_ACTIVITIES_PER_WORKFLOW_TASK = 2


class LoopLag:
    """The event loop's lag, smoothed: how much later than asked the loop runs a callback. The
    probe is a callback that reschedules itself, started by the first slot request (there is a
    loop then), so a worker built anywhere measures its own loop with nothing to clean up."""

    def __init__(self, gauge: MetricGaugeFloat | None = None) -> None:
        self.seconds = 0.0
        self._asked = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._gauge = gauge

    def ensure_running(self) -> None:
        if self._handle is None:
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._asked = time.perf_counter()
        self._handle = loop.call_later(PROBE_SECONDS, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.observe(time.perf_counter() - self._asked - PROBE_SECONDS)
        if self._gauge is not None:
            self._gauge.set(self.seconds)
        self._schedule(loop)

    def observe(self, lag: float) -> None:
        lag = max(lag, 0.0)
        if lag >= self.seconds:
            self.seconds = lag
        else:
            self.seconds = self.seconds * LAG_DECAY + lag * (1 - LAG_DECAY)


class LagGatedSlots(CustomSlotSupplier):
    """Slots for one kind of task: `minimum` always, up to `maximum` while the loop's lag is
    under `target_lag` seconds. `issued` counts the permits out (a poller holds one while it
    waits for a task), `used` the tasks running."""

    def __init__(self, lag: LoopLag, *, minimum: int, maximum: int, target_lag: float) -> None:
        self._lag = lag
        self._minimum = min(minimum, maximum)
        self.maximum = maximum
        self._target = target_lag
        self.issued = 0
        self.used = 0
        self._last_issue = 0.0
        # The SDK calls try_reserve_slot, mark_slot_used and release_slot from its own threads,
        # reserve_slot on the worker's event loop: the counts are guarded, and a release wakes
        # the waiters on the loop.
        self._lock = threading.Lock()
        self._released = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def lagging(self) -> bool:
        return self._lag.seconds >= self._target

    def room(self) -> int:
        """How many more tasks this kind would run now."""
        if self.lagging:
            return max(self._minimum - self.used, 0)
        return max(self.maximum - self.used, 0)

    def _try_issue(self) -> SlotPermit | None:
        with self._lock:
            if self.issued >= self._minimum and (
                self.issued >= self.maximum
                or self.lagging
                or time.monotonic() - self._last_issue < RAMP_SECONDS
            ):
                return None
            self.issued += 1
            self._last_issue = time.monotonic()
        return SlotPermit()

    async def reserve_slot(self, ctx: SlotReserveContext) -> SlotPermit:
        self._loop = asyncio.get_running_loop()
        self._lag.ensure_running()
        while (permit := self._try_issue()) is None:
            self._released.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), PROBE_SECONDS)
        return permit

    def try_reserve_slot(self, ctx: SlotReserveContext) -> SlotPermit | None:
        return self._try_issue()

    def mark_slot_used(self, ctx: SlotMarkUsedContext) -> None:
        with self._lock:
            self.used += 1
        # Read back in release_slot: a permit released unused was a poller's.
        ctx.permit.used = True  # type: ignore[attr-defined]

    def release_slot(self, ctx: SlotReleaseContext) -> None:
        with self._lock:
            self.issued = max(self.issued - 1, 0)
            if getattr(ctx.permit, "used", False):
                self.used = max(self.used - 1, 0)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._released.set)


class WorkerLoad:
    """One worker process's admission: the slots it runs with and the lag that gates them."""

    def __init__(
        self,
        *,
        target_lag: float,
        max_workflow_tasks: int,
        max_activities: int,
        min_workflow_tasks: int = 2,
        min_activities: int = 1,
        meter: MetricMeter | None = None,
    ) -> None:
        gauge = (
            meter.create_gauge_float(
                LOOP_LAG_METRIC, "How late the worker's event loop runs (smoothed).", "s"
            )
            if meter is not None
            else None
        )
        self.lag = LoopLag(gauge)
        self.workflow_tasks = LagGatedSlots(
            self.lag, minimum=min_workflow_tasks, maximum=max_workflow_tasks, target_lag=target_lag
        )
        self.activities = LagGatedSlots(
            self.lag, minimum=min_activities, maximum=max_activities, target_lag=target_lag
        )

    @classmethod
    def from_settings(cls, settings: Settings, meter: MetricMeter | None = None) -> WorkerLoad:
        """`meter` (the worker runtime's) serves the loop's lag as a gauge."""
        return cls(
            # 0 turns the lag gate off: the maxima alone bound the slots.
            target_lag=settings.WORKER_LOOP_LAG_TARGET_SECONDS or math.inf,
            max_workflow_tasks=settings.WORKER_MAX_CONCURRENT_WORKFLOW_TASKS,
            max_activities=settings.WORKER_MAX_CONCURRENT_ACTIVITIES,
            meter=meter,
        )

    def room(self) -> int:
        """How many more workflow tasks the worker would run now: what the relay may start."""
        return self.workflow_tasks.room()

    def tuner(self) -> WorkerTuner:
        return WorkerTuner.create_composite(
            workflow_supplier=self.workflow_tasks,
            activity_supplier=self.activities,
            # Only admitted workflow tasks run local activities: bounded by their slots.
            local_activity_supplier=FixedSizeSlotSupplier(
                LOCAL_ACTIVITIES_PER_WORKFLOW_TASK * self.workflow_tasks.maximum
            ),
            nexus_supplier=FixedSizeSlotSupplier(1),
        )

    def stop(self) -> None:
        self.lag.stop()
