"""How OrderWorkflow retries a step: the Temporal retry policy that continues a step's attempts
where its local first attempt (or a run our own database ended) left off, the wait before
attempt 2, and what a step's failure means: final, a cancellation, or our database being down.
The arithmetic of the activities' own backoff is tests/unit/test_retry.py's; which give-ups are
waited out is tests/integration/workflow/test_database_ride_out.py's."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import pytest
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, CancelledError, RetryState, TimeoutType

from activities.retry import DATABASE_UNAVAILABLE, PERMANENT_ERROR_TYPES, STEP_CLAIMED, Backoff
from core.contracts import StepPolicy
from core.settings import Settings
from tests.support import activity_error, activity_timeout
from workflows.order_policy import (
    RIDE_OUT_MIN_WAIT,
    cancelled,
    claim_held,
    database_down,
    failure_cause,
    permanent,
    retry_delay,
    step_retry_policy,
)

POLICY = StepPolicy(
    max_attempts=5,
    initial_interval_seconds=1.0,
    backoff_coefficient=2.0,
    max_interval_seconds=60.0,
    attempt_timeout_seconds=10.0,
    total_timeout_seconds=300.0,
    park_timeout_seconds=3600.0,
    first_attempt="local",
)


def temporal_wait(retry: RetryPolicy, failed_attempt: int) -> float:
    """What Temporal waits after an activity's (1-based) attempt fails without a
    next_retry_delay of its own."""
    assert retry.maximum_interval is not None
    grown = retry.initial_interval.total_seconds() * retry.backoff_coefficient ** (
        failed_attempt - 1
    )
    return min(grown, retry.maximum_interval.total_seconds())


def retryable(message: str = "warehouse answered 503") -> ApplicationError:
    return ApplicationError(message, type="WarehouseUnavailable")


def database_unavailable(attempt: object, delay: timedelta | None = None) -> ApplicationError:
    return ApplicationError(
        "database unavailable", attempt, type=DATABASE_UNAVAILABLE, next_retry_delay=delay
    )


# --- step_retry_policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_attempts", "attempts_made", "fresh_budget", "maximum_attempts"),
    [
        (5, 0, False, 5),  # every attempt an activity task
        (5, 1, False, 4),  # after the local first attempt: the four that remain
        (2, 1, False, 1),
        # Nothing left is still one attempt: maximum_attempts 0 would mean unlimited.
        (1, 1, False, 1),
        (5, 9, False, 1),
        # After a run our own database ended: the whole budget again, however many were made.
        (5, 1, True, 5),
        (5, 9, True, 5),
        # Unlimited stays unlimited.
        (0, 0, False, 0),
        (0, 1, False, 0),
        (0, 9, True, 0),
    ],
)
def test_the_activity_gets_the_attempts_the_step_has_left(
    max_attempts: int, attempts_made: int, fresh_budget: bool, maximum_attempts: int
) -> None:
    policy = replace(POLICY, max_attempts=max_attempts)
    retry = step_retry_policy(policy, attempts_made, fresh_budget=fresh_budget)
    assert retry.maximum_attempts == maximum_attempts


def test_the_policy_carries_the_step_policy_and_the_permanent_error_types() -> None:
    retry = step_retry_policy(POLICY, 0)
    assert retry.initial_interval == timedelta(seconds=1)
    assert retry.backoff_coefficient == 2.0
    assert retry.maximum_interval == timedelta(seconds=60)
    assert retry.non_retryable_error_types is not None
    assert sorted(retry.non_retryable_error_types) == sorted(PERMANENT_ERROR_TYPES)


@pytest.mark.parametrize("fresh_budget", [False, True])
@pytest.mark.parametrize("attempts_made", [0, 1, 2, 3, 5, 8])
def test_the_waits_go_on_as_if_every_attempt_had_been_an_activity_task(
    attempts_made: int, fresh_budget: bool
) -> None:
    every_attempt = step_retry_policy(POLICY, 0)
    continued = step_retry_policy(POLICY, attempts_made, fresh_budget=fresh_budget)
    for activity_attempt in range(1, 6):
        step_attempt = attempts_made + activity_attempt
        assert temporal_wait(continued, activity_attempt) == temporal_wait(
            every_attempt, step_attempt
        ), f"after step attempt {step_attempt}"


@pytest.mark.parametrize("attempts_made", [6, 7, 100, 1_100, 100_000])
def test_the_first_interval_stops_at_the_cap_however_many_attempts_were_made(
    attempts_made: int,
) -> None:
    # A database outage that outlasts many runs makes the attempt number grow without bound; the
    # policy is built in the workflow, where an exception would fail every workflow task.
    retry = step_retry_policy(POLICY, attempts_made, fresh_budget=True)
    assert retry.initial_interval == timedelta(seconds=60)
    assert retry.maximum_attempts == 5


def test_a_constant_backoff_keeps_its_interval() -> None:
    constant = replace(POLICY, backoff_coefficient=1.0, initial_interval_seconds=3.0)
    for attempts_made in (0, 1, 70, 100_000):
        retry = step_retry_policy(constant, attempts_made, fresh_budget=True)
        assert retry.initial_interval == timedelta(seconds=3)


# --- retry_delay --------------------------------------------------------------------------------


def jittered_backoff() -> Backoff:
    return Backoff(
        Settings(
            RETRY_INITIAL_INTERVAL_SECONDS=1.0,
            RETRY_BACKOFF_COEFFICIENT=2.0,
            RETRY_MAX_INTERVAL_SECONDS=60.0,
            RETRY_JITTER="full",
            RETRY_JITTER_SEED=7,
        )
    )


def test_attempt_2_waits_the_jittered_delay_the_first_attempt_asked_for() -> None:
    backoff = jittered_backoff()
    waits = []
    for _ in range(200):
        failure = backoff.retryable("503", error_type="WarehouseUnavailable", attempt=1)
        wait = retry_delay(failure, POLICY)
        assert wait == failure.next_retry_delay
        waits.append(wait)
    # Full jitter: anywhere up to the first interval, not the first interval every time.
    assert all(timedelta(0) < wait <= timedelta(seconds=1) for wait in waits)
    assert len(set(waits)) > 100


def test_attempt_2_waits_the_retry_after_the_downstream_asked_for() -> None:
    failure = jittered_backoff().retryable(
        "429", error_type="WarehouseUnavailable", attempt=1, retry_after=30
    )
    assert retry_delay(failure, POLICY) == timedelta(seconds=30)
    # The same failure reaching the workflow from an activity task.
    assert retry_delay(activity_error(failure), POLICY) == timedelta(seconds=30)


@pytest.mark.parametrize(
    "failure",
    [
        retryable(),
        activity_error(retryable()),
        activity_timeout(TimeoutType.START_TO_CLOSE),
        activity_error(activity_timeout(TimeoutType.START_TO_CLOSE)),
        RuntimeError("a bug in the activity"),
    ],
)
def test_without_a_delay_of_its_own_attempt_2_waits_the_first_interval(
    failure: BaseException,
) -> None:
    assert retry_delay(failure, POLICY) == timedelta(seconds=1)


def test_the_first_interval_is_held_to_the_maximum_interval() -> None:
    capped = replace(POLICY, initial_interval_seconds=90.0, max_interval_seconds=60.0)
    assert retry_delay(retryable(), capped) == timedelta(seconds=60)
    assert step_retry_policy(capped, 0).initial_interval == timedelta(seconds=60)


# --- database_down ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "down"),
    [
        (database_unavailable(3, timedelta(seconds=2)), (3, timedelta(seconds=2))),
        (
            activity_error(database_unavailable(7, timedelta(seconds=5))),
            (7, timedelta(seconds=5)),
        ),
        # No wait asked for: at least the minimum, never straight away.
        (database_unavailable(3), (3, RIDE_OUT_MIN_WAIT)),
        (
            activity_error(
                activity_timeout(TimeoutType.SCHEDULE_TO_CLOSE, database_unavailable(4)),
                RetryState.TIMEOUT,
            ),
            (4, RIDE_OUT_MIN_WAIT),
        ),
    ],
)
def test_a_run_our_database_ended_says_which_attempt_and_how_long_to_wait(
    failure: BaseException, down: tuple[int, timedelta]
) -> None:
    assert database_down(failure) == down


@pytest.mark.parametrize(
    "failure",
    [
        # Without the attempt number the workflow could not go on counting: not waited out.
        database_unavailable("3"),
        ApplicationError("database unavailable", type=DATABASE_UNAVAILABLE),
        # The step's time ran out before any attempt failed.
        activity_error(activity_timeout(TimeoutType.SCHEDULE_TO_CLOSE), RetryState.TIMEOUT),
        activity_error(activity_timeout(TimeoutType.SCHEDULE_TO_CLOSE, retryable())),
        activity_error(CancelledError()),
        asyncio.CancelledError(),
    ],
)
def test_other_give_ups_are_not_the_database_being_down(failure: BaseException) -> None:
    assert database_down(failure) is None


# --- failure_cause, permanent, cancelled --------------------------------------------------------


def test_the_cause_is_what_the_activity_error_wraps_one_level_down() -> None:
    error = retryable()
    timeout = activity_timeout(TimeoutType.SCHEDULE_TO_CLOSE, error)
    assert failure_cause(activity_error(error)) is error
    assert failure_cause(activity_error(timeout)) is timeout
    assert failure_cause(error) is error
    bare = activity_error(error)
    bare.__cause__ = None
    assert failure_cause(bare) is bare


@pytest.mark.parametrize("error_type", PERMANENT_ERROR_TYPES)
def test_a_permanent_error_type_is_final_even_unflagged(error_type: str) -> None:
    # A local activity's failure arrives bare, without Temporal's retry state: its type alone
    # must say it is final, flagged or not.
    unflagged = ApplicationError("rejected", type=error_type)
    assert not unflagged.non_retryable
    assert permanent(unflagged)
    assert permanent(activity_error(unflagged, RetryState.NON_RETRYABLE_FAILURE))


@pytest.mark.parametrize(
    ("failure", "final"),
    [
        (ApplicationError("no", type="SomethingElse", non_retryable=True), True),
        (ApplicationError("no", non_retryable=True), True),
        # Temporal said so, whatever the cause.
        (activity_error(retryable(), RetryState.NON_RETRYABLE_FAILURE), True),
        (activity_error(activity_timeout(None), RetryState.NON_RETRYABLE_FAILURE), True),
        (activity_error(ApplicationError("no", type="WarehouseRejected")), True),
        (retryable(), False),
        (ApplicationError("untyped"), False),
        (database_unavailable(2), False),
        (activity_error(retryable(), RetryState.MAXIMUM_ATTEMPTS_REACHED), False),
        (activity_error(retryable(), RetryState.TIMEOUT), False),
        (activity_timeout(TimeoutType.START_TO_CLOSE), False),
        (activity_error(activity_timeout(TimeoutType.START_TO_CLOSE), RetryState.TIMEOUT), False),
        (CancelledError(), False),
        (RuntimeError("a bug"), False),
    ],
)
def test_which_failures_are_final(failure: BaseException, final: bool) -> None:
    assert permanent(failure) is final


@pytest.mark.parametrize(
    ("failure", "is_cancel"),
    [
        (CancelledError(), True),
        (asyncio.CancelledError(), True),
        (activity_error(CancelledError(), RetryState.CANCEL_REQUESTED), True),
        (retryable(), False),
        (ApplicationError("no", type="WarehouseRejected", non_retryable=True), False),
        (activity_error(retryable()), False),
        (activity_timeout(TimeoutType.START_TO_CLOSE), False),
        (activity_error(activity_timeout(TimeoutType.HEARTBEAT)), False),
    ],
)
def test_which_failures_are_a_cancellation(failure: BaseException, is_cancel: bool) -> None:
    assert cancelled(failure) is is_cancel


# --- claim_held ---------------------------------------------------------------------------------


def step_claimed(attempt: object, delay: timedelta | None = None) -> ApplicationError:
    return ApplicationError(
        "claimed by another attempt", attempt, type=STEP_CLAIMED, next_retry_delay=delay
    )


@pytest.mark.parametrize(
    ("failure", "held"),
    [
        (step_claimed(2, timedelta(seconds=9)), (2, timedelta(seconds=9))),
        (activity_error(step_claimed(5, timedelta(seconds=3))), (5, timedelta(seconds=3))),
        (
            activity_error(
                activity_timeout(TimeoutType.SCHEDULE_TO_CLOSE, step_claimed(4)),
                RetryState.TIMEOUT,
            ),
            (4, RIDE_OUT_MIN_WAIT),
        ),
    ],
)
def test_a_run_another_attempts_claim_ended_is_waited_out(
    failure: BaseException, held: tuple[int, timedelta]
) -> None:
    assert claim_held(failure) == held
    assert database_down(failure) is None


@pytest.mark.parametrize(
    "failure",
    [retryable(), database_unavailable(3), step_claimed("2"), asyncio.CancelledError()],
)
def test_other_give_ups_are_no_claim(failure: BaseException) -> None:
    assert claim_held(failure) is None
