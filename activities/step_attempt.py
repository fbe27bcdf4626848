"""One attempt of a step, the same for every step: claim the step, perform the effect only while
holding the claim, record what the downstream said, and answer Temporal. A step supplies its
effect alone (`StepEffect`): how to prepare it from the order, and how to perform it with its
failures classified. Adding a step is writing one of those.

The order of the moves is the guarantee, so it lives here once:
- the claim comes before anything leaves the process; a run that finds another run's live claim
  waits for its outcome instead of repeating the effect (`StepClaimed`, retried once the claim's
  lease has run out), and a second run of an attempt whose failure is on record answers with it;
- a run that ends without an outcome to record (an error, a cancel) gives its claim back (kept
  among the interrupted claims); only a process that dies leaves its claim to expire with the
  lease, and the attempt that takes it over keeps it there;
- once the effect is sent, the send and its record run to the end even when the attempt is
  cancelled meanwhile (a cancel waits for them): success is recorded only after the downstream
  accepted the effect, and always once it did;
- a failure is recorded, with the claim given back, before it is raised."""

from __future__ import annotations

import asyncio
import os
import socket
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.checkpoint import AFTER_EFFECT, AFTER_RECORD, BEFORE_EFFECT, Checkpoint
from activities.metrics import side_effect_timer
from activities.retry import (
    MIN_RETRY_DELAY_SECONDS,
    STEP_CLAIMED,
    Backoff,
    LedgerOutages,
    permanent,
    step_attempt,
)
from activities.step_ledger import StepLedger
from core.contracts import StepInput, StepResult
from core.ledger import (
    CLAIM_LEASE_MARGIN,
    AlreadyDone,
    AlreadyRecorded,
    Claim,
    HeldElsewhere,
    attempt_key,
)
from core.models import Order, utcnow
from core.states import StepOutcome

Prepared = TypeVar("Prepared")
_HOST = socket.gethostname()


def worker_identity() -> str:
    """The SDK's default worker identity, pid@host: what Temporal records on the tasks."""
    return f"{os.getpid()}@{_HOST}"


class StepRefused(Exception):
    """The downstream failed the effect. `failure` is what Temporal gets (retryable with its
    delay, or permanent); raise it from the downstream's own error."""

    def __init__(self, failure: ApplicationError) -> None:
        super().__init__(failure.message)
        self.failure = failure


class StepEffect(Protocol[Prepared]):
    step: str

    def prepare(self, order: Order, token: str) -> Prepared | None:
        """The effect for this order, carrying the claim's token; None when there is none to
        perform (the order was cancelled)."""
        ...

    async def perform(self, prepared: Prepared, attempt: int) -> dict[str, Any]:
        """Performs it; returns what the downstream said, for the ledger. Raises StepRefused."""
        ...


class StepAttempts(Generic[Prepared]):
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        effect: StepEffect[Prepared],
        backoff: Backoff,
        outages: LedgerOutages,
        checkpoint: Checkpoint,
        *,
        attempt_timeout: timedelta,
    ) -> None:
        self._effect = effect
        self._step = effect.step
        self._backoff = backoff
        self._checkpoint = checkpoint
        self._attempt_timeout = attempt_timeout
        self._ledger = StepLedger(sessions, effect.step, outages, worker_identity())

    async def run(self, input: StepInput) -> StepResult:
        attempt = step_attempt(input)
        verdict = await self._ledger.claim(input, attempt, self._lease())
        if isinstance(verdict, AlreadyDone):
            return StepResult(input.order_id, self._step, StepOutcome.ALREADY_DONE)
        if isinstance(verdict, AlreadyRecorded):
            raise self._as_recorded(verdict, attempt)
        if isinstance(verdict, HeldElsewhere):
            raise step_claimed(self._step, input, attempt, verdict)
        claim = verdict.claim
        run = _Run()
        try:
            prepared = self._effect.prepare(verdict.order, claim.token)
            if prepared is None:
                run.recorded = True
                await asyncio.shield(self._ledger.release(input, claim, sent=False))
                return StepResult(input.order_id, self._step, StepOutcome.SKIPPED)
            await self._checkpoint(BEFORE_EFFECT)
            run.sending = True
            return await _seen_through(
                asyncio.ensure_future(self._send(input, attempt, claim, prepared, run))
            )
        except BaseException:
            # Whatever ended this run (an error, a cancel) before it recorded an outcome, it no
            # longer runs: its claim is given back rather than left to expire. Only a process
            # that dies (or loses its database) leaves a claim to its lease.
            if not run.recorded:
                await asyncio.shield(self._ledger.release(input, claim, sent=run.sending))
            raise

    async def _send(
        self, input: StepInput, attempt: int, claim: Claim, prepared: Prepared, run: _Run
    ) -> StepResult:
        """Performs the effect and records what the downstream said: one piece, which a cancel
        does not cut (`_seen_through`)."""
        try:
            with side_effect_timer(self._step):
                outcome = await self._effect.perform(prepared, attempt)
        except StepRefused as refused:
            failed = refused
        else:
            # A crash from here until the record is the window that remains: the retry finds
            # the claim expired and performs the effect again, under the same key.
            await self._checkpoint(AFTER_EFFECT)
            await self._ledger.succeeded(
                input, attempt, claim, outcome, recording=f"recording {self._step}"
            )
            run.recorded = True
            await self._checkpoint(AFTER_RECORD)
            return StepResult(input.order_id, self._step, StepOutcome.PERFORMED)
        # Recorded after the except clause (see StepLedger.failed), raised from its cause.
        failure = failed.failure
        await self._ledger.failed(
            input,
            attempt,
            claim,
            error=failure.message,
            error_type=failure.type or type(failure).__name__,
            permanent=failure.non_retryable,
        )
        run.recorded = True
        raise failure from failed.__cause__

    def _lease(self) -> timedelta:
        """As long as this attempt may run, and a margin: its start-to-close timeout."""
        timeout = activity.info().start_to_close_timeout or self._attempt_timeout
        return timeout + CLAIM_LEASE_MARGIN

    def _as_recorded(self, recorded: AlreadyRecorded, attempt: int) -> ApplicationError:
        activity.logger.info(
            "this attempt ran before and failed; answering as it did, without calling the "
            "downstream again",
            extra={"attempt": attempt, "error_type": recorded.error_type},
        )
        if recorded.permanent:
            return permanent(recorded.error, error_type=recorded.error_type)
        return self._backoff.retryable(
            recorded.error, error_type=recorded.error_type, attempt=attempt
        )


@dataclass
class _Run:
    """How far one run of an attempt got: whether it began sending, and whether its outcome is
    recorded (its claim given back with it)."""

    sending: bool = False
    recorded: bool = False


async def _seen_through(send: asyncio.Future[StepResult]) -> StepResult:
    """Awaits a send that has begun. A cancel (the attempt's timeout, the workflow task that ran
    it timing out, the worker stopping) does not cut it: the downstream may have taken the effect
    already, and only its answer, recorded, lets the next run answer with it instead of sending
    again (a cut send gave its claim back, and the next run sent the effect a second time). The
    send ends within its downstream's own timeout; then the cancel goes on."""
    try:
        return await asyncio.shield(send)
    except asyncio.CancelledError:
        while not send.done():
            with suppress(asyncio.CancelledError):
                await asyncio.wait([send])
        if not send.cancelled():
            send.exception()  # retrieved: the cancel is what this run ends with
        raise


def step_claimed(
    step: str, input: StepInput, attempt: int, held: HeldElsewhere
) -> ApplicationError:
    """Another run holds the step: retried once its claim has run out, by when it has recorded
    the effect (the retry finds the step done), failed (the retry performs it), or died. Its
    details carry the step attempt, for the workflow to go on counting from there."""
    wait = max((held.until - utcnow()).total_seconds(), MIN_RETRY_DELAY_SECONDS)
    return ApplicationError(
        f"{step} is held by attempt {held.attempt} (claim {held.token}) until "
        f"{held.until.isoformat(timespec='seconds')}; attempt {attempt_key(input, attempt)} "
        "waits for its outcome",
        attempt,
        type=STEP_CLAIMED,
        next_retry_delay=timedelta(seconds=wait),
        category=ApplicationErrorCategory.BENIGN,
    )
