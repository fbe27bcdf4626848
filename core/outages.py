"""Telling a dependency outage (the database or Temporal cannot be reached) from a bug, and
logging it once per burst: the first failure is a warning, the ones after it are only counted,
and the first success after them says how many there were. An outage is expected and temporary;
a traceback per request would bury whatever else the log has to say."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.service import RPCError, RPCStatusCode

DATABASE = "database"
TEMPORAL = "temporal"
# What a client is told to wait before trying again when nothing better is known.
RETRY_AFTER_SECONDS = 1

# What a database outage surfaces as: SQLAlchemy's wrappers of the driver's errors, its pool
# timeout, and the driver's own errors where SQLAlchemy passes them through (asyncpg raises the
# socket's OSError straight out of connect). The server's own "not now" answers count too: out of
# connections or resources (53xxx), starting up or shutting down, a cancelled statement (57xxx).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.DBAPIError,
    sa_exc.TimeoutError,
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
)
# Statuses with which Temporal says "not now" rather than "no".
TEMPORAL_OUTAGE_STATUSES = frozenset({RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED})
# A lazy client that never reached its server raises this from the SDK's bridge.
TEMPORAL_CONNECT_FAILURE = "Failed client connect"
# A call that outlived its own rpc_timeout: the bridge answers CANCELLED with this message. The
# server did not say no; it did not answer in time, which is what an overloaded one does.
TEMPORAL_CALL_TIMED_OUT = "Timeout expired"

log = logging.getLogger(__name__)


class DependencyUnavailable(Exception):
    """The request cannot be served until `dependency` is back; answered 503 + Retry-After."""

    def __init__(
        self, dependency: str, detail: str, retry_after: int = RETRY_AFTER_SECONDS
    ) -> None:
        super().__init__(detail)
        self.dependency = dependency
        self.detail = detail
        self.retry_after = max(1, retry_after)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        # SQLAlchemy keeps the driver's error as `orig`, and raises from it.
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__


def is_database_outage(error: BaseException) -> bool:
    """The database could not be reached or dropped the connection; not a query that is wrong."""
    for cause in _chain(error):
        if isinstance(cause, sa_exc.DBAPIError):
            if cause.connection_invalidated or isinstance(
                cause, sa_exc.OperationalError | sa_exc.InterfaceError
            ):
                return True
            continue
        if isinstance(cause, DATABASE_ERRORS):
            return True
    return False


def is_temporal_outage(error: BaseException) -> bool:
    for cause in _chain(error):
        if isinstance(cause, RPCError) and cause.status in TEMPORAL_OUTAGE_STATUSES:
            return True
        if (
            isinstance(cause, RPCError)
            and cause.status == RPCStatusCode.CANCELLED
            and cause.message == TEMPORAL_CALL_TIMED_OUT
        ):
            return True
        if isinstance(cause, RuntimeError) and str(cause).startswith(TEMPORAL_CONNECT_FAILURE):
            return True
    return False


def retry_after_until(deadline: float) -> int:
    """Whole seconds from now until `deadline` (time.time()), at least one."""
    return max(RETRY_AFTER_SECONDS, math.ceil(deadline - time.time()))


class OutageLog:
    """One dependency's outage bursts in one process."""

    def __init__(
        self,
        dependency: str,
        logger: logging.Logger | None = None,
        *,
        meanwhile: str = "answering 503 until it is back",
    ) -> None:
        self.dependency = dependency
        self._log = logger or log
        self._meanwhile = meanwhile
        self.failures = 0
        self._since = 0.0

    @property
    def ongoing(self) -> bool:
        return self.failures > 0

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        if self.failures == 1:
            self._since = time.monotonic()
            self._log.warning(
                "%s unavailable (%s: %s); %s",
                self.dependency,
                type(error).__name__,
                str(error)[:300],
                self._meanwhile,
                extra={"dependency": self.dependency},
            )

    def succeeded(self) -> None:
        if not self.failures:
            return
        failures, self.failures = self.failures, 0
        self._log.warning(
            "%s recovered after %d failures in %.1f s",
            self.dependency,
            failures,
            time.monotonic() - self._since,
            extra={"dependency": self.dependency, "failures": failures},
        )


def watch_database(engine: AsyncEngine, outage: OutageLog) -> None:
    """Ends `outage`'s burst at the first statement that runs again."""

    @event.listens_for(engine.sync_engine, "after_cursor_execute")
    def _ran(*_args: Any) -> None:
        if outage.failures:
            outage.succeeded()
