"""How a failed side effect asks to be retried: capped exponential backoff with full jitter,
`Retry-After` honoured, and permanent failures marked so Temporal does not retry them."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from core.contracts import StepInput
from core.outages import DATABASE, OutageLog, is_database_outage
from core.settings import Settings

# Error types the workflow's RetryPolicy lists as non-retryable, so even an error raised without
# the flag is never retried.
PERMANENT_ERROR_TYPES = ("WarehouseRejected", "MailboxRejected", "OrderNotFound")
MIN_RETRY_DELAY_SECONDS = 0.001
# An attempt that could not reach our own database: retried, and never dead-lettered for it (the
# workflow waits it out). Its details carry the step attempt number, so the workflow can go on
# counting from there.
DATABASE_UNAVAILABLE = "DatabaseUnavailable"
# An attempt that found another attempt's live claim on its step (activities/step_attempt.py):
# retried once the claim has run out, and never dead-lettered for it either. Its details carry
# the step attempt number too.
STEP_CLAIMED = "StepClaimed"


LEDGER_OUTAGE_MEANWHILE = "step attempts wait for it, and no step is dead-lettered for it"

log = logging.getLogger(__name__)

_step_attempt: ContextVar[int] = ContextVar("step_attempt", default=0)


def step_attempt(input: StepInput) -> int:
    """The running attempt's number among all of its step's attempts: a step whose first attempt
    ran as a local activity counts it, where activity.info().attempt counts activity tasks only.
    Backoff, the ledger, logs and dead letters count this one."""
    attempt = input.attempt(activity.info().attempt)
    _step_attempt.set(attempt)
    return attempt


def current_step_attempt() -> int:
    """What step_attempt said for the attempt running in this context (0 outside one), for code
    that runs inside an attempt without its input, such as a test's checkpoint."""
    return _step_attempt.get()


def capped_exponential(initial: float, coefficient: float, exponent: int, cap: float) -> float:
    """initial * coefficient**exponent, at most cap. An attempt number grows without bound while
    our own database stays down; the power of a large one overflows a float, long past the cap."""
    try:
        return float(min(cap, initial * coefficient**exponent))
    except OverflowError:
        return cap


class Backoff:
    """Computes the wait before the next attempt; one per worker so the random source is shared."""

    def __init__(self, settings: Settings) -> None:
        self._initial = settings.RETRY_INITIAL_INTERVAL_SECONDS
        self._coefficient = settings.RETRY_BACKOFF_COEFFICIENT
        self._cap = settings.RETRY_MAX_INTERVAL_SECONDS
        self._jitter = settings.RETRY_JITTER
        self._random = random.Random(settings.RETRY_JITTER_SEED)

    def ceiling(self, attempt: int) -> float:
        """The capped exponential delay after the given (1-based) attempt failed."""
        return capped_exponential(self._initial, self._coefficient, max(attempt - 1, 0), self._cap)

    def delay(self, attempt: int, retry_after: float | None = None) -> timedelta:
        ceiling = self.ceiling(attempt)
        seconds = self._random.uniform(0, ceiling) if self._jitter == "full" else ceiling
        if retry_after is not None:
            # The server told us when it can take the call again; jitter must not undercut it.
            seconds = max(seconds, min(retry_after, self._cap))
        # The SDK sends no next_retry_delay for a zero timedelta, and Temporal would then wait the
        # policy's un-jittered interval instead.
        return timedelta(seconds=max(seconds, MIN_RETRY_DELAY_SECONDS))

    def retryable(
        self,
        message: str,
        *,
        error_type: str,
        attempt: int,
        retry_after: float | None = None,
    ) -> ApplicationError:
        """A downstream's failure that can pass: retried after the jittered delay. Benign: the
        SDK logs it at DEBUG, and the step metrics' line says it once per attempt."""
        return ApplicationError(
            message,
            type=error_type,
            next_retry_delay=self.delay(attempt, retry_after),
            category=ApplicationErrorCategory.BENIGN,
        )


class LedgerOutages:
    """Turns our own database being unreachable during an attempt (the ledger read, or recording
    its outcome) into a retryable DatabaseUnavailable with a backoff delay, logged once per burst:
    the database being down is like the worker being down, not a failure of the downstream."""

    def __init__(self, backoff: Backoff, outage: OutageLog | None = None) -> None:
        self._backoff = backoff
        self.outage = outage or OutageLog(DATABASE, log, meanwhile=LEDGER_OUTAGE_MEANWHILE)
        # Claims whose run ended in this process while the database could not take them back,
        # with their leases: an attempt here that meets one knows nobody runs it any more.
        self._left: dict[str, datetime] = {}

    def left_behind(self, token: str, until: datetime) -> None:
        now = datetime.now(UTC)
        self._left = {t: end for t, end in self._left.items() if end > now}
        self._left[token] = until

    def ended_here(self, token: str) -> bool:
        return token in self._left

    @contextmanager
    def guard(self, attempt: int, doing: str, outcome: str | None = None) -> Iterator[None]:
        """Around one ledger call of the attempt; `outcome` is what the downstream said, kept in
        the message (the retry asks the downstream again once the database answers)."""
        try:
            yield
        except Exception as error:
            if not is_database_outage(error):
                raise
            self.outage.failed(error)
            message = f"database unavailable while {doing}: {type(error).__name__}: {error}"
            if outcome:
                message += f" (the downstream had answered: {outcome})"
            raise database_unavailable(
                message, attempt, next_retry_delay=self._backoff.delay(attempt)
            ) from None
        self.outage.succeeded()


def database_unavailable(
    message: str, *details: object, next_retry_delay: timedelta | None = None
) -> ApplicationError:
    """Our own database could not be reached: retryable, and benign, so the SDK logs it at DEBUG
    without a traceback per attempt (the caller's outage log says it once per burst).

    Raise it `from None`: chained to the driver's error, its traceback pushes the failure past
    the server's size limit, and the pending activity shows only "Failure exceeds size limit."
    The message names the error; an outage is no bug whose traceback anyone needs."""
    return ApplicationError(
        message[:2000],
        *details,
        type=DATABASE_UNAVAILABLE,
        next_retry_delay=next_retry_delay,
        category=ApplicationErrorCategory.BENIGN,
    )


def permanent(message: str, *, error_type: str) -> ApplicationError:
    """A downstream's refusal for good: dead-lettered at once. Benign, like a retryable one: a
    refusal is the normal life of a step, said in one line per attempt, not a traceback."""
    return ApplicationError(
        message, type=error_type, non_retryable=True, category=ApplicationErrorCategory.BENIGN
    )


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: either delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    # isascii: str.isdigit also accepts digits like "²" that float() refuses.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)
