"""An order's status, derived from its steps' statuses and whether it was cancelled: what the
customer's GET, the review page and the Web UI's `OrderStatus` search attribute all show."""

from __future__ import annotations

import pytest

from core.contracts import overall_status
from core.states import OrderStatus, StepStatus

PENDING = StepStatus.PENDING
SUCCEEDED = StepStatus.SUCCEEDED
DEAD_LETTERED = StepStatus.DEAD_LETTERED
DISCARDED = StepStatus.DISCARDED
SKIPPED = StepStatus.SKIPPED


@pytest.mark.parametrize(
    ("receipt", "warehouse", "cancelled", "status"),
    [
        # Under way: a step has not settled yet.
        (PENDING, PENDING, False, OrderStatus.PROCESSING),
        (SUCCEEDED, PENDING, False, OrderStatus.PROCESSING),
        (PENDING, SUCCEEDED, False, OrderStatus.PROCESSING),
        (DISCARDED, PENDING, False, OrderStatus.PROCESSING),
        # Every step settled: succeeded, discarded by an operator or skipped.
        (SUCCEEDED, SUCCEEDED, False, OrderStatus.COMPLETED),
        (SUCCEEDED, DISCARDED, False, OrderStatus.COMPLETED),
        (DISCARDED, SUCCEEDED, False, OrderStatus.COMPLETED),
        (DISCARDED, DISCARDED, False, OrderStatus.COMPLETED),
        (SUCCEEDED, SKIPPED, False, OrderStatus.COMPLETED),
        # A parked step needs an operator, whatever the other step is doing.
        (DEAD_LETTERED, PENDING, False, OrderStatus.NEEDS_ATTENTION),
        (DEAD_LETTERED, SUCCEEDED, False, OrderStatus.NEEDS_ATTENTION),
        (SUCCEEDED, DEAD_LETTERED, False, OrderStatus.NEEDS_ATTENTION),
        (DEAD_LETTERED, DEAD_LETTERED, False, OrderStatus.NEEDS_ATTENTION),
        (DISCARDED, DEAD_LETTERED, False, OrderStatus.NEEDS_ATTENTION),
        # Cancelled: says so while the receipt is still going or once everything settled...
        (PENDING, SKIPPED, True, OrderStatus.CANCELLED),
        (SUCCEEDED, SKIPPED, True, OrderStatus.CANCELLED),
        (DISCARDED, SKIPPED, True, OrderStatus.CANCELLED),
        (PENDING, PENDING, True, OrderStatus.CANCELLED),
        # ...but a parked receipt still needs an operator after the cancel.
        (DEAD_LETTERED, SKIPPED, True, OrderStatus.NEEDS_ATTENTION),
        (DEAD_LETTERED, PENDING, True, OrderStatus.NEEDS_ATTENTION),
    ],
)
def test_the_order_status_follows_from_its_steps(
    receipt: StepStatus, warehouse: StepStatus, cancelled: bool, status: OrderStatus
) -> None:
    assert overall_status([receipt, warehouse], cancelled=cancelled) == status


def test_the_stored_strings_derive_as_the_enum_does() -> None:
    # refresh_order_status passes the strings it read from the database.
    assert overall_status(["succeeded", "dead_lettered"]) == "needs_attention"
    assert overall_status(["succeeded", "skipped"], cancelled=True) == "cancelled"
    assert overall_status(iter(["succeeded", "pending"])) == OrderStatus.PROCESSING
