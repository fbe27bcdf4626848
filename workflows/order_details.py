"""What OrderWorkflow shows people: the Markdown of its Web UI "Current Details" (what is parked,
why, and how to act) and the description of a step's failure that its dead letter records.

Pure functions of their arguments, imported passed through the workflow's sandbox."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from temporalio.exceptions import ApplicationError
from temporalio.exceptions import TimeoutError as ActivityTimeoutError

from core.contracts import StepState
from core.names import DISCARD_STEP_UPDATE, RETRY_STEP_UPDATE
from core.states import StepStatus
from workflows.order_policy import failure_cause


def current_details(
    steps: Mapping[str, StepState], *, cancelled: bool, park_expired: Collection[str]
) -> str:
    """Markdown for the Web UI's "Current Details": what is parked, why, and how to act."""
    lines: list[str] = []
    if cancelled:
        lines += ["Order cancelled: the warehouse notification is skipped.", ""]
    parked = [(name, s) for name, s in steps.items() if s.status == StepStatus.DEAD_LETTERED]
    for name, state in parked:
        lines += [
            f"## {name} is parked (dead letter {state.dead_letter_id})",
            "",
            f"Why: {state.last_error}",
            "",
        ]
        if name in park_expired:
            lines += [
                "The park timeout passed and the workflow stopped waiting; the dead letter "
                f"stays open: discard it with `orderflow dlq discard {state.dead_letter_id} "
                "--reason ...`.",
                "",
            ]
            continue
        lines += [
            "Fix the cause, then retry: More Actions → Send an Update → Update name "
            f'`{RETRY_STEP_UPDATE}`, input `{{"step": "{name}"}}`',
            f"(or `orderflow dlq retry {state.dead_letter_id}`, "
            f"or `POST /dead-letters/{state.dead_letter_id}/retry`).",
            f"To give up: update `{DISCARD_STEP_UPDATE}` with "
            f'`{{"step": "{name}", "reason": "..."}}`.',
            "",
        ]
    return "\n".join(lines)


def describe_failure(failure: BaseException) -> tuple[str, str]:
    """(error type, message) of what made a step give up, as its dead letter records them."""
    cause = failure_cause(failure)
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError", cause.message
    if isinstance(cause, ActivityTimeoutError):
        kind = f"Timeout.{cause.type.name if cause.type else 'UNKNOWN'}"
        # A spent time budget carries the last attempt's failure: the operator needs that, not
        # only that time ran out. The type stays the timeout's, which is what letters group by.
        last = cause.__cause__
        if isinstance(last, ApplicationError):
            return kind, f"{cause}; last attempt: {last.type or 'ApplicationError'}: {last.message}"
        return kind, str(cause)
    return type(cause).__name__, str(cause)
