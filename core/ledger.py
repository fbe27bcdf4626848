"""The per-step ledger every side effect shares. An attempt **claims** its step before the
effect with one compare-and-set write, which wins only if the step is not done, its outcome not
on record and no other attempt's claim live (the step is read first only when that write finds
it otherwise, to say why or to take over an expired claim); it performs
the effect only while holding the claim, and records what the downstream said after it. A claim
is a lease (the attempt's start-to-close timeout plus a margin): a claim whose holder died is
taken over once its lease has run out, so at-least-once holds after a crash. The claim stays on
the step's row; a claim that ended without recording an outcome (taken over, or given back by a
run cut short) is kept in `interrupted_claims`, the evidence of the one window that remains."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, bindparam, case, insert, null, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.contracts import StepInput
from core.db import read_session
from core.dead_letters import mark_retrying, resolve_redriven
from core.models import InterruptedClaim, Order, OrderStep, StepStatus, utcnow
from core.order_status import refresh_order_status
from core.states import ClaimEnd

# A claim outlives the attempt's start-to-close timeout by this much: the time a run that the SDK
# cancelled at its timeout may still take to record what it did, and clocks a little apart.
CLAIM_LEASE_MARGIN = timedelta(seconds=5)
# A claim lost to a concurrent write is read and tried again this many times.
CLAIM_ROUNDS = 3

_TIME = OrderStep.updated_at.type


@dataclass(frozen=True)
class Claim:
    token: str
    # Which attempt holds it (attempt_key), on which worker (pid@host).
    attempt: str
    worker: str
    at: datetime
    until: datetime


@dataclass(frozen=True)
class Claimed:
    """This attempt holds the step: it may perform the effect."""

    order: Order
    claim: Claim


@dataclass(frozen=True)
class AlreadyDone:
    """An earlier attempt performed the effect and recorded it."""


@dataclass(frozen=True)
class AlreadyRecorded:
    """A first run of this very attempt (a local attempt whose workflow task timed out) already
    failed; its failure is the answer, and the downstream is not asked again."""

    error: str
    error_type: str
    permanent: bool


@dataclass(frozen=True)
class HeldElsewhere:
    """Another run holds a live claim: it may be performing the effect right now."""

    attempt: str | None
    token: str | None
    until: datetime


ClaimVerdict = Claimed | AlreadyDone | AlreadyRecorded | HeldElsewhere


# The statements every step attempt runs, built once: building a statement costs more CPU than
# running it (SQLAlchemy caches the compiled form, not the construction). Their parameters are
# named b_* so that none is mistaken for a column to SET.
STEP_ROW = select(OrderStep).where(
    OrderStep.order_id == bindparam("b_order_id"), OrderStep.step == bindparam("b_step")
)
ORDER_ROW = select(Order).where(Order.id == bindparam("b_order_id"))
THIS_STEP = (
    OrderStep.order_id == bindparam("b_order_id"),
    OrderStep.step == bindparam("b_step"),
)
# The compare-and-set: won only if the step is as the attempt read it (not done, the same claim
# or none) and this attempt's outcome is not on record.
CLAIM_STEP = (
    update(OrderStep)
    .where(
        *THIS_STEP,
        OrderStep.status != StepStatus.SUCCEEDED,
        OrderStep.claim_token.is_not_distinct_from(bindparam("b_seen_token", type_=String)),
        or_(
            OrderStep.recorded_attempt.is_(None),
            OrderStep.recorded_attempt != bindparam("b_attempt_key"),
        ),
    )
    .values(
        claim_token=bindparam("b_token"),
        claim_attempt=bindparam("b_attempt_key"),
        claimed_by=bindparam("b_worker"),
        claimed_at=bindparam("b_now", type_=_TIME),
        claimed_until=bindparam("b_until", type_=_TIME),
        updated_at=bindparam("b_now", type_=_TIME),
    )
)
KEEP_INTERRUPTED = insert(InterruptedClaim)


def _unless_taken_over(column: Any) -> Any:
    """The claim column cleared if this attempt still holds the claim; kept if another attempt
    took it over after this one's lease ran out."""
    return case((OrderStep.claim_token == bindparam("b_token"), null()), else_=column)


RELEASE_CLAIM = (
    update(OrderStep)
    .where(*THIS_STEP, OrderStep.claim_token == bindparam("b_token"))
    .values(claim_token=None, claimed_until=None)
)
ATTEMPT_FAILED = (
    update(OrderStep)
    .where(*THIS_STEP)
    .values(
        attempts=OrderStep.attempts + 1,
        occurrence_attempts=bindparam("b_attempt"),
        last_error=bindparam("b_error"),
        last_error_type=bindparam("b_error_type"),
        last_error_permanent=bindparam("b_permanent"),
        recorded_attempt=bindparam("b_attempt_key"),
        updated_at=bindparam("b_now", type_=_TIME),
        claim_token=_unless_taken_over(OrderStep.claim_token),
        claimed_until=_unless_taken_over(OrderStep.claimed_until),
    )
)
# The claim stays on the row: it names the attempt that recorded the effect (or the one that
# took over from it, whose own record follows).
STEP_SUCCEEDED = (
    update(OrderStep)
    .where(*THIS_STEP)
    .values(
        status=StepStatus.SUCCEEDED,
        attempts=OrderStep.attempts + 1,
        occurrence_attempts=bindparam("b_attempt"),
        outcome=bindparam("b_outcome", type_=OrderStep.outcome.type),
        succeeded_at=bindparam("b_now", type_=_TIME),
        updated_at=bindparam("b_now", type_=_TIME),
        recorded_attempt=bindparam("b_attempt_key"),
    )
)
# A step has an open or retrying dead letter only while its row says dead_lettered (the letter
# and that status are written in one transaction): any other row has none to resolve.
FIRST_SUCCESS = STEP_SUCCEEDED.where(OrderStep.status != StepStatus.DEAD_LETTERED)


# The header each effect carries with its claim's token, so a receiver's log (and the system
# suite) can tell which attempt delivered it.
ATTEMPT_HEADER = "X-Orderflow-Attempt"


def effect_key(order_id: str, step: str) -> str:
    """The stable key a downstream uses to drop a repeat of the same effect."""
    return f"{order_id}:{step}"


def attempt_key(input: StepInput, attempt: int) -> str:
    """Which attempt of the step this is: its number within its occurrence, and the occurrence
    (the dead letter a redrive retries, 0 for the first), so a redrive's attempt 1 is not the
    first run's."""
    return f"{input.redrive_of or 0}.{attempt}"


async def load_step(session: AsyncSession, order_id: str, step: str) -> OrderStep:
    row = await session.scalar(STEP_ROW, {"b_order_id": order_id, "b_step": step})
    if row is None:
        raise LookupError(f"order {order_id} has no step {step}")
    return row


async def claim_step(
    sessions: async_sessionmaker[AsyncSession],
    input: StepInput,
    step: str,
    attempt: int,
    *,
    lease: timedelta,
    worker: str,
    ended: Callable[[str], bool] = lambda _token: False,
    unanswered: Callable[[str, datetime], None] = lambda _token, _until: None,
) -> ClaimVerdict:
    """What every step attempt does first: claims the step for `lease` if nobody holds it (the
    usual case, so it is tried without reading first), then reads the order; otherwise reads the
    step and says why it cannot, or claims it over what it read. A
    live claim counts as held unless `ended` knows its run is over (it ended in this process
    without the database to give it back). A claim whose write got no answer may have been
    taken all the same: it is passed to `unanswered` before the error goes on, so that `ended`
    knows it. A redrive's first attempt also marks its dead letter `retrying`."""
    key = attempt_key(input, attempt)
    seen: OrderStep | None = None
    for _ in range(CLAIM_ROUNDS):
        now = utcnow()
        claim = Claim(uuid.uuid4().hex, key, worker, now, now + lease)
        try:
            won = await _take_claim(sessions, input, step, attempt, claim, seen)
            # Read after the claim's commit, not inside it: on SQLite the claim holds the file's
            # one write lock, which the API's intake waits for (with this read under the lock a
            # rush's 202 p50 was 2.1 times its floor; docs/benchmark-notes.md, seventh round).
            order = await _read_order(sessions, input.order_id) if won else None
        except Exception:
            # The commit may have landed with its answer lost on the way back, or the read after
            # it failed: without this the claim would hold the step, unknown to anyone, until
            # its lease ran out.
            unanswered(claim.token, claim.until)
            raise
        if order is not None:
            return Claimed(order, claim)
        # Done, on record, held, or written since it was read: read it (read-only, so on SQLite
        # this neither waits for writers nor holds them up) and say which.
        async with read_session(sessions) as session:
            seen = await load_step(session, input.order_id, step)
        if seen.status == StepStatus.SUCCEEDED:
            return AlreadyDone()
        if seen.recorded_attempt == key:
            return AlreadyRecorded(
                seen.last_error or "",
                seen.last_error_type or "StepFailed",
                seen.last_error_permanent,
            )
        token, until = seen.claim_token, seen.claimed_until
        if token is not None and until is not None and until > utcnow() and not ended(token):
            return HeldElsewhere(seen.claim_attempt, token, until)
    return HeldElsewhere(None, None, utcnow())


async def _take_claim(
    sessions: async_sessionmaker[AsyncSession],
    input: StepInput,
    step: str,
    attempt: int,
    claim: Claim,
    seen: OrderStep | None,
) -> bool:
    """The compare-and-set of `claim` over the step as `seen` read it (None: held by nobody);
    whether it won."""
    async with sessions.begin() as session:
        won = await _execute(
            session,
            CLAIM_STEP,
            {
                "b_order_id": input.order_id,
                "b_step": step,
                "b_seen_token": seen.claim_token if seen is not None else None,
                "b_token": claim.token,
                "b_attempt_key": claim.attempt,
                "b_worker": claim.worker,
                "b_now": claim.at,
                "b_until": claim.until,
            },
        )
        if won != 1:
            return False
        if input.redrive_of is not None and attempt == 1:
            await mark_retrying(session, input.redrive_of)
        if seen is not None and seen.claim_token is not None:
            # Its lease ran out without an outcome: it may have sent the effect.
            await _keep_interrupted(session, seen, ClaimEnd.TAKEN_OVER, claim.at)
        return True


async def _read_order(sessions: async_sessionmaker[AsyncSession], order_id: str) -> Order:
    async with read_session(sessions) as session:
        order = await session.scalar(ORDER_ROW, {"b_order_id": order_id})
    if order is None:
        raise LookupError(f"order {order_id} does not exist")
    return order


async def release_claim(
    sessions: async_sessionmaker[AsyncSession],
    order_id: str,
    step: str,
    claim: Claim,
    *,
    sent: bool,
) -> None:
    """Gives the claim back: the attempt's run ended without an outcome to record. One whose
    run may have reached the downstream (`sent`) is kept among the interrupted claims, unless
    another attempt took it over already (and kept it)."""
    now = utcnow()
    async with sessions.begin() as session:
        released = await _execute(
            session,
            RELEASE_CLAIM,
            {"b_order_id": order_id, "b_step": step, "b_token": claim.token},
        )
        if sent and released == 1:
            await _execute(
                session,
                KEEP_INTERRUPTED,
                {
                    "token": claim.token,
                    "order_id": order_id,
                    "step": step,
                    "attempt": claim.attempt,
                    "worker": claim.worker,
                    "claimed_at": claim.at,
                    "claimed_until": claim.until,
                    "ended": ClaimEnd.RELEASED,
                    "ended_at": now,
                },
            )


async def _keep_interrupted(
    session: AsyncSession, row: OrderStep, ended: ClaimEnd, now: datetime
) -> None:
    await _execute(
        session,
        KEEP_INTERRUPTED,
        {
            "token": row.claim_token,
            "order_id": row.order_id,
            "step": row.step,
            "attempt": row.claim_attempt or "",
            "worker": row.claimed_by or "",
            "claimed_at": row.claimed_at or now,
            "claimed_until": row.claimed_until or now,
            "ended": ended,
            "ended_at": now,
        },
    )


async def record_failed_attempt(
    sessions: async_sessionmaker[AsyncSession],
    order_id: str,
    step: str,
    attempt: int,
    claim: Claim,
    *,
    error: str,
    error_type: str,
    permanent: bool,
) -> None:
    """The downstream refused or could not be reached: the attempt is counted, its failure kept
    for a second run of it to answer with, and its claim given back."""
    async with sessions.begin() as session:
        await _execute(
            session,
            ATTEMPT_FAILED,
            {
                "b_order_id": order_id,
                "b_step": step,
                "b_attempt": attempt,
                "b_attempt_key": claim.attempt,
                "b_error": error[:2000],
                "b_error_type": error_type[:200],
                "b_permanent": permanent,
                "b_token": claim.token,
                "b_now": utcnow(),
            },
        )


async def record_success(
    session: AsyncSession,
    order_id: str,
    step: str,
    attempt: int,
    outcome: dict[str, Any],
    claim: Claim | None = None,
) -> None:
    """Records the effect the downstream accepted, whether or not `claim` is still live: a run
    that performed the effect always says so."""
    now = utcnow()
    params = {
        "b_order_id": order_id,
        "b_step": step,
        "b_attempt": attempt,
        "b_attempt_key": claim.attempt if claim is not None else None,
        "b_outcome": outcome,
        "b_now": now,
    }
    # A first-time success has no dead letter to resolve, which spares a statement.
    if await _execute(session, FIRST_SUCCESS, params) != 1:
        await _execute(session, STEP_SUCCEEDED, params)
        await resolve_redriven(session, order_id, step, now)
    await refresh_order_status(session, order_id)


async def _execute(session: AsyncSession, statement: Any, params: dict[str, Any]) -> int:
    """Runs one of the statements above on the session's connection, as Core: no object in the
    session holds these rows, and the ORM's execution path (its compile state, the rows'
    synchronisation) cost more CPU than the statement itself (docs/benchmark-notes.md, seventh
    round). Returns the rows it matched."""
    connection = await session.connection()
    result = await connection.execute(statement, params)
    return int(result.rowcount)
