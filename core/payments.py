"""The payment gateway interface and its sandbox.

A real adapter (Stripe, Adyen, ...) implements `PaymentGateway.charge` by calling the provider
with the same idempotency key, so that a retried request returns the first charge's result
instead of charging again; it maps the provider's decline into `ChargeResult(succeeded=False)`
and raises `GatewayUnavailable` when the outcome is unknown (timeout, 5xx), which leaves the
request retryable under the same key.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from core.models import PaymentCharge

# Documented test tokens: each declines with the reason shown; any other `tok_...` succeeds.
DECLINING_TOKENS = {
    "tok_declined": "card_declined: the card was declined",
    "tok_insufficient_funds": "insufficient_funds: the card has insufficient funds",
    "tok_expired": "expired_card: the card has expired",
}
# Raises GatewayUnavailable, to exercise the path where the charge outcome is unknown.
UNAVAILABLE_TOKEN = "tok_gateway_down"


@dataclass(frozen=True)
class ChargeResult:
    charge_id: str
    succeeded: bool
    decline_reason: str | None = None


class GatewayUnavailable(Exception):
    """The gateway could not be reached or did not say how the charge ended."""


class PaymentGateway(Protocol):
    async def charge(
        self, amount_cents: int, currency: str, token: str, idempotency_key: str
    ) -> ChargeResult: ...


@runtime_checkable
class InDatabaseGateway(PaymentGateway, Protocol):
    """A gateway whose ledger lives in orderflow's own database (the sandbox): its charge can be
    written inside the caller's transaction, so that claiming the key, charging and committing
    the order are one unit. A provider across the network cannot do that and takes the key
    claim, `charge`, then the commit."""

    async def charge_within(
        self,
        connection: AsyncConnection,
        amount_cents: int,
        currency: str,
        token: str,
        idempotency_key: str,
    ) -> ChargeResult:
        """Writes the charge on `connection` without committing; raises IntegrityError when this
        key was charged before, GatewayUnavailable as `charge` does."""
        ...


# Built once: every charge runs it, and building a statement costs more than running it.
INSERT_CHARGE = insert(PaymentCharge)


class SandboxGateway:
    """Keeps its charges in our database under a unique idempotency key, as a real gateway does
    on its side; no money moves."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def charge(
        self, amount_cents: int, currency: str, token: str, idempotency_key: str
    ) -> ChargeResult:
        charge = _decide(token)
        try:
            async with self._sessions.begin() as session:
                await _record(
                    await session.connection(), charge, amount_cents, currency, idempotency_key
                )
        except IntegrityError:
            # This key was charged before (a retry, or a concurrent twin): its result is ours.
            raced = await self._find(idempotency_key)
            if raced is None:
                raise
            return raced
        return charge

    async def charge_within(
        self,
        connection: AsyncConnection,
        amount_cents: int,
        currency: str,
        token: str,
        idempotency_key: str,
    ) -> ChargeResult:
        charge = _decide(token)
        await _record(connection, charge, amount_cents, currency, idempotency_key)
        return charge

    async def _find(self, idempotency_key: str) -> ChargeResult | None:
        async with self._sessions() as session:
            row = await session.scalar(
                select(PaymentCharge).where(PaymentCharge.idempotency_key == idempotency_key)
            )
        if row is None:
            return None
        return ChargeResult(row.id, row.succeeded, row.decline_reason)


def _decide(token: str) -> ChargeResult:
    if token == UNAVAILABLE_TOKEN:
        raise GatewayUnavailable("sandbox gateway is down for this token")
    decline = DECLINING_TOKENS.get(token)
    return ChargeResult(f"ch_{uuid.uuid4().hex[:24]}", decline is None, decline)


async def _record(
    connection: AsyncConnection,
    charge: ChargeResult,
    amount_cents: int,
    currency: str,
    idempotency_key: str,
) -> None:
    await connection.execute(
        INSERT_CHARGE,
        {
            "id": charge.charge_id,
            "idempotency_key": idempotency_key,
            "amount_cents": amount_cents,
            "currency": currency,
            "succeeded": charge.succeeded,
            "decline_reason": charge.decline_reason,
        },
    )
