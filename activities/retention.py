"""The retention cleanup as an activity, for the schedule's RetentionWorkflow."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from core.models import utcnow
from core.retention import Purged, RetentionInput, purge_expired


class RetentionActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    @activity.defn(name="purge_expired")
    async def purge_expired(self, input: RetentionInput) -> Purged:
        """Deletes what expired by now. Idempotent: a retry finds less, or nothing, to delete."""
        return await purge_expired(self._sessions, input, now=utcnow())
