"""One step's ledger calls from inside its attempts (core/ledger.py), each guarded against an
outage of our own database: claim the step before the effect, record the success the downstream
accepted or the failure it answered, or give the claim back when the attempt ends before it."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from activities.retry import LedgerOutages
from core.contracts import StepInput
from core.ledger import (
    Claim,
    ClaimVerdict,
    claim_step,
    record_failed_attempt,
    record_success,
    release_claim,
)
from core.outages import is_database_outage

log = logging.getLogger(__name__)


class StepLedger:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        step: str,
        outages: LedgerOutages,
        worker: str,
    ) -> None:
        self._sessions = sessions
        self._step = step
        self._outages = outages
        self._worker = worker

    async def claim(self, input: StepInput, attempt: int, lease: timedelta) -> ClaimVerdict:
        with self._outages.guard(attempt, "claiming the step"):
            return await claim_step(
                self._sessions,
                input,
                self._step,
                attempt,
                lease=lease,
                worker=self._worker,
                ended=self._outages.ended_here,
                unanswered=self._outages.left_behind,
            )

    async def succeeded(
        self, input: StepInput, attempt: int, claim: Claim, outcome: dict[str, Any], recording: str
    ) -> None:
        """`recording` names the record in the message of a database outage; the retry then
        finds the claim expired, and performs the effect again under the same key."""
        with self._outages.guard(attempt, recording):
            async with self._sessions.begin() as session:
                await record_success(session, input.order_id, self._step, attempt, outcome, claim)

    async def failed(
        self,
        input: StepInput,
        attempt: int,
        claim: Claim,
        *,
        error: str,
        error_type: str,
        permanent: bool,
    ) -> None:
        """Records the failed attempt. Call it outside the except clause of the downstream's
        error, so a database error here is not chained to it (the outage classifier follows the
        chain, and a downstream's OSError is no outage of ours). One that cannot be recorded is
        retried as the database's: the downstream did not take the effect, and the retry asks
        it again once the claim has expired."""
        with self._outages.guard(attempt, "recording a failed attempt", error):
            await record_failed_attempt(
                self._sessions,
                input.order_id,
                self._step,
                attempt,
                claim,
                error=error,
                error_type=error_type,
                permanent=permanent,
            )

    async def release(self, input: StepInput, claim: Claim, *, sent: bool) -> None:
        """Gives the claim back, as far as the database lets it (`sent`: the run may have
        reached the downstream, so the claim is kept among the interrupted ones). One that
        cannot be given back expires with its lease, which only delays the next attempt. Never
        raises: it runs while another error is on its way out."""
        try:
            await release_claim(self._sessions, input.order_id, self._step, claim, sent=sent)
        except Exception as failure:
            # The next attempt in this process takes it over at once; elsewhere it waits out
            # the lease.
            self._outages.left_behind(claim.token, claim.until)
            # The outage itself is said once per burst by whoever met it first.
            level = logging.DEBUG if is_database_outage(failure) else logging.WARNING
            log.log(
                level,
                "could not give back the claim of %s for order %s; it expires at %s: %s",
                self._step,
                input.order_id,
                claim.until.isoformat(timespec="seconds"),
                failure,
            )
