"""Placing an order: the work the customer waits for (validate, claim the idempotency key, charge,
commit the order with its outbox entry) and nothing else. Everything after goes to the workflow."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

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
from core.payments import ChargeResult, GatewayUnavailable, InDatabaseGateway, PaymentGateway


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
    # What the charge and the order are keyed by in this use of the key (see `_charge_key`).
    charge_key: str


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
# The IETF Idempotency-Key draft's expiry, as most gateways keep theirs (Stripe: 24 hours).
DEFAULT_KEY_TTL = timedelta(hours=24)
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


def _reused_charge_key(key: str) -> str:
    """The gateway and order key of a key used again after it expired: the client's key stays
    recognisable, the suffix makes it a new charge at a gateway that still remembers the first
    one (its own expiry may be longer than ours), and it still fits the 255 characters."""
    return f"{key[:200]}~{uuid.uuid4().hex}"


def _location(order_id: str) -> dict[str, str]:
    return {"Location": f"/orders/{order_id}"}


def _accepted(order_id: str) -> dict[str, Any]:
    return {"order_id": order_id, "workflow_id": order_id, "status": OrderStatus.PROCESSING}


async def _insert_order(
    connection: AsyncConnection,
    order_id: str,
    key: str,
    order: OrderIn,
    charge: ChargeResult,
    now: datetime,
) -> None:
    """The order, its pending steps and its outbox entry, on the caller's transaction. `now`
    is the intake's clock: a later use of the key reads the order's age (see `_charge_key`)."""
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
            "created_at": now,
            "updated_at": now,
        },
    )
    await connection.execute(INSERT_STEP, [{"order_id": order_id, "step": step} for step in STEPS])
    await connection.execute(INSERT_OUTBOX, {"order_id": order_id})


class OrderIntake:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        gateway: PaymentGateway,
        lease: timedelta,
        *,
        key_ttl: timedelta = DEFAULT_KEY_TTL,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._engine: AsyncEngine = sessions.kw["bind"]
        self._gateway = gateway
        # Its charge can join the intake's transaction (see _place_at_once).
        self._in_database = gateway if isinstance(gateway, InDatabaseGateway) else None
        self._lease = lease
        self._key_ttl = key_ttl
        self._clock = clock

    async def place(self, key: str, order: OrderIn) -> IntakeOutcome:
        fingerprint = request_fingerprint(order)
        if self._in_database is not None:
            placed = await self._place_at_once(self._in_database, key, fingerprint, order)
            if placed is not None:
                return placed
        claim = await self._claim(key, fingerprint)
        if isinstance(claim, IntakeOutcome):
            # A 422 is a key reused for another body, not a repeat of this request.
            if claim.status_code != 422:
                record_order_deduplicated("key")
            return claim

        try:
            charge = await self._gateway.charge(
                order.amount_cents,
                order.currency,
                order.payment_token,
                idempotency_key=claim.charge_key,
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
        body = _accepted(order_id)
        try:
            async with self._sessions.begin() as session:
                connection = await session.connection()
                await _insert_order(
                    connection, order_id, claim.charge_key, order, charge, self._clock()
                )
                await self._mark_key_completed(session, key, 202, body, order_id)
        except IntegrityError:
            # Our lease ran out and a retry of this request took the key over and committed the
            # order first (orders.idempotency_key is unique): its order is the answer.
            return await self._answer_with_existing_order(key, claim.charge_key)
        except DATABASE_ERRORS as failure:
            if not is_database_outage(failure):
                raise
            raise await self._unavailable(key, claim) from failure
        record_order_accepted()
        return IntakeOutcome(202, body, _location(order_id), new_order_id=order_id)

    async def _place_at_once(
        self, gateway: InDatabaseGateway, key: str, fingerprint: str, order: OrderIn
    ) -> IntakeOutcome | None:
        """Charges, claims the key with its answer and commits the order in one transaction: one
        BEGIN and COMMIT instead of three, and no key row is ever seen in flight. All or nothing:
        when the key or its charge exists already (a repeat, a reuse with another body, a holder
        mid-way, an order whose key row was lost, a key used again after it expired) or the gateway
        is down, it rolls back and answers None, and the caller takes the claim-charge-commit path,
        which then finds the database as if this had never run. On PostgreSQL a concurrent
        duplicate's INSERT waits on the unique index for this transaction and then fails; on SQLite
        BEGIN IMMEDIATE queues it behind this one. Either way it never charges a second time. A
        database that fails mid-way leaves nothing behind either: there is no claim to free, the
        outage handler answers 503, and the retry starts afresh."""
        order_id = new_order_id()
        try:
            # Core statements on the engine's connection, not a session: this transaction is
            # most of the CPU an intake costs, and it has nothing for the ORM to track.
            async with self._engine.begin() as connection:
                charge = await gateway.charge_within(
                    connection, order.amount_cents, order.currency, order.payment_token, key
                )
                if charge.succeeded:
                    status, body = 202, _accepted(order_id)
                else:
                    status, body = 402, {"detail": charge.decline_reason or "card declined"}
                now = self._clock()
                await connection.execute(
                    INSERT_KEY,
                    {
                        "key": key,
                        "request_hash": fingerprint,
                        "state": KeyState.COMPLETED,
                        "locked_until": now,
                        "response_status": status,
                        "response_body": body,
                        "order_id": order_id if charge.succeeded else None,
                        "created_at": now,
                        "updated_at": now,
                    },
                )
                if charge.succeeded:
                    await _insert_order(connection, order_id, key, order, charge, now)
        except (IntegrityError, GatewayUnavailable):
            return None
        if not charge.succeeded:
            record_order_declined()
            return IntakeOutcome(402, body, {})
        record_order_accepted()
        return IntakeOutcome(202, body, _location(order_id), new_order_id=order_id)

    async def _claim(self, key: str, fingerprint: str) -> Lease | IntakeOutcome:
        """Takes the key for this request, or answers as the request that holds it would.

        The primary key on idempotency_keys settles concurrent duplicates, in one process or many:
        on PostgreSQL (READ COMMITTED) a second INSERT waits for the first one's transaction and
        then fails with a unique violation; on SQLite BEGIN IMMEDIATE queues the writers. A key
        older than its TTL is taken over under the same row lock as an expired lease, so of two
        requests reusing it one starts the new use and the other finds it in flight."""
        for _ in range(CLAIM_ROUNDS):
            now = self._clock()
            lease_until = now + self._lease
            try:
                async with self._sessions.begin() as session:
                    connection = await session.connection()
                    charge_key = await self._charge_key(session, key, now)
                    await connection.execute(
                        INSERT_KEY,
                        {
                            "key": key,
                            "request_hash": fingerprint,
                            "state": KeyState.IN_FLIGHT,
                            "locked_until": lease_until,
                            "charge_key": None if charge_key == key else charge_key,
                            "created_at": now,
                            "updated_at": now,
                        },
                    )
                return Lease(lease_until, charge_key)
            except IntegrityError:
                pass

            async with self._sessions.begin() as session:
                # FOR UPDATE: two requests that both find an expired lease (or key) take it over
                # one after the other, and the second sees the first's fresh lease.
                held = await session.get(IdempotencyKey, key, with_for_update=True)
                if held is None:  # freed between our INSERT and this read: claim again
                    continue
                # Read the clock after the lock: the row lock may have made us wait.
                now = self._clock()
                if held.created_at <= now - self._key_ttl and (
                    held.state == KeyState.COMPLETED or held.locked_until <= now
                ):
                    # Expired: this is a new request that happens to carry an old key.
                    lease = Lease(now + self._lease, _reused_charge_key(key))
                    held.request_hash = fingerprint
                    held.state = KeyState.IN_FLIGHT
                    held.locked_until = lease.until
                    held.charge_key = lease.charge_key
                    held.response_status = None
                    held.response_body = None
                    held.order_id = None
                    held.created_at = now
                    held.updated_at = now
                    return lease
                if held.request_hash != fingerprint:
                    return IntakeOutcome(422, KEY_REUSED, {})
                if held.state == KeyState.COMPLETED:
                    assert held.response_status is not None and held.response_body is not None
                    headers = _location(held.order_id) if held.order_id else {}
                    return IntakeOutcome(held.response_status, held.response_body, headers)
                if held.locked_until > now:
                    wait = max(1, math.ceil((held.locked_until - now).total_seconds()))
                    return IntakeOutcome(
                        409,
                        {"detail": "a request with this Idempotency-Key is still in progress"},
                        {"Retry-After": str(wait)},
                    )
                # The holder died mid-request; the charge and the order insert are keyed, so
                # taking over cannot charge or write twice.
                lease = Lease(now + self._lease, held.charge_key or key)
                held.locked_until = lease.until
                return lease
        raise RuntimeError(f"could not claim idempotency key after {CLAIM_ROUNDS} rounds")

    async def _charge_key(self, session: AsyncSession, key: str, now: datetime) -> str:
        """The client's key, unless an order older than the TTL already carries it: then this
        is a new use of a key whose row the cleanup deleted, and it gets a key of its own. An
        order within the TTL is this same use (its key row was lost) and is answered from."""
        first_use = await session.scalar(
            select(Order.created_at).where(Order.idempotency_key == key)
        )
        if first_use is not None and first_use <= now - self._key_ttl:
            return _reused_charge_key(key)
        return key

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
                RETRY_AFTER_SECONDS, math.ceil((lease.until - self._clock()).total_seconds())
            )
        return DependencyUnavailable(
            DATABASE,
            "the database is unavailable; retry with the same Idempotency-Key",
            retry_after,
        )

    async def _release(self, key: str, lease: Lease) -> None:
        held_by_us = (
            IdempotencyKey.key == key,
            IdempotencyKey.state == KeyState.IN_FLIGHT,
            IdempotencyKey.locked_until == lease.until,
        )
        async with self._sessions.begin() as session:
            if lease.charge_key == key:
                await session.execute(delete(IdempotencyKey).where(*held_by_us))
            else:
                # A reused key's row holds the charge key its retry must present to the gateway
                # again (the charge's outcome may be unknown): end the lease, keep the row.
                await session.execute(
                    update(IdempotencyKey)
                    .where(*held_by_us)
                    .values(locked_until=self._clock() - timedelta(microseconds=1))
                )

    async def _answer_with_existing_order(self, key: str, charge_key: str) -> IntakeOutcome:
        """Answers with the order already committed under this key, and records that answer on
        the key in case the request that committed it could not (its row was freed meanwhile)."""
        async with self._sessions.begin() as session:
            order_id = await session.scalar(
                select(Order.id).where(Order.idempotency_key == charge_key)
            )
            if order_id is None:
                raise RuntimeError(f"order insert conflicted but no order has key {key!r}")
            body = _accepted(order_id)
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
