"""Reads the retry settings once per order, as a local activity, so the workflow's history records
the policy it ran under and a later change of settings cannot make a replay diverge."""

from __future__ import annotations

from temporalio import activity

from core.contracts import LoadPolicyInput, StepPolicy
from core.settings import Settings


class PolicyActivities:
    def __init__(self, settings: Settings) -> None:
        self._policy = StepPolicy(
            max_attempts=settings.RETRY_MAX_ATTEMPTS,
            initial_interval_seconds=settings.RETRY_INITIAL_INTERVAL_SECONDS,
            backoff_coefficient=settings.RETRY_BACKOFF_COEFFICIENT,
            max_interval_seconds=settings.RETRY_MAX_INTERVAL_SECONDS,
            attempt_timeout_seconds=settings.STEP_ATTEMPT_TIMEOUT_SECONDS,
            total_timeout_seconds=settings.STEP_TOTAL_TIMEOUT_SECONDS,
            park_timeout_seconds=settings.PARK_TIMEOUT_SECONDS,
            first_attempt=settings.STEP_FIRST_ATTEMPT,
        )

    @activity.defn(name="load_step_policy")
    async def load_step_policy(self, input: LoadPolicyInput) -> StepPolicy:
        return self._policy
