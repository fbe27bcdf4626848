"""Where a step that gave up is parked for a person: the activities that open and discard its
dead letter (the state changes themselves are core/dead_letters.py's)."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from core.contracts import DeadLetterInput, DeadLetterResult, DiscardInput, DiscardResult
from core.dead_letters import discard_letter, find_occurrence, open_letter
from core.names import RECORD_DEAD_LETTER_ACTIVITY


class DeadLetterActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    @activity.defn(name=RECORD_DEAD_LETTER_ACTIVITY)
    async def record_dead_letter(self, input: DeadLetterInput) -> DeadLetterResult:
        try:
            async with self._sessions.begin() as session:
                letter = await open_letter(
                    session, input, first_attempt_at=activity.info().scheduled_time
                )
                if letter is None:
                    return DeadLetterResult(0, 0, step_succeeded=True)
                return DeadLetterResult(letter.id, letter.attempts)
        except IntegrityError:
            # A redelivery of this very activity: the first delivery's row is the answer.
            async with self._sessions.begin() as session:
                existing = await find_occurrence(session, input)
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
