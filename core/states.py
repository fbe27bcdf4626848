"""The states an order, its steps and its dead letters go through, and the outcomes of a step's
attempt and of a cancel: the strings the database stores and Temporal's payloads carry, typed.
Nothing here imports SQLAlchemy, so the workflow's code can use them; `core/models.py` stores them.
"""

from __future__ import annotations

import enum
from typing import Literal


class OrderStatus(enum.StrEnum):
    PROCESSING = "processing"
    COMPLETED = "completed"
    NEEDS_ATTENTION = "needs_attention"
    CANCELLED = "cancelled"


class Step(enum.StrEnum):
    SEND_RECEIPT = "send_receipt"
    NOTIFY_WAREHOUSE = "notify_warehouse"


class StepStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    DEAD_LETTERED = "dead_lettered"
    DISCARDED = "discarded"
    SKIPPED = "skipped"


class DeadLetterStatus(enum.StrEnum):
    OPEN = "open"
    RETRYING = "retrying"
    RESOLVED = "resolved"
    DISCARDED = "discarded"


class DeadLetterResolution(enum.StrEnum):
    """How an occurrence left the active states: its redrive succeeded, its redrive failed again
    (a new occurrence took over), or an operator discarded it."""

    SUCCEEDED = "succeeded"
    FAILED_AGAIN = "failed_again"
    DISCARDED = "discarded"


class KeyState(enum.StrEnum):
    IN_FLIGHT = "in_flight"
    COMPLETED = "completed"


class StepOutcome(enum.StrEnum):
    """What a step's successful attempt found."""

    # This attempt did the side effect.
    PERFORMED = "performed"
    # A ledger row showed an earlier attempt had done it.
    ALREADY_DONE = "already_done"
    # The order was cancelled before the attempt touched the downstream.
    SKIPPED = "skipped"


class ClaimEnd(enum.StrEnum):
    """How a claim ended without recording an outcome (`interrupted_claims.ended`)."""

    # Its lease ran out and another attempt took the step over: its holder died, lost its
    # database, or ran past the lease.
    TAKEN_OVER = "taken_over"
    # Its run was cut short (an error, a cancel) and gave the claim back.
    RELEASED = "released"


class CancelOutcome(enum.StrEnum):
    """What recording a cancel found."""

    # Recorded: the warehouse step is skipped.
    CANCELLED = "cancelled"
    # The warehouse already accepted the order, so it was not cancelled.
    TOO_LATE = "too_late"


# What an operator asked for a parked step.
OperatorCommandKind = Literal["retry", "discard"]
# How a step's attempt is counted in the worker's metrics.
AttemptOutcome = Literal["succeeded", "retried", "failed_permanent", "dead_lettered"]
