"""What every scenario ends with: wait until each accepted order is settled, then check, for
every one of them, one charge, one order row, one workflow, one distinct receipt Message-ID,
one accepted warehouse key, and `completed` or an open dead letter saying why."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from activities.receipt import receipt_message_id
from core.ledger import effect_key
from core.models import (
    DeadLetter,
    DeadLetterStatus,
    IdempotencyKey,
    KeyState,
    Order,
    OrderStatus,
    OrderStep,
    PaymentCharge,
    Step,
    StepStatus,
)
from tests.support import wait_until
from tests.system.sinks import Sinks

RECEIPT_FROM = "orders@orderflow.localhost"
SETTLED_STEPS = frozenset({StepStatus.SUCCEEDED, StepStatus.DEAD_LETTERED})


@dataclass
class Figures:
    """What one scenario saw, as docs/reliability.md reports it."""

    orders: int = 0
    receipts: int = 0
    receipt_repeats: int = 0
    webhooks: int = 0
    webhook_repeats: int = 0
    dead_letters: int = 0
    drain_seconds: float = 0.0
    answers: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


async def _orders(sessions: async_sessionmaker[AsyncSession], prefix: str) -> list[Order]:
    async with sessions() as session:
        return list(
            await session.scalars(select(Order).where(Order.idempotency_key.like(f"{prefix}-%")))
        )


async def _steps(
    sessions: async_sessionmaker[AsyncSession], order_ids: list[str]
) -> dict[str, dict[str, OrderStep]]:
    found: dict[str, dict[str, OrderStep]] = {}
    async with sessions() as session:
        for chunk in _chunks(order_ids):
            rows = await session.scalars(select(OrderStep).where(OrderStep.order_id.in_(chunk)))
            for step in rows:
                found.setdefault(step.order_id, {})[step.step] = step
    return found


def _chunks(items: list[str], size: int = 500) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def orders_by_key(
    sessions: async_sessionmaker[AsyncSession], keys: list[str]
) -> dict[str, str]:
    """Key -> order ID for the orders committed under these keys."""
    async with sessions() as session:
        rows = await session.execute(
            select(Order.idempotency_key, Order.id).where(Order.idempotency_key.in_(keys))
        )
        return {str(key): str(order_id) for key, order_id in rows}


async def workflow_task_timed_out(temporal: Client, workflow_id: str) -> bool:
    """Whether one of the workflow's tasks timed out: a local first attempt in it ran again."""
    async for event in temporal.get_workflow_handle(workflow_id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
            return True
    return False


async def started_by(temporal: Client, workflow_id: str) -> int:
    """The process ID of the client that started the workflow (the SDK's identity pid@host)."""
    async for event in temporal.get_workflow_handle(workflow_id).fetch_history_events():
        identity = event.workflow_execution_started_event_attributes.identity
        return int(identity.partition("@")[0])
    raise AssertionError(f"{workflow_id} has no history")


async def wait_until_settled(
    sessions: async_sessionmaker[AsyncSession], prefix: str, expected: int, within: float
) -> float:
    """Waits until the scenario's orders are all in and each step succeeded or is parked;
    returns how long that took."""
    started = time.monotonic()

    async def settled() -> bool | str:
        orders = await _orders(sessions, prefix)
        if len(orders) < expected:
            return False
        steps = await _steps(sessions, [order.id for order in orders])
        unsettled = [
            order.id
            for order in orders
            if any(s.status not in SETTLED_STEPS for s in steps.get(order.id, {}).values())
        ]
        return not unsettled

    await wait_until(settled, within=within, interval=0.5, message=f"{prefix} orders settled")
    return time.monotonic() - started


async def check_orders(
    *,
    sessions: async_sessionmaker[AsyncSession],
    temporal: Client,
    sinks: Sinks,
    task_queue: str,
    prefix: str,
    accepted: dict[str, str],
    repeats_allowed: bool,
) -> Figures:
    """The end-of-scenario check over every order the client was told was accepted, and every
    order row the scenario's keys made (there must be no other)."""
    orders = await _orders(sessions, prefix)
    by_key = Counter(order.idempotency_key for order in orders)
    problems: list[str] = []
    doubled = {key: n for key, n in by_key.items() if n != 1}
    if doubled:
        problems.append(f"keys with more than one order row: {doubled}")
    if set(by_key) != set(accepted):
        problems.append(
            f"order rows without an accepted answer: {sorted(set(by_key) - set(accepted))[:5]}; "
            f"accepted answers without an order row: {sorted(set(accepted) - set(by_key))[:5]}"
        )
    wrong_id = {
        o.idempotency_key: o.id for o in orders if accepted.get(o.idempotency_key, o.id) != o.id
    }
    if wrong_id:
        problems.append(f"keys whose answer named another order: {wrong_id}")

    async with sessions() as session:
        charges = Counter(
            (
                await session.scalars(
                    select(PaymentCharge.idempotency_key).where(
                        PaymentCharge.idempotency_key.like(f"{prefix}-%")
                    )
                )
            ).all()
        )
        order_ids = [order.id for order in orders]
        letters: list[DeadLetter] = []
        for chunk in _chunks(order_ids):
            letters += (
                await session.scalars(select(DeadLetter).where(DeadLetter.order_id.in_(chunk)))
            ).all()
    async with sessions() as session:
        stored = {
            key.key: key
            for key in await session.scalars(
                select(IdempotencyKey).where(IdempotencyKey.key.like(f"{prefix}-%"))
            )
        }
    # The key's stored answer is what every later request with it is told: the same order.
    unanswered = [
        order.idempotency_key
        for order in orders
        if (held := stored.get(order.idempotency_key)) is None
        or (held.state, held.response_status, held.order_id) != (KeyState.COMPLETED, 202, order.id)
    ]
    if unanswered:
        problems.append(f"keys without a stored 202 naming their order: {unanswered[:5]}")
    if any(n != 1 for n in charges.values()) or set(charges) != set(by_key):
        problems.append(
            f"charges per key not one each: {dict(Counter(charges.values()))}, "
            f"{len(charges)} charged keys for {len(by_key)} orders"
        )

    # Only this scenario's orders: every relay sweeps the whole database, so an order an
    # earlier scenario left unstarted (its API killed) may be started on this queue.
    ours = set(order_ids)
    runs = Counter(
        [
            execution.id
            async for execution in temporal.list_workflows(f'TaskQueue="{task_queue}"')
            if execution.id in ours
        ]
    )
    if set(runs) != ours or any(n != 1 for n in runs.values()):
        missing = sorted(ours - set(runs))[:5]
        problems.append(
            f"workflows: {len(runs)} for {len(ours)} orders; missing {missing}; "
            f"several runs {[w for w, n in runs.items() if n != 1][:5]}"
        )

    steps = await _steps(sessions, order_ids)
    open_letters = {
        (letter.order_id, letter.step): letter
        for letter in letters
        if letter.status == DeadLetterStatus.OPEN
    }
    mail = Counter(message.message_id for message in sinks.mail.messages)
    accepted_keys = sinks.warehouse.accepted_keys()
    figures = Figures(orders=len(orders))
    keys = {effect_key(order.id, Step.NOTIFY_WAREHOUSE.value) for order in orders}
    deliveries = [
        d
        for d in sinks.warehouse.deliveries
        if d.idempotency_key in keys and (d.answered < 300 or d.answered == 400)
    ]
    delivered = Counter(str(d.body.get("order_id")) for d in deliveries)
    redriven = {(letter.order_id, letter.step) for letter in letters}
    for order in orders:
        message_id = receipt_message_id(order.id, RECEIPT_FROM)
        to_customer = {m.message_id for m in sinks.mail.to(order.customer_email)}
        order_steps = steps.get(order.id, {})
        receipt = order_steps.get(Step.SEND_RECEIPT.value)
        warehouse = order_steps.get(Step.NOTIFY_WAREHOUSE.value)
        warehouse_key = effect_key(order.id, Step.NOTIFY_WAREHOUSE.value)
        for step in (receipt, warehouse):
            if step is None or step.status == StepStatus.SUCCEEDED:
                continue
            letter = open_letters.get((order.id, step.step))
            if (
                step.status != StepStatus.DEAD_LETTERED
                or letter is None
                or not letter.error_message
            ):
                problems.append(f"{order.id} {step.step} is {step.status} without an open letter")
        receipt_sent = receipt is not None and receipt.status == StepStatus.SUCCEEDED
        if receipt_sent and (to_customer != {message_id} or mail[message_id] < 1):
            problems.append(f"{order.id}: receipt Message-IDs {to_customer or 'none'}")
        if warehouse is not None and warehouse.status == StepStatus.SUCCEEDED:
            if accepted_keys[warehouse_key] != 1:
                problems.append(
                    f"{order.id}: warehouse accepted its key {accepted_keys[warehouse_key]} times"
                )
        elif accepted_keys[warehouse_key]:
            problems.append(f"{order.id}: warehouse has it but the step is parked")
        if order.status not in (OrderStatus.COMPLETED, OrderStatus.NEEDS_ATTENTION):
            problems.append(f"{order.id} is {order.status}")
        figures.receipts += mail[message_id]
        figures.receipt_repeats += max(0, mail[message_id] - 1)
        if repeats_allowed:
            continue
        # Where no fault opened the window, a repeat still needs an attempt that failed after
        # its effect (a ledger commit that failed, an attempt that outlived its timeout on a
        # busy machine): a step that succeeded at its first attempt was delivered once, unless
        # its workflow task timed out on an overloaded worker, which runs the local first
        # attempt again (the same window, opened by the machine instead of the scenario).
        for step, times in ((receipt, mail[message_id]), (warehouse, delivered[order.id])):
            if (
                step is not None
                and times > 1
                and step.occurrence_attempts <= 1
                and (order.id, step.step) not in redriven
                and not await workflow_task_timed_out(temporal, order.id)
            ):
                problems.append(
                    f"{order.id} {step.step}: delivered {times} times, succeeded at attempt 1"
                )
    figures.webhooks = len(deliveries)
    figures.webhook_repeats = sum(1 for d in deliveries if d.duplicate)
    figures.dead_letters = len(open_letters)
    assert not problems, "\n".join(problems[:40])
    return figures
