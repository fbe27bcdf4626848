"""The retry schedule's arithmetic: capped exponential backoff and the jitter's bounds."""

from __future__ import annotations

from activities.retry import Backoff
from core.settings import Settings


def backoff(**changes: object) -> Backoff:
    values: dict[str, object] = {
        "RETRY_INITIAL_INTERVAL_SECONDS": 1.0,
        "RETRY_BACKOFF_COEFFICIENT": 2.0,
        "RETRY_MAX_INTERVAL_SECONDS": 5.0,
        "RETRY_JITTER": "full",
        "RETRY_JITTER_SEED": 7,
        **changes,
    }
    return Backoff(Settings.model_validate(values))


def test_ceiling_grows_by_the_coefficient_and_caps() -> None:
    assert [backoff().ceiling(attempt) for attempt in range(1, 8)] == [1, 2, 4, 5, 5, 5, 5]
    assert backoff(RETRY_BACKOFF_COEFFICIENT=3.0).ceiling(3) == 5
    assert backoff().ceiling(10_000) == 5  # no float overflow for a huge attempt number


def test_a_constant_backoff_stays_constant_however_many_attempts() -> None:
    # Attempt numbers go on growing while our own database is down and its runs are waited out.
    constant = backoff(RETRY_BACKOFF_COEFFICIENT=1.0, RETRY_INITIAL_INTERVAL_SECONDS=2.0)
    assert [constant.ceiling(attempt) for attempt in (1, 65, 66, 100, 10_000)] == [2] * 5


def test_full_jitter_stays_within_zero_and_the_ceiling_and_is_seeded() -> None:
    jittered = backoff()
    delays = [
        (attempt, jittered.delay(attempt).total_seconds())
        for attempt in range(1, 8)
        for _ in range(200)
    ]
    assert all(0 <= seconds <= jittered.ceiling(attempt) for attempt, seconds in delays)
    # Jitter spreads the waits rather than always waiting the ceiling.
    assert len({seconds for _, seconds in delays}) > 100
    # The same seed gives the same schedule, so a test can predict it.
    twin = backoff()
    assert [twin.delay(attempt).total_seconds() for attempt, _ in delays] == [
        seconds for _, seconds in delays
    ]


def test_no_jitter_waits_the_ceiling_and_retry_after_is_honoured() -> None:
    exact = backoff(RETRY_JITTER="none")
    assert [exact.delay(a).total_seconds() for a in range(1, 6)] == [1, 2, 4, 5, 5]
    assert backoff().delay(1, retry_after=3).total_seconds() >= 3
    # A Retry-After beyond the cap is held to the cap.
    assert backoff().delay(1, retry_after=3600).total_seconds() == 5
