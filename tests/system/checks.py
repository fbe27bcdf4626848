"""What every scenario ends with: wait until each accepted order is settled, then check, for
every one of them, what docs/reliability.md promises: one order row and one charge (of the
order's total) per key, its key's stored answer, its outbox entry started, one workflow, both
step rows, an order status its steps derive, one open dead letter exactly for each parked step,
and every effect delivered once, counted at the receivers before any de-duplication of theirs.

A second delivery of an effect passes only when the attempt that sent it was in flight when a
fault the scenario injected (a killed worker, a cut link) hit its worker, which the ledger shows:
each delivery carries its claim's token; the step's row names the claim that recorded the effect,
and `interrupted_claims` every claim that ended without an outcome, with its worker and when it
was live. Such repeats are counted per scenario; any other one fails the suite."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from activities.receipt import receipt_message_id
from core.contracts import overall_status
from core.ledger import ATTEMPT_HEADER, effect_key
from core.models import (
    DeadLetter,
    DeadLetterStatus,
    IdempotencyKey,
    InterruptedClaim,
    KeyState,
    Order,
    OrderStatus,
    OrderStep,
    PaymentCharge,
    Step,
    StepStatus,
    WorkflowOutbox,
)
from tests.support import wait_until
from tests.system.sinks import Sinks

RECEIPT_FROM = "orders@orderflow.localhost"
SETTLED_STEPS = frozenset({StepStatus.SUCCEEDED, StepStatus.DEAD_LETTERED})
ACTIVE_LETTERS = frozenset({DeadLetterStatus.OPEN, DeadLetterStatus.RETRYING})


@dataclass(frozen=True)
class Fault:
    """A fault a scenario injected into worker processes (their SDK identities, pid@host):
    killed at `start` (= `end`), or their links cut from `start` to `end` (epoch seconds)."""

    what: str
    workers: frozenset[str]
    start: float
    end: float

    def hit(self, claim: InterruptedClaim) -> bool:
        """Whether the claim's attempt was live on a worker this fault hit, while it hit."""
        return (
            claim.worker in self.workers
            and claim.claimed_at.timestamp() <= self.end
            and claim.claimed_until.timestamp() >= self.start
        )


@dataclass
class Figures:
    """What one scenario saw, as docs/reliability.md reports it."""

    orders: int = 0
    receipts: int = 0
    receipt_repeats: int = 0
    webhooks: int = 0
    webhook_repeats: int = 0
    # Repeats whose sending attempt was in flight at an injected fault (all the repeats there
    # may be).
    repeats_from_faults: int = 0
    dead_letters: int = 0
    drain_seconds: float = 0.0
    answers: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


async def _orders(sessions: async_sessionmaker[AsyncSession], prefix: str) -> list[Order]:
    async with sessions() as session:
        return list(
            await session.scalars(select(Order).where(Order.idempotency_key.like(f"{prefix}-%")))
        )


async def _rows_of(
    sessions: async_sessionmaker[AsyncSession], entity: Any, order_ids: list[str]
) -> list[Any]:
    """Every row of `entity` (a table with an order_id) for these orders."""
    rows: list[Any] = []
    async with sessions() as session:
        for chunk in _chunks(order_ids):
            rows += (await session.scalars(select(entity).where(entity.order_id.in_(chunk)))).all()
    return rows


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


async def workflow_task_timeouts(temporal: Client, workflow_id: str) -> int:
    """How many of the workflow's tasks timed out (each runs its local activities again)."""
    timed_out = 0
    async for event in temporal.get_workflow_handle(workflow_id).fetch_history_events():
        timed_out += event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT
    return timed_out


async def started_by(temporal: Client, workflow_id: str) -> int:
    """The process ID of the client that started the workflow (the SDK's identity pid@host)."""
    async for event in temporal.get_workflow_handle(workflow_id).fetch_history_events():
        identity = event.workflow_execution_started_event_attributes.identity
        return int(identity.partition("@")[0])
    raise AssertionError(f"{workflow_id} has no history")


async def settled_count(sessions: async_sessionmaker[AsyncSession], prefix: str) -> int:
    """How many of the scenario's orders have every step settled (succeeded or parked): one
    counting query, as the drain curve asks every second while the rush runs beside it."""
    unsettled = (
        select(OrderStep.order_id)
        .where(OrderStep.order_id == Order.id, OrderStep.status.not_in(SETTLED_STEPS))
        .exists()
    )
    async with sessions() as session:
        settled = await session.scalar(
            select(func.count())
            .select_from(Order)
            .where(Order.idempotency_key.like(f"{prefix}-%"), ~unsettled)
        )
    return int(settled or 0)


async def wait_until_settled(
    sessions: async_sessionmaker[AsyncSession], prefix: str, expected: int, within: float
) -> float:
    """Waits until the scenario's orders are all in and each step succeeded or is parked;
    returns how long that took."""
    started = time.monotonic()

    async def settled() -> bool:
        return await settled_count(sessions, prefix) >= expected

    await wait_until(settled, within=within, interval=0.5, message=f"{prefix} orders settled")
    return time.monotonic() - started


@dataclass
class _Effects:
    """Each step's deliveries, as the receivers recorded them before their de-duplication: the
    claim token each carried, keyed by (order ID, step)."""

    sent: dict[tuple[str, str], list[str | None]] = field(default_factory=dict)

    def add(self, order_id: str, step: str, token: str | None) -> None:
        self.sent.setdefault((order_id, step), []).append(token)

    def of(self, order_id: str, step: str) -> list[str | None]:
        return self.sent.get((order_id, step), [])


def _effects(sinks: Sinks, orders: list[Order]) -> _Effects:
    effects = _Effects()
    by_message_id = {receipt_message_id(o.id, RECEIPT_FROM): o for o in orders}
    for mail in sinks.mail.messages:
        order = by_message_id.get(mail.message_id)
        if order is not None and order.customer_email in mail.recipients:
            token = mail.message[ATTEMPT_HEADER]
            effects.add(order.id, Step.SEND_RECEIPT, str(token) if token else None)
    by_key = {effect_key(o.id, Step.NOTIFY_WAREHOUSE): o for o in orders}
    for delivery in sinks.warehouse.deliveries:
        order = by_key.get(delivery.idempotency_key or "")
        # Taken: a 2xx, the receiver's "duplicate" answer to a repeat included.
        if order is not None and 200 <= delivery.answered < 300:
            effects.add(order.id, Step.NOTIFY_WAREHOUSE, delivery.attempt)
    return effects


def _repeats(
    tokens: list[str | None],
    interrupted: dict[str, InterruptedClaim],
    faults: Sequence[Fault],
) -> tuple[int, int]:
    """(repeats from faults, repeats nothing explains) among one step's deliveries. A delivery
    is explained when its claim was interrupted (it never recorded an outcome) and a fault hit
    its worker while the claim was live; one delivery, the recording claim's, needs none."""
    explained = sum(
        1
        for token in tokens
        if (claim := interrupted.get(token or "")) is not None
        and any(fault.hit(claim) for fault in faults)
    )
    repeats = max(len(tokens) - 1, 0)
    from_faults = min(explained, repeats)
    return from_faults, repeats - from_faults


async def check_orders(
    *,
    sessions: async_sessionmaker[AsyncSession],
    temporal: Client,
    sinks: Sinks,
    task_queue: str,
    prefix: str,
    accepted: dict[str, str],
    faults: Sequence[Fault] = (),
) -> Figures:
    """The end-of-scenario check over every order the client was told was accepted, and every
    order row the scenario's keys made (there must be no other). `faults` are the faults the
    scenario injected: the only cause a repeated delivery may have."""
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

    order_ids = [order.id for order in orders]
    async with sessions() as session:
        charges = list(
            await session.scalars(
                select(PaymentCharge).where(PaymentCharge.idempotency_key.like(f"{prefix}-%"))
            )
        )
        stored = {
            key.key: key
            for key in await session.scalars(
                select(IdempotencyKey).where(IdempotencyKey.key.like(f"{prefix}-%"))
            )
        }
    letters: list[DeadLetter] = await _rows_of(sessions, DeadLetter, order_ids)
    outbox = {row.order_id: row for row in await _rows_of(sessions, WorkflowOutbox, order_ids)}
    steps: dict[str, dict[str, OrderStep]] = {}
    for step in await _rows_of(sessions, OrderStep, order_ids):
        steps.setdefault(step.order_id, {})[step.step] = step
    interrupted = {
        claim.token: claim for claim in await _rows_of(sessions, InterruptedClaim, order_ids)
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
    charged = Counter(charge.idempotency_key for charge in charges)
    if any(n != 1 for n in charged.values()) or set(charged) != set(by_key):
        problems.append(
            f"charges per key not one each: {dict(Counter(charged.values()))}, "
            f"{len(charged)} charged keys for {len(by_key)} orders"
        )
    amount_of = {order.idempotency_key: order.amount_cents for order in orders}
    overcharged = [
        (c.idempotency_key, c.amount_cents)
        for c in charges
        if not c.succeeded or c.amount_cents != amount_of.get(c.idempotency_key)
    ]
    if overcharged:
        problems.append(f"charges that are not the order's total: {overcharged[:5]}")
    unstarted = [o for o in order_ids if o not in outbox or outbox[o].started_at is None]
    if unstarted:
        problems.append(f"orders without a started outbox entry: {unstarted[:5]}")

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

    active = Counter(
        (letter.order_id, letter.step) for letter in letters if letter.status in ACTIVE_LETTERS
    )
    effects = _effects(sinks, orders)
    figures = Figures(orders=len(orders), dead_letters=sum(active.values()))
    unexplained: list[str] = []
    for order in orders:
        order_steps = steps.get(order.id, {})
        if set(order_steps) != {step.value for step in Step}:
            problems.append(f"{order.id} has step rows {sorted(order_steps)}")
            continue
        derived = overall_status(
            (s.status for s in order_steps.values()), cancelled=order.cancelled_at is not None
        )
        if order.status != derived or order.status not in (
            OrderStatus.COMPLETED,
            OrderStatus.NEEDS_ATTENTION,
        ):
            problems.append(f"{order.id} is {order.status}; its steps make it {derived}")
        for step in order_steps.values():
            parked = step.status == StepStatus.DEAD_LETTERED
            letters_open = active[(order.id, step.step)]
            if letters_open != (1 if parked else 0):
                problems.append(
                    f"{order.id} {step.step} is {step.status} with {letters_open} open letters"
                )
            if step.status not in SETTLED_STEPS:
                problems.append(f"{order.id} {step.step} is {step.status}")
            tokens = effects.of(order.id, step.step)
            if step.status == StepStatus.SUCCEEDED and not tokens:
                problems.append(f"{order.id} {step.step} succeeded but nothing was delivered")
            if step.status != StepStatus.SUCCEEDED and tokens:
                problems.append(f"{order.id} {step.step} is {step.status} but was delivered")
            from_faults, others = _repeats(tokens, interrupted, faults)
            figures.repeats_from_faults += from_faults
            if others:
                sent = [
                    (t, c.worker, c.attempt, c.ended) if (c := interrupted.get(t or "")) else (t,)
                    for t in tokens
                ]
                unexplained.append(
                    f"{order.id} {step.step} delivered {len(tokens)} times: {sent}; the claim "
                    f"that recorded it: {step.claim_token} on {step.claimed_by}"
                )
        # Never two different receipts: every message to the customer is this order's.
        foreign = {m.message_id for m in sinks.mail.to(order.customer_email)} - {
            receipt_message_id(order.id, RECEIPT_FROM)
        }
        if foreign:
            problems.append(f"{order.id}: receipts with other Message-IDs {foreign}")
        receipts = len(effects.of(order.id, Step.SEND_RECEIPT))
        webhooks = len(effects.of(order.id, Step.NOTIFY_WAREHOUSE))
        figures.receipts += receipts
        figures.receipt_repeats += max(0, receipts - 1)
        figures.webhooks += webhooks
        figures.webhook_repeats += max(0, webhooks - 1)
    if unexplained:
        problems.append(
            f"{len(unexplained)} effects delivered again with no fault in flight at their "
            f"attempt ({len(faults)} faults injected): {unexplained[:10]}"
        )
    assert not problems, "\n".join(problems[:40])
    return figures
