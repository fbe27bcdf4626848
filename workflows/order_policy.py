"""How OrderWorkflow retries: the Temporal retry policies it runs its activities under, built from
the order's StepPolicy, and what a step's failure means for what comes next (final or not, how
long to wait, whether our own database ended the run).

Pure functions of their arguments, so the workflow can call them during replay; the workflow
imports this module passed through its sandbox, so it is loaded once per worker, not per run."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    RetryState,
    TimeoutType,
)
from temporalio.exceptions import TimeoutError as ActivityTimeoutError

from activities.retry import (
    DATABASE_UNAVAILABLE,
    PERMANENT_ERROR_TYPES,
    STEP_CLAIMED,
    capped_exponential,
)
from core.contracts import StepPolicy

# Reading the policy is a local activity of the first workflow task; it retries until it answers.
POLICY_LOAD_TIMEOUT = timedelta(seconds=10)
POLICY_LOAD_RETRY = RetryPolicy(maximum_attempts=0, maximum_interval=timedelta(seconds=10))
# Recording a dead letter is the last line of defence: it retries until the database takes it.
BOOKKEEPING_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=0,
)
BOOKKEEPING_TIMEOUT = timedelta(seconds=30)
# A step's local first attempt is one attempt: its retries are activity tasks, counted and shown
# as the others are.
LOCAL_FIRST_ATTEMPT_RETRY = RetryPolicy(maximum_attempts=1)
# A run that our own database ended is run again after at least this long.
RIDE_OUT_MIN_WAIT = timedelta(seconds=1)
# How a step's attempt can fail, as it reaches the workflow: an activity task's failure is an
# ActivityError; a local activity's is the ApplicationError itself, an ActivityError around a
# timeout or, once the workflow is being cancelled, a bare cancellation.
STEP_FAILURES = (
    ActivityError,
    ApplicationError,
    ActivityTimeoutError,
    CancelledError,
    asyncio.CancelledError,
)


def step_retry_policy(
    policy: StepPolicy, attempts_made: int, *, fresh_budget: bool = False
) -> RetryPolicy:
    """The activity's retry policy for the attempts the step has left after `attempts_made`
    (its local first attempt), or for all of them again (`fresh_budget`, after a run that our
    own database ended); the intervals continue from there, so a failure without its own
    next_retry_delay waits what it would have waited had every attempt been an activity task."""
    # maximum_attempts 0 means unlimited, which stays unlimited.
    left = policy.max_attempts if fresh_budget else policy.max_attempts - attempts_made
    attempts = max(left, 1) if policy.max_attempts else 0
    initial = capped_exponential(
        policy.initial_interval_seconds,
        policy.backoff_coefficient,
        attempts_made,
        policy.max_interval_seconds,
    )
    return RetryPolicy(
        initial_interval=timedelta(seconds=initial),
        backoff_coefficient=policy.backoff_coefficient,
        maximum_interval=timedelta(seconds=policy.max_interval_seconds),
        maximum_attempts=attempts,
        non_retryable_error_types=list(PERMANENT_ERROR_TYPES),
    )


def retry_delay(failure: BaseException, policy: StepPolicy) -> timedelta:
    """The wait before attempt 2 after a failed local first attempt: the delay the activity asked
    for (full jitter, or Retry-After), else the policy's first interval, as Temporal would."""
    cause = failure_cause(failure)
    if isinstance(cause, ApplicationError) and cause.next_retry_delay:
        return cause.next_retry_delay
    return timedelta(seconds=min(policy.initial_interval_seconds, policy.max_interval_seconds))


def database_down(failure: BaseException) -> tuple[int, timedelta] | None:
    """(the step attempt that found our own database down, the wait it asked for) when that is
    what ended the run: the last attempt's own failure, or, when the step's time budget ran out
    (a SCHEDULE_TO_CLOSE timeout, whose cause is the last attempt's failure), the last one."""
    return _ended_by(failure, DATABASE_UNAVAILABLE)


def claim_held(failure: BaseException) -> tuple[int, timedelta] | None:
    """(the step attempt, the wait it asked for) when what ended the run was another attempt's
    live claim on the step (StepClaimed): that attempt may be performing the effect, or died
    and left its claim to its lease; either way nothing the downstream said, and the step is
    waited out like our own database, never parked for it."""
    return _ended_by(failure, STEP_CLAIMED)


def _ended_by(failure: BaseException, error_type: str) -> tuple[int, timedelta] | None:
    cause = failure_cause(failure)
    if isinstance(cause, ActivityTimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_CLOSE:
        cause = cause.cause or cause
    if not isinstance(cause, ApplicationError) or cause.type != error_type:
        return None
    attempt = cause.details[0] if cause.details else None
    if not isinstance(attempt, int):
        return None
    return attempt, cause.next_retry_delay or RIDE_OUT_MIN_WAIT


def failure_cause(failure: BaseException) -> BaseException:
    """What failed: an activity task's failure arrives as ActivityError wrapping it; a local
    activity's as the ApplicationError itself, or ActivityError wrapping a timeout."""
    if isinstance(failure, ActivityError) and failure.cause is not None:
        return failure.cause
    return failure


def permanent(failure: BaseException) -> bool:
    if isinstance(failure, ActivityError) and (
        failure.retry_state == RetryState.NON_RETRYABLE_FAILURE
    ):
        return True
    # A local activity's failure carries no retry state: its error says whether it is final.
    cause = failure_cause(failure)
    return isinstance(cause, ApplicationError) and (
        cause.non_retryable or cause.type in PERMANENT_ERROR_TYPES
    )


def cancelled(failure: BaseException) -> bool:
    return isinstance(failure_cause(failure), asyncio.CancelledError | CancelledError)
