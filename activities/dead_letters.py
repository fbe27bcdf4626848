"""Where a step that gave up is parked for a person: the dead-letter rows and their lifecycle."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from core.contracts import DeadLetterInput, DeadLetterResult, DiscardInput, DiscardResult
from core.dead_letters import close_superseded, discard_letter
from core.ledger import load_step, refresh_order_status
from core.models import DeadLetter
from core.names import RECORD_DEAD_LETTER_ACTIVITY
from core.states import DeadLetterStatus, StepStatus


class DeadLetterActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    @activity.defn(name=RECORD_DEAD_LETTER_ACTIVITY)
    async def record_dead_letter(self, input: DeadLetterInput) -> DeadLetterResult:
        try:
            async with self._sessions.begin() as session:
                _order, step = await load_step(session, input.order_id, input.step)
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
                    first_attempt_at=activity.info().scheduled_time,
                )
                session.add(letter)
                step.status = StepStatus.DEAD_LETTERED
                await session.flush()
                await close_superseded(session, letter)
                await refresh_order_status(session, input.order_id)
                return DeadLetterResult(letter.id, letter.attempts)
        except IntegrityError:
            # A redelivery of this very activity: the first delivery's row is the answer.
            async with self._sessions.begin() as session:
                existing = await session.scalar(
                    select(DeadLetter).where(
                        DeadLetter.order_id == input.order_id,
                        DeadLetter.step == input.step,
                        DeadLetter.occurrence == input.occurrence,
                    )
                )
                if existing is None:
                    raise
                return DeadLetterResult(existing.id, existing.attempts)

    @activity.defn(name="discard_dead_letter")
    async def discard_dead_letter(self, input: DiscardInput) -> DiscardResult:
        async with self._sessions.begin() as session:
            letter = await discard_letter(
                session, input.dead_letter_id, reason=input.reason, actor=input.actor
            )
            return DiscardResult(letter.id, letter.status)
