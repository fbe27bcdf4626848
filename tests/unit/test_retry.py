"""How a failed effect asks to be retried, in arithmetic: `Retry-After` parsed from seconds and HTTP
dates, full-jitter backoff capped and reproducible by seed, `Retry-After` honoured and capped, and
the retryable and permanent errors."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from activities.retry import MIN_RETRY_DELAY_SECONDS, Backoff, parse_retry_after, permanent
from core.settings import Settings

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def backoff(**changes: Any) -> Backoff:
    values: dict[str, Any] = {
        "RETRY_INITIAL_INTERVAL_SECONDS": 1.0,
        "RETRY_BACKOFF_COEFFICIENT": 2.0,
        "RETRY_MAX_INTERVAL_SECONDS": 60.0,
        "RETRY_JITTER_SEED": 7,
    }
    values.update(changes)
    return Backoff(Settings(**values))


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        ("Sun, 01 Mar 2026 12:01:30 GMT", 90.0),
        # A date already past means "now", never a negative wait.
        (format_datetime(NOW - timedelta(minutes=5), usegmt=True), 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("1.5", None),
        ("-3", None),
        ("²", None),
    ],
)
def test_parse_retry_after_reads_seconds_and_http_dates(
    header: str | None, seconds: float | None
) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


def test_ceiling_grows_by_the_coefficient_and_stops_at_the_cap() -> None:
    ceilings = [backoff().ceiling(attempt) for attempt in range(1, 10)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert backoff().ceiling(10_000) == 60.0


def test_full_jitter_draws_between_zero_and_the_ceiling_and_is_reproducible_by_seed() -> None:
    first, second, other = backoff(), backoff(), backoff(RETRY_JITTER_SEED=8)
    draws = [first.delay(4).total_seconds() for _ in range(500)]
    assert all(0 < d <= 8.0 for d in draws)
    assert draws == [second.delay(4).total_seconds() for _ in range(500)]
    assert draws != [other.delay(4).total_seconds() for _ in range(500)]
    # Spread over the whole range, not bunched: uniform on [0, 8] has a standard deviation of 2.31.
    mean = sum(draws) / len(draws)
    stdev = math.sqrt(sum((d - mean) ** 2 for d in draws) / len(draws))
    assert 3.0 < mean < 5.0 and stdev > 1.8


def test_without_jitter_the_delay_is_the_ceiling() -> None:
    plain = backoff(RETRY_JITTER="none")
    assert [plain.delay(n).total_seconds() for n in (1, 2, 3, 8)] == [1.0, 2.0, 4.0, 60.0]


@pytest.mark.parametrize(
    ("retry_after", "floor", "ceiling"),
    [
        (30.0, 30.0, 30.0 + 1e-9),  # above the jittered draw (at most 1 s): the server's word
        (600.0, 60.0, 60.0),  # beyond RETRY_MAX_INTERVAL_SECONDS: capped
        (0.0, MIN_RETRY_DELAY_SECONDS, 1.0),  # "now": the jitter decides
    ],
)
def test_retry_after_is_honoured_and_capped(
    retry_after: float, floor: float, ceiling: float
) -> None:
    b = backoff()
    for _ in range(200):
        assert floor <= b.delay(1, retry_after).total_seconds() <= ceiling


class _ZeroDraws(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 0.0


def test_a_zero_draw_still_sends_a_delay() -> None:
    # A zero next_retry_delay is not sent at all, and Temporal would wait the policy's interval.
    b = backoff()
    b._random = _ZeroDraws()
    assert b.delay(3).total_seconds() == MIN_RETRY_DELAY_SECONDS
    assert b.retryable("down", error_type="WarehouseUnavailable", attempt=3).next_retry_delay


def test_retryable_and_permanent_errors_carry_their_type() -> None:
    error = backoff().retryable("down", error_type="WarehouseUnavailable", attempt=2)
    assert error.type == "WarehouseUnavailable" and not error.non_retryable
    assert error.next_retry_delay is not None
    assert timedelta(0) < error.next_retry_delay <= timedelta(seconds=2)
    rejected = permanent("no such mailbox", error_type="MailboxRejected")
    assert rejected.type == "MailboxRejected" and rejected.non_retryable
    assert rejected.next_retry_delay is None
