"""One step's ledger calls from inside its attempts, each guarded against an outage of our own
database: read the step before the effect, record the success the downstream accepted, or record
the failed attempt. Both side-effect activities share it, so the order of effect, record and
report (and the crash points between them) is written once."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from activities.checkpoint import AFTER_EFFECT, AFTER_RECORD, Checkpoint
from activities.retry import LedgerOutages
from core.contracts import StepInput, StepResult
from core.ledger import begin_attempt, record_failed_attempt, record_success
from core.models import Order, OrderStep
from core.states import StepOutcome


class StepLedger:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        step: str,
        outages: LedgerOutages,
        checkpoint: Checkpoint,
    ) -> None:
        self._sessions = sessions
        self._step = step
        self._outages = outages
        self._checkpoint = checkpoint

    async def begin(self, input: StepInput, attempt: int) -> tuple[Order, OrderStep]:
        with self._outages.guard(attempt, "reading the ledger"):
            return await begin_attempt(self._sessions, input, self._step, attempt)

    async def succeeded(
        self, input: StepInput, attempt: int, outcome: dict[str, Any], *, recording: str
    ) -> StepResult:
        """Records the success only now that the downstream has the effect: a crash before the
        commit performs it again on the retry, under the same key for the downstream to drop.
        `recording` names the record in the message of a database outage."""
        await self._checkpoint(AFTER_EFFECT)
        with self._outages.guard(attempt, recording):
            async with self._sessions.begin() as session:
                await record_success(session, input.order_id, self._step, attempt, outcome)
        await self._checkpoint(AFTER_RECORD)
        return StepResult(input.order_id, self._step, StepOutcome.PERFORMED)

    async def failed(self, input: StepInput, attempt: int, error: str) -> None:
        """Records the failed attempt. Call it outside the except clause of the downstream's
        error, so a database error here is not chained to it (the outage classifier follows the
        chain, and a downstream's OSError is no outage of ours). One that cannot be recorded is
        retried as the database's: the downstream did not take the effect, and the retry asks
        it again."""
        with self._outages.guard(attempt, "recording a failed attempt", error):
            await record_failed_attempt(self._sessions, input.order_id, self._step, attempt, error)
