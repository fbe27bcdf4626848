"""The operator's side of dead letters: list them, and ask an order's workflow to retry or discard
a parked step. The API, the CLI and the review page all go through here."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError

from core.contracts import DiscardStepInput, RetryStepInput, StepCommandResult
from core.ledger import mark_redrive_started
from core.models import DeadLetter, DeadLetterStatus


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


class DeadLetterOperator:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], client: Client) -> None:
        self._sessions = sessions
        self._client = client

    async def retry(self, dead_letter_id: int) -> DeadLetter:
        letter = await self._open_letter(dead_letter_id)
        await self._send(letter, "retry_step", RetryStepInput(letter.step))
        async with self._sessions.begin() as session:
            await mark_redrive_started(session, letter.id)
            return await get_dead_letter(session, letter.id)

    async def discard(self, dead_letter_id: int, reason: str, actor: str) -> DeadLetter:
        letter = await self._open_letter(dead_letter_id)
        await self._send(letter, "discard_step", DiscardStepInput(letter.step, reason, actor))
        async with self._sessions() as session:
            return await get_dead_letter(session, letter.id)

    async def retry_matching(
        self, where: DeadLetterFilter, *, per_second: float, limit: int
    ) -> list[int]:
        """Redrives the open dead letters that match, paced so a receiver that just recovered is
        not hit by the whole backlog at once."""
        async with self._sessions() as session:
            letters, _total = await list_dead_letters(
                session,
                DeadLetterFilter(
                    status=DeadLetterStatus.OPEN,
                    step=where.step,
                    order_id=where.order_id,
                    error_type=where.error_type,
                ),
                limit=limit,
                offset=0,
            )
        retried: list[int] = []
        interval = 1.0 / per_second
        for index, letter in enumerate(letters):
            if index:
                await asyncio.sleep(interval)
            try:
                await self.retry(letter.id)
            except CommandRejected:
                continue
            retried.append(letter.id)
        return retried

    async def _open_letter(self, dead_letter_id: int) -> DeadLetter:
        async with self._sessions() as session:
            letter = await get_dead_letter(session, dead_letter_id)
        if letter.status != DeadLetterStatus.OPEN:
            raise CommandRejected(f"dead letter {dead_letter_id} is {letter.status}, not open")
        return letter

    async def _send(
        self, letter: DeadLetter, update: str, argument: RetryStepInput | DiscardStepInput
    ) -> StepCommandResult:
        handle = self._client.get_workflow_handle(letter.workflow_id)
        try:
            result: StepCommandResult = await handle.execute_update(
                update, argument, result_type=StepCommandResult
            )
            return result
        except WorkflowUpdateFailedError as failure:
            reason = failure.cause.message if hasattr(failure.cause, "message") else failure
            raise CommandRejected(f"workflow refused {update}: {reason}") from failure
        except RPCError as failure:
            raise CommandRejected(
                f"workflow {letter.workflow_id} cannot take {update}: {failure.message}"
            ) from failure
