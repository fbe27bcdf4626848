"""The dataclasses that cross the Temporal boundary: each workflow, update and activity takes one
and returns one. They carry references (the order ID), never the order itself."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from temporalio.common import SearchAttributeKey

from core.states import (
    CancelOutcome,
    OperatorCommandKind,
    OrderStatus,
    Step,
    StepOutcome,
    StepStatus,
)

STEPS: tuple[str, ...] = tuple(step.value for step in Step)
SETTLED_STEP_STATUSES = frozenset({StepStatus.SUCCEEDED, StepStatus.DISCARDED, StepStatus.SKIPPED})


def overall_status(step_statuses: Iterable[str], *, cancelled: bool = False) -> OrderStatus:
    """The order's status as the customer and the operator see it, from its steps' statuses."""
    statuses = list(step_statuses)
    if any(status == StepStatus.DEAD_LETTERED for status in statuses):
        return OrderStatus.NEEDS_ATTENTION
    if cancelled:
        return OrderStatus.CANCELLED
    if all(status in SETTLED_STEP_STATUSES for status in statuses):
        return OrderStatus.COMPLETED
    return OrderStatus.PROCESSING


@dataclass(frozen=True)
class OrderWorkflowInput:
    order_id: str
    # The retry policy the order runs under, read once by its starter. None from a starter that
    # predates it (and in those workflows' histories): the workflow then loads it itself.
    policy: StepPolicy | None = None


@dataclass(frozen=True)
class StepState:
    status: StepStatus
    dead_letter_id: int | None = None
    last_error: str | None = None
    occurrences: int = 0


@dataclass(frozen=True)
class OrderWorkflowStatus:
    order_id: str
    status: OrderStatus
    steps: dict[str, StepState] = field(default_factory=dict)


@dataclass(frozen=True)
class StepPolicy:
    """The retry settings an order runs under, read once and recorded in its history."""

    max_attempts: int
    initial_interval_seconds: float
    backoff_coefficient: float
    max_interval_seconds: float
    attempt_timeout_seconds: float
    total_timeout_seconds: float
    park_timeout_seconds: float
    # "local": a step's first attempt runs as a local activity inside the workflow task, and only
    # a failed one goes on as an activity task; "activity": every attempt is an activity task.
    # The default is the shape histories recorded before the choice existed have, so that a
    # policy decoded from one of them replays as it ran.
    first_attempt: str = "activity"


@dataclass(frozen=True)
class LoadPolicyInput:
    order_id: str


@dataclass(frozen=True)
class StepInput:
    order_id: str
    # The dead letter this run is a redrive of, so its first attempt can mark it `retrying`.
    redrive_of: int | None = None
    # Attempts the step already made before this activity's first one (its local first attempt),
    # so that logs, metrics, backoff, the ledger and dead letters count the step's attempts.
    attempt_offset: int = 0

    def attempt(self, activity_attempt: int) -> int:
        """The step's attempt number for the activity's own (1-based) attempt."""
        return self.attempt_offset + activity_attempt


@dataclass(frozen=True)
class StepResult:
    order_id: str
    step: str
    outcome: StepOutcome


@dataclass(frozen=True)
class DeadLetterInput:
    order_id: str
    step: str
    occurrence: int
    error_type: str
    error_message: str
    permanent: bool
    workflow_id: str
    run_id: str


@dataclass(frozen=True)
class DeadLetterResult:
    dead_letter_id: int
    attempts: int
    # No letter was opened: an attempt that outlived the step's budget had recorded the effect.
    step_succeeded: bool = False


@dataclass(frozen=True)
class DiscardInput:
    dead_letter_id: int
    reason: str
    actor: str


@dataclass(frozen=True)
class DiscardResult:
    dead_letter_id: int
    status: str


@dataclass(frozen=True)
class RetryStepInput:
    step: str
    # Optional: the dead letter the caller looked at; a stale one (already superseded) is refused.
    dead_letter_id: int | None = None


@dataclass(frozen=True)
class DiscardStepInput:
    step: str
    reason: str
    actor: str = "operator"
    dead_letter_id: int | None = None


@dataclass(frozen=True)
class OperatorCommand:
    """What an operator asked for a parked step, held by the workflow until the step acts on it.
    Defined here, not in the workflow's module, because the sandbox re-imports that module for
    every workflow and a dataclass costs a code generation each time."""

    kind: OperatorCommandKind
    reason: str = ""
    actor: str = ""


@dataclass(frozen=True)
class StepCommandResult:
    step: str
    dead_letter_id: int | None
    accepted: bool = True


@dataclass(frozen=True)
class CancelRequest:
    """The `cancel` signal's input; every field has a default so `{}` is a valid cancel."""

    reason: str = ""
    actor: str = "customer"


@dataclass(frozen=True)
class CancelOrderInput:
    order_id: str
    reason: str = ""
    actor: str = "customer"


@dataclass(frozen=True)
class CancelOrderResult:
    order_id: str
    outcome: CancelOutcome


# The Temporal Web UI lists the orders that need review with `OrderStatus="needs_attention"`.
ORDER_STATUS_ATTRIBUTE = SearchAttributeKey.for_keyword("OrderStatus")
