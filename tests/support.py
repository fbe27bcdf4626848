"""Helpers the tests share: waiting on a condition with a deadline, building orders, parking
orders as dead letters, and the failures a step's attempts reach the workflow as."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.exceptions import ActivityError, RetryState, TimeoutError, TimeoutType

from core.contracts import OrderWorkflowStatus
from core.dead_letters import CommandRejected, DeadLetterOperator
from core.models import DeadLetter, DeadLetterStatus, Order
from core.names import STATUS_QUERY
from core.payments import ChargeResult, SandboxGateway
from core.states import StepStatus

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


async def place_order(
    api: httpx.AsyncClient, body: dict[str, Any] | None = None, key: str | None = None
) -> str:
    """POSTs an order (a fresh body and key unless given), asserts the 202, returns its ID."""
    response = await api.post(
        "/orders", json=body or order_body(), headers={"Idempotency-Key": key or new_key()}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["order_id"])


async def wait_for_order_status(
    api: httpx.AsyncClient, order_id: str, status: str
) -> dict[str, Any]:
    """Waits until `GET /orders/{id}` shows the status; returns that order."""

    async def probe() -> dict[str, Any] | None:
        response = await api.get(f"/orders/{order_id}")
        assert response.status_code == 200, response.text
        order: dict[str, Any] = response.json()
        return order if order["status"] == status else None

    found: dict[str, Any] = await wait_until(probe, within=30, message=f"{order_id} {status}")
    return found


async def count_rows(
    sessions: async_sessionmaker[AsyncSession], model: type[Any], *where: ColumnElement[bool]
) -> int:
    """How many rows of the model's table match (all of them without a condition)."""
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def wait_for_workflow_closed(client: Client, workflow_id: str, within: float = 60.0) -> None:
    """The ledger reads `completed` as soon as the last step commits, a moment before Temporal
    records that step; a test that reads the history waits for the workflow itself to close."""
    async with asyncio.timeout(within):
        await client.get_workflow_handle(workflow_id).result()


async def parked_in_its_workflow(client: Client, order_id: str, step: str) -> None:
    """Waits until the order's workflow itself holds the step parked: the dead letter's row
    commits a moment before the workflow hears of it, and an operator's retry or discard sent
    meanwhile is refused ("not dead_lettered")."""

    async def parked() -> bool:
        status = await client.get_workflow_handle(order_id).query(
            STATUS_QUERY, result_type=OrderWorkflowStatus
        )
        return bool(status.steps[step].status == StepStatus.DEAD_LETTERED)

    await wait_until(parked, within=30, message=f"{step} of {order_id} parked in its workflow")


def order_row(email: str, items: list[dict[str, Any]] | None = None) -> Order:
    """An order to write straight into the database: no intake, no charge, no workflow."""
    return Order(
        id=f"ord_{uuid.uuid4().hex}",
        idempotency_key=new_key(),
        customer_email=email,
        currency="USD",
        amount_cents=100,
        items=items or [],
        charge_id=f"ch_{uuid.uuid4().hex[:12]}",
    )


class Parker:
    """Parks orders (the caller sets the fault first) and at the end discards whatever of theirs is
    still open, so no dead letter outlives its test's worker to stall a later bulk retry."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], client: Client) -> None:
        self.sessions = sessions
        self.client = client
        self.order_ids: list[str] = []

    async def park(self, api: httpx.AsyncClient, body: dict[str, Any] | None = None) -> DeadLetter:
        response = await api.post(
            "/orders", json=body or order_body(), headers={"Idempotency-Key": new_key()}
        )
        assert response.status_code == 202, response.text
        order_id = response.json()["order_id"]
        self.order_ids.append(order_id)
        letter: DeadLetter = await wait_until(
            partial(letter_where, self.sessions, order_id, DeadLetterStatus.OPEN),
            within=30,
            message=f"{order_id} parked",
        )
        return letter

    async def discard_leftovers(self) -> None:
        operator = DeadLetterOperator(self.sessions, self.client)
        for order_id in self.order_ids:
            letter = await letter_where(self.sessions, order_id, DeadLetterStatus.OPEN)
            if letter is not None:
                with contextlib.suppress(CommandRejected):
                    await operator.discard(letter.id, "left open by its test", "tests")


@asynccontextmanager
async def parking(
    sessions: async_sessionmaker[AsyncSession], client: Client
) -> AsyncIterator[Parker]:
    parker = Parker(sessions, client)
    try:
        yield parker
    finally:
        await parker.discard_leftovers()


async def letter_where(
    sessions: async_sessionmaker[AsyncSession], order_id: str, status: str
) -> DeadLetter | None:
    async with sessions() as session:
        letter: DeadLetter | None = await session.scalar(
            select(DeadLetter).where(DeadLetter.order_id == order_id, DeadLetter.status == status)
        )
        return letter


class NetworkGateway:
    """The sandbox's charges behind `charge` alone, as a provider across the network offers
    them: nothing can join the intake's transaction, so the intake claims the key first."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sandbox = SandboxGateway(sessions)

    async def charge(
        self, amount_cents: int, currency: str, token: str, idempotency_key: str
    ) -> ChargeResult:
        return await self._sandbox.charge(amount_cents, currency, token, idempotency_key)


def independent_sign(secret: str, body: bytes, timestamp: int) -> str:
    """A webhook signature made with plain HMAC, as a warehouse would from the README alone."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def activity_error(
    cause: BaseException, retry_state: RetryState = RetryState.MAXIMUM_ATTEMPTS_REACHED
) -> ActivityError:
    """An activity task's failure as the workflow receives it: an ActivityError around `cause`."""
    error = ActivityError(
        "activity failed",
        scheduled_event_id=5,
        started_event_id=6,
        identity="worker",
        activity_type="notify_warehouse",
        activity_id="1",
        retry_state=retry_state,
    )
    error.__cause__ = cause
    return error


def activity_timeout(kind: TimeoutType | None, last: BaseException | None = None) -> TimeoutError:
    """An activity's timeout; a SCHEDULE_TO_CLOSE one carries the last attempt's failure."""
    timeout = TimeoutError("activity timeout", type=kind, last_heartbeat_details=[])
    timeout.__cause__ = last
    return timeout
