"""A bulk redrive's side effects, for RedriveWorkflow: finding the letters it takes, sending one
parked order's workflow its `retry_step`, and reading how the redriven letters ended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from core.dead_letters import (
    CommandRejected,
    DeadLetterFilter,
    DeadLetterNotFound,
    DeadLetterOperator,
    get_dead_letter,
)
from core.models import DeadLetter, DeadLetterResolution, DeadLetterStatus
from core.redrives import (
    Outcomes,
    OutcomesInput,
    Page,
    PageInput,
    RedriveFilter,
    SendInput,
    SendResult,
    Snapshot,
    SnapshotInput,
    retry_update_id,
)

CLOSED = (DeadLetterStatus.RESOLVED, DeadLetterStatus.DISCARDED)
# A send heartbeats this often, so that one whose worker died is retried after the workflow's
# heartbeat timeout rather than after its whole start-to-close timeout.
HEARTBEAT_EVERY_SECONDS = 1.0


@asynccontextmanager
async def _heartbeating() -> AsyncIterator[None]:
    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(HEARTBEAT_EVERY_SECONDS)

    beating = asyncio.create_task(beat())
    try:
        yield
    finally:
        beating.cancel()


def _open_matching(where: RedriveFilter, query: Select[DeadLetter]) -> Select[DeadLetter]:
    query = DeadLetterFilter(
        status=DeadLetterStatus.OPEN, step=where.step, error_type=where.error_type
    ).apply(query)
    if where.order_ids:
        query = query.where(DeadLetter.order_id.in_(where.order_ids))
    return query


class RedriveActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], client: Client) -> None:
        self._sessions = sessions
        self._client = client

    @activity.defn(name="snapshot_redrive")
    async def snapshot_redrive(self, input: SnapshotInput) -> Snapshot:
        """How many open letters match now, and the highest ID among those the redrive takes."""
        async with self._sessions() as session:
            matching = _open_matching(input.filter, select(DeadLetter))
            if input.limit is not None:
                last = await session.scalar(
                    matching.with_only_columns(DeadLetter.id)
                    .order_by(DeadLetter.id)
                    .offset(input.limit - 1)
                    .limit(1)
                )
                if last is not None:
                    return Snapshot(total=input.limit, last_id=last)
            total, last_id = (
                await session.execute(
                    matching.with_only_columns(func.count(), func.max(DeadLetter.id)).order_by(None)
                )
            ).one()
            return Snapshot(total=int(total or 0), last_id=int(last_id or 0))

    @activity.defn(name="list_redrive_page")
    async def list_redrive_page(self, input: PageInput) -> Page:
        """The next letters still open, oldest first, after `after_id` up to `last_id`."""
        async with self._sessions() as session:
            ids = await session.scalars(
                _open_matching(input.filter, select(DeadLetter))
                .with_only_columns(DeadLetter.id)
                .where(DeadLetter.id > input.after_id, DeadLetter.id <= input.last_id)
                .order_by(DeadLetter.id)
                .limit(input.size)
            )
            return Page(list(ids))

    @activity.defn(name="send_redrive_retry")
    async def send_redrive_retry(self, input: SendInput) -> SendResult:
        """Sends the letter's order workflow `retry_step`, named by the redrive and the letter.
        A letter no longer open, or one its workflow refuses (a retry is already pending, it is
        not the parked occurrence, the workflow closed), is skipped: the workflow's validator is
        what makes a second send harmless. A retried attempt first looks in the order's history
        for its own update, and otherwise sends it again whatever the letter's row says: an
        attempt that died after sending may have left the update in flight and the letter
        `retrying` or even `resolved` (the step runs in the very workflow task that accepts the
        update), and the repeat, taken as the same update, is then answered as accepted."""
        update_id = retry_update_id(input.redrive_id, input.dead_letter_id)
        repeat = activity.info().attempt > 1
        async with _heartbeating():
            if repeat and await self._accepted(input.dead_letter_id, update_id):
                return SendResult(sent=True)
            try:
                await DeadLetterOperator(self._sessions, self._client).retry(
                    input.dead_letter_id, update_id=update_id, require_open=not repeat
                )
            except (CommandRejected, DeadLetterNotFound) as refused:
                return SendResult(sent=False, reason=str(refused))
        return SendResult(sent=True)

    @activity.defn(name="redrive_outcomes")
    async def redrive_outcomes(self, input: OutcomesInput) -> Outcomes:
        """Which of these redriven letters have closed, and how."""
        async with self._sessions() as session:
            rows = (
                await session.execute(
                    select(DeadLetter.id, DeadLetter.resolution).where(
                        DeadLetter.id.in_(input.dead_letter_ids), DeadLetter.status.in_(CLOSED)
                    )
                )
            ).all()
        resolved = sorted(i for i, how in rows if how == DeadLetterResolution.SUCCEEDED)
        # Closed any other way, the redrive did not fix it: a new occurrence or a discard took over.
        failed_again = sorted(i for i, how in rows if how != DeadLetterResolution.SUCCEEDED)
        return Outcomes(resolved=resolved, failed_again=failed_again)

    async def _accepted(self, dead_letter_id: int, update_id: str) -> bool:
        try:
            async with self._sessions() as session:
                letter = await get_dead_letter(session, dead_letter_id)
        except DeadLetterNotFound:
            return False  # the send says so, as a skip
        handle = self._client.get_workflow_handle(letter.workflow_id, run_id=letter.run_id)
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
                accepted = event.workflow_execution_update_accepted_event_attributes
                if accepted.accepted_request.meta.update_id == update_id:
                    return True
        return False
