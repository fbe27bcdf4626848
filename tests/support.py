"""Helpers the tests share: waiting on a condition with a deadline, and building orders."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

DEFAULT_DEADLINE_SECONDS = 20.0


async def wait_until(
    probe: Callable[[], Any],
    *,
    within: float = DEFAULT_DEADLINE_SECONDS,
    interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Polls `probe` until it returns something truthy; fails the test at the deadline."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        result = probe()
        last = await result if asyncio.iscoroutine(result) else result
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {message}; last={last!r}")
        await asyncio.sleep(interval)


def unique_email() -> str:
    return f"buyer-{uuid.uuid4().hex[:12]}@example.com"


def order_body(email: str | None = None, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_email": email or unique_email(),
        "currency": "USD",
        "items": [
            {"sku": "BOOK-1", "quantity": 2, "unit_price_cents": 1250},
            {"sku": "PEN-9", "quantity": 1, "unit_price_cents": 199},
        ],
        "payment_token": "tok_visa",
    }
    body.update(changes)
    return body


def new_key() -> str:
    return f"key-{uuid.uuid4().hex}"
