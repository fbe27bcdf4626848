"""Reads the retry settings for a workflow whose input carries no policy (one started before the
starters put it there, still running or replayed): as a local activity, so its history records
the policy it ran under."""

from __future__ import annotations

from temporalio import activity

from core.contracts import LoadPolicyInput, StepPolicy
from core.policy import step_policy
from core.settings import Settings


class PolicyActivities:
    def __init__(self, settings: Settings) -> None:
        self._policy = step_policy(settings)

    @activity.defn(name="load_step_policy")
    async def load_step_policy(self, input: LoadPolicyInput) -> StepPolicy:
        return self._policy
