"""The cancel rule: whether an order can still be cancelled. The API checks it before it asks the
workflow, and the workflow's cancel activity decides by it under the order's lock."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING

from core.states import Step, StepStatus

# The workflow imports this module for CANCELLABLE_STEPS; the tables are for the types only, so it
# does not pull SQLAlchemy into the workflow's imports.
if TYPE_CHECKING:
    from core.models import Order, OrderStep

# The follow-ups a cancel stops. The receipt is not one: the card was charged, and the receipt is
# the customer's record of that charge.
CANCELLABLE_STEPS = (Step.NOTIFY_WAREHOUSE.value,)


class CancelVerdict(enum.StrEnum):
    ALREADY_CANCELLED = "already_cancelled"
    # The warehouse accepted the order: the cancel has to happen there.
    TOO_LATE = "too_late"
    ALLOWED = "allowed"


def cancel_verdict(order: Order, steps: Iterable[OrderStep]) -> CancelVerdict:
    """`steps`: the order's ledger rows (all, or just the cancellable ones)."""
    if order.cancelled_at is not None:
        return CancelVerdict.ALREADY_CANCELLED
    if any(s.step in CANCELLABLE_STEPS and s.status == StepStatus.SUCCEEDED for s in steps):
        return CancelVerdict.TOO_LATE
    return CancelVerdict.ALLOWED
