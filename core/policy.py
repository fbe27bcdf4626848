"""The retry policy an order runs under, from the settings: the starter puts it in the
workflow's input, so the workflow's history records it and a later change of settings cannot
make a replay diverge."""

from __future__ import annotations

from core.contracts import StepPolicy
from core.settings import Settings


def step_policy(settings: Settings) -> StepPolicy:
    return StepPolicy(
        max_attempts=settings.RETRY_MAX_ATTEMPTS,
        initial_interval_seconds=settings.RETRY_INITIAL_INTERVAL_SECONDS,
        backoff_coefficient=settings.RETRY_BACKOFF_COEFFICIENT,
        max_interval_seconds=settings.RETRY_MAX_INTERVAL_SECONDS,
        attempt_timeout_seconds=settings.STEP_ATTEMPT_TIMEOUT_SECONDS,
        total_timeout_seconds=settings.STEP_TOTAL_TIMEOUT_SECONDS,
        park_timeout_seconds=settings.PARK_TIMEOUT_SECONDS,
        first_attempt=settings.STEP_FIRST_ATTEMPT,
    )
