"""The DBOS peer's workflow and its two follow-up steps.

Configured from the environment like orderflow: SMTP_HOST/SMTP_PORT, WAREHOUSE_WEBHOOK_URL,
WEBHOOK_SIGNING_SECRET and the same RETRY_* settings. The steps use the clients the API's
lifespan hands to `use_clients`, as orderflow's activities use the worker's."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiosmtplib
import httpx
from dbos import DBOS

from activities.receipt import build_receipt
from activities.smtp import SmtpMailer
from activities.warehouse import RETRYABLE_CLIENT_ERRORS, warehouse_payload
from core.ledger import effect_key
from core.models import Order
from core.settings import Settings
from core.signing import SIGNATURE_HEADER, sign

settings = Settings()


class PermanentFailure(Exception):
    """The downstream refused the request itself: retrying cannot help."""


class StepFailed(Exception):
    """A failed attempt worth retrying; carries only text, so DBOS can store it."""


@dataclass(frozen=True)
class Clients:
    mailer: SmtpMailer
    http: httpx.AsyncClient


_clients: Clients | None = None


def use_clients(clients: Clients | None) -> None:
    global _clients
    _clients = clients


def clients() -> Clients:
    if _clients is None:
        raise RuntimeError("the DBOS peer's clients are not set up (the API's lifespan does it)")
    return _clients


def _retryable(failure: BaseException) -> bool:
    return not isinstance(failure, PermanentFailure)


def _order(order: dict[str, Any]) -> Order:
    return Order(
        id=order["id"],
        customer_email=order["customer_email"],
        currency=order["currency"],
        amount_cents=order["amount_cents"],
        items=order["items"],
        created_at=datetime.fromisoformat(order["placed_at"]),
    )


@DBOS.step(
    name="peer.send_receipt",
    retries_allowed=True,
    interval_seconds=settings.RETRY_INITIAL_INTERVAL_SECONDS,
    backoff_rate=settings.RETRY_BACKOFF_COEFFICIENT,
    max_attempts=settings.RETRY_MAX_ATTEMPTS,
    should_retry=_retryable,
)
async def send_receipt(order: dict[str, Any]) -> None:
    try:
        await clients().mailer.send(build_receipt(_order(order), settings.RECEIPT_FROM))
    except aiosmtplib.SMTPResponseException as response:
        error = f"SMTP {response.code}: {response.message}"
        if 500 <= response.code < 600:
            raise PermanentFailure(error) from None
        raise StepFailed(error) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as failure:
        raise StepFailed(f"SMTP unreachable: {type(failure).__name__}: {failure}") from None


@DBOS.step(
    name="peer.notify_warehouse",
    retries_allowed=True,
    interval_seconds=settings.RETRY_INITIAL_INTERVAL_SECONDS,
    backoff_rate=settings.RETRY_BACKOFF_COEFFICIENT,
    max_attempts=settings.RETRY_MAX_ATTEMPTS,
    should_retry=_retryable,
)
async def notify_warehouse(order: dict[str, Any]) -> None:
    body = json.dumps(warehouse_payload(_order(order)), separators=(",", ":")).encode()
    try:
        response = await clients().http.post(
            settings.WAREHOUSE_WEBHOOK_URL,
            content=body,
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": effect_key(order["id"], "notify_warehouse"),
                SIGNATURE_HEADER: sign(settings.webhook_secret, body),
            },
        )
    except httpx.HTTPError as failure:
        raise StepFailed(f"warehouse unreachable: {type(failure).__name__}: {failure}") from None
    status = response.status_code
    if 400 <= status < 500 and status not in RETRYABLE_CLIENT_ERRORS:
        raise PermanentFailure(f"warehouse answered {status}")
    if not response.is_success:
        raise StepFailed(f"warehouse answered {status}")


@DBOS.workflow(name="peer.process_order")
async def process_order(order: dict[str, Any]) -> None:
    # Both steps are created here, in this order, so their step IDs are the same on recovery.
    outcomes = await asyncio.gather(
        send_receipt(order), notify_warehouse(order), return_exceptions=True
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            # The other step has run to its own end; the workflow ends in ERROR, DBOS's dead
            # letter, which keeps its inputs and both steps' outcomes.
            raise outcome
