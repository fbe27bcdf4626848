"""Placing an order: the work the customer waits for (validate, claim the idempotency key, charge,
commit the order with its outbox entry) and nothing else. Everything after goes to the workflow."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.schemas import OrderIn
from core.contracts import STEPS
from core.metrics import record_order_accepted, record_order_declined, record_order_deduplicated
from core.models import (
    IdempotencyKey,
    KeyState,
    Order,
    OrderStatus,
    OrderStep,
    WorkflowOutbox,
    utcnow,
)
from core.outages import (
    DATABASE,
    DATABASE_ERRORS,
    RETRY_AFTER_SECONDS,
    DependencyUnavailable,
    is_database_outage,
)
from core.payments import GatewayUnavailable, PaymentGateway


@dataclass(frozen=True)
class IntakeOutcome:
    status_code: int
    body: dict[str, Any]
    headers: dict[str, str]
    # Set when this request created the order, so the caller starts its workflow.
    new_order_id: str | None = None


@dataclass(frozen=True)
class Lease:
    """This request holds the key until `until`; the value doubles as a fencing token, so a
    request whose lease ran out cannot free a key that another request has taken over since."""

    until: datetime


# The intake's writes, built once: constructing a statement costs more CPU than running it
# (SQLAlchemy caches the compiled form, not the construction), and these run on every order.
INSERT_KEY = insert(IdempotencyKey)
INSERT_ORDER = insert(Order)
INSERT_STEP = insert(OrderStep)
INSERT_OUTBOX = insert(WorkflowOutbox)
COMPLETE_KEY = update(IdempotencyKey).where(IdempotencyKey.key == bindparam("held_key"))

# Claiming loops only when the key row vanishes between our INSERT and our read (a holder freed
# it after a gateway outage); a handful of rounds covers any real interleaving.
CLAIM_ROUNDS = 5
# How long freeing a key may take after the database failed mid-request; past it the lease frees it.
RELEASE_TIMEOUT_SECONDS = 2.0
KEY_REUSED = {
    # FastAPI's list shape, as every other 422 of the API.
    "detail": [
        {
            "type": "idempotency_key_reused",
            "loc": ["header", "Idempotency-Key"],
            "msg": "Idempotency-Key was already used for a different request body",
        }
    ]
}


def request_fingerprint(order: OrderIn) -> str:
    canonical = json.dumps(order.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_order_id() -> str:
    return f"ord_{uuid.uuid4().hex}"


def _location(order_id: str) -> dict[str, str]:
    return {"Location": f"/orders/{order_id}"}


class OrderIntake:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        gateway: PaymentGateway,
        lease: timedelta,
    ) -> None:
        self._sessions = sessions
        self._gateway = gateway
        self._lease = lease

    async def place(self, key: str, order: OrderIn) -> IntakeOutcome:
        fingerprint = request_fingerprint(order)
        claim = await self._claim(key, fingerprint)
        if isinstance(claim, IntakeOutcome):
            # A 422 is a key reused for another body, not a repeat of this request.
            if claim.status_code != 422:
                record_order_deduplicated("key")
            return claim

        try:
            charge = await self._gateway.charge(
                order.amount_cents, order.currency, order.payment_token, idempotency_key=key
            )
        except GatewayUnavailable as failure:
            # The charge's outcome is unknown: free the key so the client's retry (same key, so
            # the gateway replays rather than re-charges) can settle it.
            await self._release(key, claim)
            return IntakeOutcome(
                503,
                {
                    "detail": f"payment gateway unavailable, retry with the same key: {failure}",
                    "dependency": "payment_gateway",
                },
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        except DATABASE_ERRORS as failure:
            # The sandbox gateway keeps its charges in our database.
            if not is_database_outage(failure):
                raise
            raise await self._unavailable(key, claim) from failure

        if not charge.succeeded:
            body = {"detail": charge.decline_reason or "card declined"}
            await self._complete_key(key, 402, body, order_id=None)
            record_order_declined()
            return IntakeOutcome(402, body, {})

        order_id = new_order_id()
        body = {"order_id": order_id, "workflow_id": order_id, "status": OrderStatus.PROCESSING}
        try:
            async with self._sessions.begin() as session:
                # Core statements, not the unit of work: this transaction is most of the CPU an
                # intake costs, and it has nothing for the ORM to track.
                connection = await session.connection()
                await connection.execute(
                    INSERT_ORDER,
                    {
                        "id": order_id,
                        "idempotency_key": key,
                        "customer_email": order.customer_email,
                        "currency": order.currency,
                        "amount_cents": order.amount_cents,
                        "items": [item.model_dump() for item in order.items],
                        "charge_id": charge.charge_id,
                    },
                )
                await connection.execute(
                    INSERT_STEP, [{"order_id": order_id, "step": step} for step in STEPS]
                )
                await connection.execute(INSERT_OUTBOX, {"order_id": order_id})
                await self._mark_key_completed(session, key, 202, body, order_id)
        except IntegrityError:
            # Our lease ran out and a retry of this request took the key over and committed the
            # order first (orders.idempotency_key is unique): its order is the answer.
            return await self._answer_with_existing_order(key)
        except DATABASE_ERRORS as failure:
            if not is_database_outage(failure):
                raise
            raise await self._unavailable(key, claim) from failure
        record_order_accepted()
        return IntakeOutcome(202, body, _location(order_id), new_order_id=order_id)

    async def _claim(self, key: str, fingerprint: str) -> Lease | IntakeOutcome:
        """Takes the key for this request, or answers as the request that holds it would.

        The primary key on idempotency_keys settles concurrent duplicates, in one process or many:
        on PostgreSQL (READ COMMITTED) a second INSERT waits for the first one's transaction and
        then fails with a unique violation; on SQLite BEGIN IMMEDIATE queues the writers."""
        for _ in range(CLAIM_ROUNDS):
            lease = Lease(utcnow() + self._lease)
            try:
                async with self._sessions.begin() as session:
                    connection = await session.connection()
                    await connection.execute(
                        INSERT_KEY,
                        {
                            "key": key,
                            "request_hash": fingerprint,
                            "state": KeyState.IN_FLIGHT,
                            "locked_until": lease.until,
                        },
                    )
                return lease
            except IntegrityError:
                pass

            async with self._sessions.begin() as session:
                # FOR UPDATE: two requests that both find an expired lease take it over one
                # after the other, and the second sees the first's fresh lease.
                held = await session.get(IdempotencyKey, key, with_for_update=True)
                if held is None:  # freed between our INSERT and this read: claim again
                    continue
                if held.request_hash != fingerprint:
                    return IntakeOutcome(422, KEY_REUSED, {})
                if held.state == KeyState.COMPLETED:
                    assert held.response_status is not None and held.response_body is not None
                    headers = _location(held.order_id) if held.order_id else {}
                    return IntakeOutcome(held.response_status, held.response_body, headers)
                # Read the clock after the lock: the row lock may have made us wait.
                now = utcnow()
                if held.locked_until > now:
                    wait = max(1, math.ceil((held.locked_until - now).total_seconds()))
                    return IntakeOutcome(
                        409,
                        {"detail": "a request with this Idempotency-Key is still in progress"},
                        {"Retry-After": str(wait)},
                    )
                # The holder died mid-request; the charge and the order insert are keyed, so
                # taking over cannot charge or write twice.
                lease = Lease(now + self._lease)
                held.locked_until = lease.until
                return lease
        raise RuntimeError(f"could not claim idempotency key after {CLAIM_ROUNDS} rounds")

    async def _unavailable(self, key: str, lease: Lease) -> DependencyUnavailable:
        """What to raise when the database failed after this request claimed the key: the
        order's transaction is all or nothing, so either it committed (a retry replays it) or
        nothing of it did; the charge is keyed, so a retry replays it instead of charging again.
        Only the claim is left to settle: freed now if the database answers, so a retry goes
        straight through, else held until its lease runs out, which the Retry-After says."""
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                await self._release(key, lease)
            retry_after = RETRY_AFTER_SECONDS
        except Exception:
            retry_after = max(
                RETRY_AFTER_SECONDS, math.ceil((lease.until - utcnow()).total_seconds())
            )
        return DependencyUnavailable(
            DATABASE,
            "the database is unavailable; retry with the same Idempotency-Key",
            retry_after,
        )

    async def _release(self, key: str, lease: Lease) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                delete(IdempotencyKey).where(
                    IdempotencyKey.key == key,
                    IdempotencyKey.state == KeyState.IN_FLIGHT,
                    IdempotencyKey.locked_until == lease.until,
                )
            )

    async def _answer_with_existing_order(self, key: str) -> IntakeOutcome:
        """Answers with the order already committed under this key, and records that answer on
        the key in case the request that committed it could not (its row was freed meanwhile)."""
        async with self._sessions.begin() as session:
            order_id = await session.scalar(select(Order.id).where(Order.idempotency_key == key))
            if order_id is None:
                raise RuntimeError(f"order insert conflicted but no order has key {key!r}")
            body = {"order_id": order_id, "workflow_id": order_id, "status": OrderStatus.PROCESSING}
            await self._mark_key_completed(session, key, 202, body, order_id)
        return IntakeOutcome(202, body, _location(order_id))

    async def _complete_key(
        self, key: str, status: int, body: dict[str, Any], order_id: str | None
    ) -> None:
        async with self._sessions.begin() as session:
            await self._mark_key_completed(session, key, status, body, order_id)

    @staticmethod
    async def _mark_key_completed(
        session: AsyncSession, key: str, status: int, body: dict[str, Any], order_id: str | None
    ) -> None:
        connection = await session.connection()
        await connection.execute(
            COMPLETE_KEY,
            {
                "held_key": key,
                "state": KeyState.COMPLETED,
                "response_status": status,
                "response_body": body,
                "order_id": order_id,
                "updated_at": utcnow(),
            },
        )
