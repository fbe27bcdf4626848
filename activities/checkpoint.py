"""The points where a side effect can be interrupted, and the seam that lets a test stop it there.

A side effect runs in three moves: do it, record it in the ledger, report to Temporal. A worker
can die between any two; the tests pass a `Checkpoint` that raises or kills the process at a
named point to show what the customer and the warehouse see in each case."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

# The ledger said "not done yet"; nothing has left the process.
BEFORE_EFFECT = "before_effect"
# The downstream accepted the effect; the ledger does not know yet.
AFTER_EFFECT = "after_effect"
# The ledger has committed success; Temporal has not heard of it yet.
AFTER_RECORD = "after_record"
CRASH_POINTS = (BEFORE_EFFECT, AFTER_EFFECT, AFTER_RECORD)

Checkpoint = Callable[[str], Awaitable[None]]


async def no_checkpoint(point: str) -> None:
    """Production's checkpoint: the effect runs straight through."""
