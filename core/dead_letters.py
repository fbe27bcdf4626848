"""Dead letters: every change of a letter's state, and the operator's side (list them, and ask
an order's workflow to retry or discard a parked step). The workflow's activities, the ledger,
the cancel, the API, the CLI and the review page all go through here.

Lifecycle of one occurrence (one row): `open` -> `retrying` -> `resolved`, or `open` ->
`discarded`. `resolution` says how it closed: `succeeded` (its redrive worked), `failed_again`
(its redrive gave up too, so the workflow opened the next occurrence, `occurrence + 1`, and this
one is closed as resolved: its own handling is over and the problem lives on in the new row) or
`discarded`. So at most one occurrence per order and step is ever active, and none stays
`retrying` after its redrive ended."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError

from core.contracts import DeadLetterInput, DiscardStepInput, RetryStepInput, StepCommandResult
from core.models import (
    DeadLetter,
    DeadLetterResolution,
    DeadLetterStatus,
    OrderStep,
    StepStatus,
    utcnow,
)
from core.names import DISCARD_STEP_UPDATE, RETRY_STEP_UPDATE
from core.order_status import refresh_order_status, set_step_status
from core.outages import is_temporal_outage
from core.temporal import ensure_server_reachable, temporal_unavailable

# The states in which a letter still waits for its step to be settled.
ACTIVE_DEAD_LETTER = (DeadLetterStatus.OPEN, DeadLetterStatus.RETRYING)


class DeadLetterNotFound(LookupError):
    pass


class CommandRejected(Exception):
    """The dead letter cannot take this command now (not open, or its workflow refused it)."""


@dataclass(frozen=True)
class DeadLetterFilter:
    status: str | None = None
    step: str | None = None
    order_id: str | None = None
    error_type: str | None = None

    def apply(self, query: Select[DeadLetter]) -> Select[DeadLetter]:
        if self.status:
            query = query.where(DeadLetter.status == self.status)
        if self.step:
            query = query.where(DeadLetter.step == self.step)
        if self.order_id:
            query = query.where(DeadLetter.order_id == self.order_id)
        if self.error_type:
            query = query.where(DeadLetter.error_type == self.error_type)
        return query


async def list_dead_letters(
    session: AsyncSession, where: DeadLetterFilter, *, limit: int, offset: int
) -> tuple[Sequence[DeadLetter], int]:
    rows = (
        await session.scalars(
            where.apply(select(DeadLetter)).order_by(DeadLetter.id).limit(limit).offset(offset)
        )
    ).all()
    total = await session.scalar(
        where.apply(select(DeadLetter)).with_only_columns(func.count()).order_by(None)
    )
    return rows, int(total or 0)


async def get_dead_letter(session: AsyncSession, dead_letter_id: int) -> DeadLetter:
    letter = await session.get(DeadLetter, dead_letter_id)
    if letter is None:
        raise DeadLetterNotFound(f"dead letter {dead_letter_id} not found")
    return letter


async def open_letter(
    session: AsyncSession, input: DeadLetterInput, *, first_attempt_at: datetime
) -> DeadLetter | None:
    """Parks the step: a new occurrence opens, the step becomes `dead_lettered`, and the earlier
    occurrences are closed as superseded. A repeat of the same occurrence raises IntegrityError.

    None when the step succeeded after all: an attempt that outlived the step's time budget can
    still have performed and recorded the effect before its dead letter is written, and parking
    the step then would have a retry perform it again. The step's row is locked first, so a
    success committing meanwhile is either seen here or waits for the letter (and then resolves
    it)."""
    step = await session.get(OrderStep, (input.order_id, input.step), with_for_update=True)
    if step is None:
        raise LookupError(f"order {input.order_id} has no step {input.step}")
    if step.status == StepStatus.SUCCEEDED:
        return None
    letter = DeadLetter(
        order_id=input.order_id,
        step=input.step,
        occurrence=input.occurrence,
        status=DeadLetterStatus.OPEN,
        error_type=input.error_type[:200],
        error_message=input.error_message[:4000],
        permanent=input.permanent,
        attempts=step.occurrence_attempts,
        workflow_id=input.workflow_id,
        run_id=input.run_id,
        first_attempt_at=first_attempt_at,
    )
    session.add(letter)
    step.status = StepStatus.DEAD_LETTERED
    await session.flush()
    await close_superseded(session, letter)
    await refresh_order_status(session, input.order_id)
    return letter


async def find_occurrence(session: AsyncSession, input: DeadLetterInput) -> DeadLetter | None:
    return await session.scalar(
        select(DeadLetter).where(
            DeadLetter.order_id == input.order_id,
            DeadLetter.step == input.step,
            DeadLetter.occurrence == input.occurrence,
        )
    )


async def mark_retrying(session: AsyncSession, dead_letter_id: int) -> None:
    """An operator's retry was taken, or its redrive's first attempt began: whichever comes
    first wins, and a letter the redrive already resolved is left alone (only `open` moves)."""
    await session.execute(
        update(DeadLetter)
        .where(DeadLetter.id == dead_letter_id, DeadLetter.status == DeadLetterStatus.OPEN)
        .values(status=DeadLetterStatus.RETRYING, updated_at=utcnow())
    )


async def resolve_redriven(
    session: AsyncSession, order_id: str, step: str, now: datetime | None = None
) -> None:
    """The step succeeded after it was parked: its active letter is resolved as `succeeded`."""
    await _resolve_active(session, order_id, step, DeadLetterResolution.SUCCEEDED, now=now)


async def close_superseded(session: AsyncSession, newest: DeadLetter) -> None:
    """Closes the earlier occurrences of the same order and step once a new one is recorded: their
    redrive ended in this new failure, so they must not stay `retrying` (or `open`) forever."""
    await _resolve_active(
        session,
        newest.order_id,
        newest.step,
        DeadLetterResolution.FAILED_AGAIN,
        before_occurrence=newest.occurrence,
    )


async def _resolve_active(
    session: AsyncSession,
    order_id: str,
    step: str,
    resolution: DeadLetterResolution,
    *,
    before_occurrence: int | None = None,
    now: datetime | None = None,
) -> None:
    now = now or utcnow()
    query = update(DeadLetter).where(
        DeadLetter.order_id == order_id,
        DeadLetter.step == step,
        DeadLetter.status.in_(ACTIVE_DEAD_LETTER),
    )
    if before_occurrence is not None:
        query = query.where(DeadLetter.occurrence < before_occurrence)
    await session.execute(
        query.values(
            status=DeadLetterStatus.RESOLVED, resolution=resolution, resolved_at=now, updated_at=now
        ),
        # No letter this matches is held by the session (a new occurrence is not one of the
        # earlier ones), so matching the rows in Python would be wasted work.
        execution_options={"synchronize_session": False},
    )


async def discard_letter(
    session: AsyncSession, dead_letter_id: int, *, reason: str, actor: str
) -> DeadLetter:
    """Records that a person gave up on the occurrence (idempotent), and settles its step."""
    letter = await session.get(DeadLetter, dead_letter_id, with_for_update=True)
    if letter is None:
        raise DeadLetterNotFound(f"dead letter {dead_letter_id} not found")
    if letter.status != DeadLetterStatus.DISCARDED:
        now = utcnow()
        letter.status = DeadLetterStatus.DISCARDED
        letter.resolution = DeadLetterResolution.DISCARDED
        letter.discarded_by = actor[:200]
        letter.discard_reason = reason[:2000]
        letter.resolved_at = now
        letter.updated_at = now
        step = await session.get(OrderStep, (letter.order_id, letter.step))
        if step is not None and step.status == StepStatus.DEAD_LETTERED:
            await set_step_status(session, letter.order_id, letter.step, StepStatus.DISCARDED)
    return letter


async def discard_active(
    session: AsyncSession, order_id: str, steps: Sequence[str], *, reason: str, actor: str
) -> None:
    """Discards every active letter of the order's `steps` (a cancel ends their handling)."""
    active = (
        await session.scalars(
            select(DeadLetter.id).where(
                DeadLetter.order_id == order_id,
                DeadLetter.step.in_(steps),
                DeadLetter.status.in_(ACTIVE_DEAD_LETTER),
            )
        )
    ).all()
    for dead_letter_id in active:
        await discard_letter(session, dead_letter_id, reason=reason, actor=actor)


class CommandUnconfirmed(Exception):
    """No worker took the command in time; the workflow may still apply it once one polls."""

    def __init__(self, command: str, dead_letter_id: int, waited_seconds: float) -> None:
        super().__init__(
            f"{command} of dead letter {dead_letter_id} not confirmed within "
            f"{waited_seconds:g} s: is a worker running? The workflow may still take it when one "
            "is back; check the dead letter before trying again."
        )


# An update is answered by a worker; with none polling, the caller is told instead of waiting.
# Read when an operator is made, so a test can shorten it.
COMMAND_TIMEOUT_SECONDS = 15.0


# After a command went unanswered: how long to ask whether the server itself is there.
class DeadLetterOperator:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], client: Client) -> None:
        self._sessions = sessions
        self._client = client

    async def retry(
        self, dead_letter_id: int, *, update_id: str | None = None, require_open: bool = True
    ) -> DeadLetter:
        """`update_id` names the update, so that sending it again (a bulk redrive's retried
        send) is taken by Temporal as the same update rather than a second one. Such a repeat
        passes `require_open=False`: its first send may have run the step already (the letter
        reads `retrying` or `resolved`) while the update itself is still in flight, and only
        the workflow can tell that from a letter someone else retried (which it refuses)."""
        if require_open:
            letter = await self._open_letter(dead_letter_id)
        else:
            async with self._sessions() as session:
                letter = await get_dead_letter(session, dead_letter_id)
        await self._send(
            letter, RETRY_STEP_UPDATE, RetryStepInput(letter.step, letter.id), update_id=update_id
        )
        async with self._sessions.begin() as session:
            # The redrive's first attempt marks it too; mark_retrying says who wins.
            await mark_retrying(session, letter.id)
            return await get_dead_letter(session, letter.id)

    async def discard(self, dead_letter_id: int, reason: str, actor: str) -> DeadLetter:
        letter = await self._open_letter(dead_letter_id)
        if not reason.strip():
            raise CommandRejected("a discard needs a reason")
        if not await self._workflow_running(letter):
            # The workflow stopped waiting (park timeout): nobody else can settle this letter,
            # so the operator's decision is recorded directly.
            async with self._sessions.begin() as session:
                await discard_letter(session, letter.id, reason=reason, actor=actor)
        else:
            await self._send(
                letter, DISCARD_STEP_UPDATE, DiscardStepInput(letter.step, reason, actor, letter.id)
            )
        async with self._sessions() as session:
            return await get_dead_letter(session, letter.id)

    async def _open_letter(self, dead_letter_id: int) -> DeadLetter:
        async with self._sessions() as session:
            letter = await get_dead_letter(session, dead_letter_id)
        if letter.status != DeadLetterStatus.OPEN:
            raise CommandRejected(f"dead letter {dead_letter_id} is {letter.status}, not open")
        return letter

    async def _workflow_running(self, letter: DeadLetter) -> bool:
        try:
            described = await self._client.get_workflow_handle(letter.workflow_id).describe()
        except Exception as failure:
            if is_temporal_outage(failure):
                raise temporal_unavailable(failure) from failure
            if not isinstance(failure, RPCError):
                raise
            raise CommandRejected(
                f"workflow {letter.workflow_id} cannot be reached: {failure.message}"
            ) from failure
        return described.status == WorkflowExecutionStatus.RUNNING

    async def _send(
        self,
        letter: DeadLetter,
        update: str,
        argument: RetryStepInput | DiscardStepInput,
        *,
        update_id: str | None = None,
    ) -> StepCommandResult:
        handle = self._client.get_workflow_handle(letter.workflow_id)
        timeout = COMMAND_TIMEOUT_SECONDS
        try:
            async with asyncio.timeout(timeout):
                result: StepCommandResult = await handle.execute_update(
                    update, argument, id=update_id, result_type=StepCommandResult
                )
            return result
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as silence:
            await ensure_server_reachable(self._client, silence)
            command = "Retry" if isinstance(argument, RetryStepInput) else "Discard"
            raise CommandUnconfirmed(command, letter.id, timeout) from silence
        except WorkflowUpdateFailedError as failure:
            cause = failure.cause
            reason = getattr(cause, "message", None) or str(cause)
            raise CommandRejected(f"workflow refused {update}: {reason}") from failure
        except Exception as failure:
            if is_temporal_outage(failure):
                raise temporal_unavailable(failure) from failure
            if not isinstance(failure, RPCError):
                raise
            if not await self._workflow_running(letter):
                raise CommandRejected(
                    f"order {letter.order_id}'s workflow has closed (it stopped waiting after "
                    f"PARK_TIMEOUT_SECONDS); dead letter {letter.id} can only be discarded now"
                ) from failure
            raise CommandRejected(
                f"workflow {letter.workflow_id} cannot take {update}: {failure.message}"
            ) from failure
