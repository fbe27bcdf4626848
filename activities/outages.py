"""Our own database being down during a bookkeeping activity (opening or discarding a dead letter,
recording a cancel, a redrive's reads, the cleanup's purge): retried under the activity's policy
like any failure, but said once per outage burst instead of a traceback per attempt.

The step activities turn an outage into a DatabaseUnavailable themselves (`LedgerOutages`), with
the attempt number and backoff the workflow counts on; this interceptor leaves their errors, and
every other ApplicationError, as they are. It sets no retry delay: a bookkeeping activity's own
RetryPolicy decides when it runs again."""

from __future__ import annotations

import logging
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from activities.retry import database_unavailable
from core.outages import DATABASE, OutageLog, is_database_outage

BOOKKEEPING_OUTAGE_MEANWHILE = "the workflows' bookkeeping waits for it and is retried"

log = logging.getLogger(__name__)


def bookkeeping_outage_log() -> OutageLog:
    return OutageLog(DATABASE, log, meanwhile=BOOKKEEPING_OUTAGE_MEANWHILE)


class DatabaseOutageInterceptor(Interceptor):
    """Turns a database outage that escapes an activity into a retryable, benign
    DatabaseUnavailable, logged once per burst on `outage`. The burst ends where the process's
    engine runs a statement again (`core.outages.watch_database`), not at the next activity
    that succeeds: some activities never touch the database."""

    def __init__(self, outage: OutageLog) -> None:
        self.outage = outage

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _DatabaseOutageInbound(next, self.outage)


class _DatabaseOutageInbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, outage: OutageLog) -> None:
        super().__init__(next)
        self._outage = outage

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except ApplicationError:
            # Already says what it is (a step's DatabaseUnavailable carries its attempt).
            raise
        except Exception as error:
            if not is_database_outage(error):
                raise
            self._outage.failed(error)
            message = (
                f"database unavailable during {activity.info().activity_type}: "
                f"{type(error).__name__}: {error}"
            )
            raise database_unavailable(message) from None
