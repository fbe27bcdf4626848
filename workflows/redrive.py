"""RedriveWorkflow: a bulk redrive of open dead letters, paced with durable timers, pausable,
resumable and cancellable, that outlives the process that started it and any worker restart.

It reads the letters a page at a time and continues as new before its history grows long, so
what it holds and records stays bounded however many letters match. A letter is redriven at
most once: its `retry_step` update is named by the redrive and the letter (Temporal takes a
repeat as the same update) and the order's workflow refuses a retry of a letter that is not its
parked occurrence or already has a retry pending; a send that died after reaching the order is
counted once because its retry finds its own update in the order's history.

No `from __future__ import annotations` here: the SDK reads the handlers' type hints."""

import asyncio
import contextlib
from dataclasses import replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.redrive import RedriveActivities
    from core.redrives import (
        CANCEL,
        CANCELLED,
        FINISHED,
        LISTING,
        PAUSE,
        PAUSED,
        PROGRESS_QUERY,
        REDRIVE_WORKFLOW,
        RESUME,
        SENDING,
        WAITING,
        OutcomesInput,
        PageInput,
        RedriveCarry,
        RedriveCounts,
        RedriveFilter,
        RedriveInput,
        RedriveProgress,
        SendInput,
        SendResult,
        SnapshotInput,
        describe_filter,
    )

# Reads of the dead-letter table: a database outage is waited out, as the order's bookkeeping does.
READ_TIMEOUT = timedelta(seconds=30)
READ_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=0,
)
# One send waits up to DeadLetterOperator's command timeout for a worker to take the update; it
# heartbeats meanwhile, so a send whose worker died is retried within SEND_HEARTBEAT.
SEND_TIMEOUT = timedelta(seconds=60)
SEND_HEARTBEAT = timedelta(seconds=5)
# A send no worker confirms after these attempts (minutes) is counted as skipped, with why.
SEND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=10,
)
# While sending, how often the outcomes of the letters already sent are read.
OUTCOMES_EVERY = timedelta(seconds=5)
# After the last send, the outcomes are read again after 1 s, 2 s, ... up to this.
OUTCOMES_WAIT_MAX = timedelta(seconds=30)
SKIPS_SHOWN = 5
# How far behind its schedule a redrive may catch up (sends back to back) before it starts the
# schedule afresh: an occasional slow send is made up for, a pause or an outage is not.
CATCH_UP = timedelta(seconds=2)


@workflow.defn(name=REDRIVE_WORKFLOW)
class RedriveWorkflow:
    def __init__(self) -> None:
        # Replaced by the run's input before any handler can run.
        self._input = RedriveInput(RedriveFilter(), per_second=1.0)
        self._phase = LISTING
        self._counts = RedriveCounts()
        self._pending: list[int] = []
        self._paused = False
        self._cancelled = False
        self._over = False
        self._started_at = 0.0
        self._finished_at: float | None = None
        self._next_due = 0.0
        self._cursor = 0
        self._last_id = 0
        self._last_skips: list[str] = []
        self._outcomes_read_at = 0.0

    @workflow.run
    async def run(self, input: RedriveInput) -> RedriveProgress:
        self._input = input
        if input.carried is None:
            self._started_at = _now()
            self._publish()
            snapshot = await workflow.execute_activity_method(
                RedriveActivities.snapshot_redrive,
                SnapshotInput(input.filter, input.limit),
                start_to_close_timeout=READ_TIMEOUT,
                retry_policy=READ_RETRY,
                summary="find the letters to redrive",
            )
            self._counts = RedriveCounts(total=snapshot.total)
            self._last_id = snapshot.last_id
        else:
            self._restore(input.carried)
        try:
            await self._send_all()
            await self._await_outcomes()
        except asyncio.CancelledError:
            # A Temporal cancellation (Web UI, `temporal workflow cancel`): as the update does.
            self._cancelled = True
        self._finish()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.progress()

    @workflow.query(name=PROGRESS_QUERY)
    def progress(self) -> RedriveProgress:
        counts = self._counts
        return RedriveProgress(
            redrive_id=workflow.info().workflow_id,
            state=self._state(),
            total=counts.total,
            sent=counts.sent,
            resolved=counts.resolved,
            failed_again=counts.failed_again,
            skipped=counts.skipped,
            per_second=self._input.per_second,
            filter=self._input.filter,
            started_at=self._started_at,
            finished_at=self._finished_at,
            last_skips=list(self._last_skips),
        )

    @workflow.update(name=PAUSE)
    def pause(self) -> RedriveProgress:
        self._paused = True
        self._publish()
        return self.progress()

    @workflow.update(name=RESUME)
    def resume(self) -> RedriveProgress:
        self._paused = False
        self._publish()
        return self.progress()

    @workflow.update(name=CANCEL)
    def cancel(self) -> RedriveProgress:
        self._cancelled = True
        self._publish()
        return self.progress()

    @pause.validator
    def _validate_pause(self) -> None:
        self._require_running(PAUSE)

    @resume.validator
    def _validate_resume(self) -> None:
        self._require_running(RESUME)

    @cancel.validator
    def _validate_cancel(self) -> None:
        self._require_running(CANCEL)

    def _require_running(self, command: str) -> None:
        if self._over or self._cancelled:
            raise ValueError(f"the redrive is {self._state()}; nothing to {command}")

    async def _send_all(self) -> None:
        while not self._cancelled:
            page = await workflow.execute_activity_method(
                RedriveActivities.list_redrive_page,
                PageInput(self._input.filter, self._cursor, self._last_id, self._input.page_size),
                start_to_close_timeout=READ_TIMEOUT,
                retry_policy=READ_RETRY,
                summary=f"letters after {self._cursor}",
            )
            if not page.dead_letter_ids:
                return
            for dead_letter_id in page.dead_letter_ids:
                if not await self._wait_for_turn():
                    return
                self._record(dead_letter_id, await self._send(dead_letter_id))
                if (
                    self._pending
                    and _now() - self._outcomes_read_at >= OUTCOMES_EVERY.total_seconds()
                ):
                    await self._read_outcomes()
                self._continue_as_new_if_long()

    async def _wait_for_turn(self) -> bool:
        """Waits until the next send is due at the redrive's pace and it is not paused; False
        once it is cancelled. The n-th send is due (n-1)/per_second after the first, so the
        time a send takes does not slow the pace; a redrive that fell more than CATCH_UP behind
        (paused, or no worker for a while) starts its schedule afresh instead of making up for
        it in a burst."""
        interval = 1.0 / self._input.per_second
        while not self._cancelled:
            if self._paused:
                self._publish()
                await workflow.wait_condition(lambda: not self._paused or self._cancelled)
                continue
            self._set_phase(SENDING)
            now = _now()
            if now >= self._next_due:
                due = self._next_due if now - self._next_due < CATCH_UP.total_seconds() else now
                self._next_due = due + interval
                return True
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._paused or self._cancelled,
                    timeout=timedelta(seconds=self._next_due - now),
                    timeout_summary="the redrive's pace",
                )
        return False

    async def _send(self, dead_letter_id: int) -> SendResult:
        sending = asyncio.create_task(
            workflow.execute_activity_method(
                RedriveActivities.send_redrive_retry,
                SendInput(workflow.info().workflow_id, dead_letter_id),
                start_to_close_timeout=SEND_TIMEOUT,
                heartbeat_timeout=SEND_HEARTBEAT,
                retry_policy=SEND_RETRY,
                summary=f"retry_step for dead letter {dead_letter_id}",
            )
        )
        try:
            try:
                return await asyncio.shield(sending)
            except asyncio.CancelledError:
                # Cancelled mid-send: the update may already be with the order, so the send is
                # seen through and counted before the redrive stops.
                self._cancelled = True
                return await sending
        except ActivityError as failure:
            cause = failure.cause or failure
            return SendResult(sent=False, reason=f"not confirmed: {cause}")

    def _record(self, dead_letter_id: int, result: SendResult) -> None:
        self._cursor = dead_letter_id
        if result.sent:
            self._counts = replace(self._counts, sent=self._counts.sent + 1)
            self._pending.append(dead_letter_id)
        else:
            self._counts = replace(self._counts, skipped=self._counts.skipped + 1)
            self._skip_note(f"dead letter {dead_letter_id}: {result.reason}")
        self._publish()

    async def _read_outcomes(self) -> None:
        outcomes = await workflow.execute_activity_method(
            RedriveActivities.redrive_outcomes,
            OutcomesInput(list(self._pending)),
            start_to_close_timeout=READ_TIMEOUT,
            retry_policy=READ_RETRY,
            summary=f"outcomes of {len(self._pending)} redriven letter(s)",
        )
        self._outcomes_read_at = _now()
        settled = {*outcomes.resolved, *outcomes.failed_again}
        if not settled:
            return
        self._pending = [i for i in self._pending if i not in settled]
        self._counts = replace(
            self._counts,
            resolved=self._counts.resolved + len(outcomes.resolved),
            failed_again=self._counts.failed_again + len(outcomes.failed_again),
        )
        self._publish()

    async def _await_outcomes(self) -> None:
        wait = timedelta(seconds=1)
        while self._pending and not self._cancelled:
            self._set_phase(WAITING)
            await self._read_outcomes()
            if not self._pending:
                return
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._cancelled,
                    timeout=wait,
                    timeout_summary="outcomes of the redriven letters",
                )
            wait = min(wait * 2, OUTCOMES_WAIT_MAX)
            self._continue_as_new_if_long()

    def _continue_as_new_if_long(self) -> None:
        info = workflow.info()
        if self._cancelled or not (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._input.continue_after_events
        ):
            return
        # The update handlers are synchronous: none can be half done here.
        workflow.continue_as_new(
            replace(
                self._input,
                carried=RedriveCarry(
                    cursor=self._cursor,
                    last_id=self._last_id,
                    counts=self._counts,
                    pending=list(self._pending),
                    paused=self._paused,
                    started_at=self._started_at,
                    next_due=self._next_due,
                    last_skips=list(self._last_skips),
                ),
            )
        )

    def _restore(self, carried: RedriveCarry) -> None:
        self._cursor = carried.cursor
        self._last_id = carried.last_id
        self._counts = carried.counts
        self._pending = list(carried.pending)
        self._paused = carried.paused
        self._started_at = carried.started_at
        self._next_due = carried.next_due
        self._last_skips = list(carried.last_skips)
        self._phase = SENDING

    def _finish(self) -> None:
        counts = self._counts
        if not self._cancelled:
            # Letters that matched at the start but were closed (retried or discarded by
            # someone else) before their turn never reached a send: they count as skipped.
            unreached = counts.total - counts.sent - counts.skipped
            if unreached > 0:
                self._skip_note(f"{unreached} letter(s) were no longer open when their turn came")
            counts = replace(counts, skipped=counts.skipped + max(unreached, 0))
        # A letter opened just before the start, committed after it (IDs are not commit order).
        counts = replace(counts, total=max(counts.total, counts.sent + counts.skipped))
        self._counts = counts
        self._over = True
        self._finished_at = _now()
        self._publish()

    def _skip_note(self, note: str) -> None:
        self._last_skips = [*self._last_skips, note[:300]][-SKIPS_SHOWN:]

    def _set_phase(self, phase: str) -> None:
        if phase != self._phase:
            self._phase = phase
            self._publish()

    def _state(self) -> str:
        if self._over or self._cancelled:
            return CANCELLED if self._cancelled else FINISHED
        if self._paused and self._phase != WAITING:
            return PAUSED
        return self._phase

    def _publish(self) -> None:
        workflow.set_current_details(self._details())

    def _details(self) -> str:
        """Markdown for the Web UI's "Current Details": how far the redrive is, how to steer it."""
        counts, state = self._counts, self._state()
        redrive_id = workflow.info().workflow_id
        lines = [
            f"## Redrive {state.replace('_', ' ')}: {counts.sent} of {counts.total} sent",
            "",
            "| total | sent | resolved | failed again | skipped |",
            "|---:|---:|---:|---:|---:|",
            f"| {counts.total} | {counts.sent} | {counts.resolved} | {counts.failed_again} "
            f"| {counts.skipped} |",
            "",
            f"{describe_filter(self._input.filter)}, at most {self._input.per_second:g} a second.",
            "",
        ]
        if state == PAUSED:
            lines += [
                f"Paused: resume with the update `resume` (`orderflow dlq redrive resume "
                f"{redrive_id}`).",
                "",
            ]
        elif state not in (FINISHED, CANCELLED):
            lines += [
                "Steer it with the updates `pause`, `resume` and `cancel` (More Actions → Send "
                f"an Update), or `orderflow dlq redrive pause|resume|cancel {redrive_id}`.",
                "",
            ]
        if self._last_skips:
            lines += ["Last skipped:", "", *(f"- {note}" for note in self._last_skips), ""]
        return "\n".join(lines)


def _now() -> float:
    return workflow.now().timestamp()
