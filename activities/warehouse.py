"""The warehouse webhook: a signed POST per order that the warehouse can deduplicate by key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.checkpoint import Checkpoint, no_checkpoint
from activities.retry import Backoff, LedgerOutages, parse_retry_after, permanent
from activities.step_attempt import StepAttempts, StepRefused
from core.contracts import StepInput, StepResult
from core.ledger import ATTEMPT_HEADER, effect_key
from core.models import Order
from core.settings import Settings
from core.signing import SIGNATURE_HEADER, sign
from core.states import Step

STEP = Step.NOTIFY_WAREHOUSE.value
# Statuses that can succeed later (the warehouse's contract); any other 4xx means the request
# itself is wrong.
RETRYABLE_CLIENT_ERRORS = frozenset({408, 429})
RETRY_AFTER_STATUSES = frozenset({429, 503})


def warehouse_payload(order: Order) -> dict[str, Any]:
    return {
        "event": "order.placed",
        "order_id": order.id,
        "currency": order.currency,
        "amount_cents": order.amount_cents,
        "items": [{"sku": item["sku"], "quantity": item["quantity"]} for item in order.items],
        "placed_at": order.created_at.isoformat(),
    }


@dataclass(frozen=True)
class Webhook:
    body: bytes
    headers: dict[str, str]


class WarehouseNotice:
    """The webhook as a step's effect: network errors, timeouts, 408, 429 and 5xx are retried
    (after `Retry-After` where the warehouse sends one), any other 4xx is a refusal for good."""

    step = STEP

    def __init__(self, http: httpx.AsyncClient, backoff: Backoff, settings: Settings) -> None:
        self._http = http
        self._backoff = backoff
        self._url = settings.WAREHOUSE_WEBHOOK_URL
        self._secret = settings.webhook_secret
        self._timeout = settings.WEBHOOK_TIMEOUT_SECONDS

    def prepare(self, order: Order, token: str) -> Webhook | None:
        if order.cancelled_at is not None:
            # Cancelled before this attempt: the warehouse must not hear of the order.
            return None
        body = json.dumps(warehouse_payload(order), separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": effect_key(order.id, STEP),
            SIGNATURE_HEADER: sign(self._secret, body),
            ATTEMPT_HEADER: token,
        }
        return Webhook(body, headers)

    async def perform(self, webhook: Webhook, attempt: int) -> dict[str, Any]:
        try:
            response = await self._http.post(
                self._url, content=webhook.body, headers=webhook.headers, timeout=self._timeout
            )
        except httpx.HTTPError as failure:
            error = f"warehouse unreachable: {type(failure).__name__}: {failure}"
            raise StepRefused(
                self._backoff.retryable(error, error_type="WarehouseUnavailable", attempt=attempt)
            ) from failure
        if response.is_success:
            # A repeat after a crash carries the same Idempotency-Key, for it to drop.
            return {"http_status": response.status_code}
        error = f"warehouse answered {response.status_code}: {response.text[:200]}"
        raise StepRefused(self._failure(response, error, attempt))

    def _failure(self, response: httpx.Response, error: str, attempt: int) -> ApplicationError:
        status = response.status_code
        if 400 <= status < 500 and status not in RETRYABLE_CLIENT_ERRORS:
            return permanent(error, error_type="WarehouseRejected")
        retry_after = (
            parse_retry_after(response.headers.get("Retry-After"))
            if status in RETRY_AFTER_STATUSES
            else None
        )
        return self._backoff.retryable(
            error, error_type="WarehouseUnavailable", attempt=attempt, retry_after=retry_after
        )


class WarehouseActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        http: httpx.AsyncClient,
        backoff: Backoff,
        settings: Settings,
        *,
        outages: LedgerOutages | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self._attempts = StepAttempts(
            sessions,
            WarehouseNotice(http, backoff, settings),
            backoff,
            outages or LedgerOutages(backoff),
            checkpoint or no_checkpoint,
            attempt_timeout=timedelta(seconds=settings.STEP_ATTEMPT_TIMEOUT_SECONDS),
        )

    @activity.defn(name="notify_warehouse")
    async def notify_warehouse(self, input: StepInput) -> StepResult:
        return await self._attempts.run(input)
