"""The warehouse webhook: a signed POST per order that the warehouse can deduplicate by key."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.checkpoint import BEFORE_EFFECT, Checkpoint, no_checkpoint
from activities.metrics import side_effect_timer
from activities.retry import (
    Backoff,
    LedgerOutages,
    parse_retry_after,
    permanent,
    step_attempt,
)
from activities.step_ledger import StepLedger
from core.contracts import StepInput, StepResult
from core.ledger import effect_key
from core.models import Order
from core.settings import Settings
from core.signing import SIGNATURE_HEADER, sign
from core.states import Step, StepOutcome, StepStatus

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
        self._http = http
        self._backoff = backoff
        self._url = settings.WAREHOUSE_WEBHOOK_URL
        self._secret = settings.webhook_secret
        self._timeout = settings.WEBHOOK_TIMEOUT_SECONDS
        self._checkpoint = checkpoint or no_checkpoint
        self._ledger = StepLedger(
            sessions, STEP, outages or LedgerOutages(backoff), self._checkpoint
        )

    @activity.defn(name="notify_warehouse")
    async def notify_warehouse(self, input: StepInput) -> StepResult:
        attempt = step_attempt(input)
        order, step = await self._ledger.begin(input, attempt)
        if step.status == StepStatus.SUCCEEDED:
            return StepResult(input.order_id, STEP, StepOutcome.ALREADY_DONE)
        if order.cancelled_at is not None:
            # Cancelled before this attempt: the warehouse must not hear of the order.
            return StepResult(input.order_id, STEP, StepOutcome.SKIPPED)
        body = json.dumps(warehouse_payload(order), separators=(",", ":")).encode()

        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": effect_key(input.order_id, STEP),
            SIGNATURE_HEADER: sign(self._secret, body),
        }
        await self._checkpoint(BEFORE_EFFECT)
        try:
            with side_effect_timer(STEP):
                response = await self._http.post(
                    self._url, content=body, headers=headers, timeout=self._timeout
                )
        except httpx.HTTPError as failure:
            error = f"warehouse unreachable: {type(failure).__name__}: {failure}"
            failed = self._backoff.retryable(
                error, error_type="WarehouseUnavailable", attempt=attempt
            )
            # Recorded after the except clause (see StepLedger.failed), then raised from it.
            unreachable: httpx.HTTPError | None = failure
        else:
            unreachable = None
            if response.is_success:
                # A repeat after a crash carries the same Idempotency-Key, for it to drop.
                return await self._ledger.succeeded(
                    input,
                    attempt,
                    {"http_status": response.status_code},
                    recording="recording the delivery",
                )
            error = f"warehouse answered {response.status_code}: {response.text[:200]}"
            failed = self._failure(response, error, attempt)

        # A rejection that could not be recorded is dead-lettered on the retry's answer.
        await self._ledger.failed(input, attempt, error)
        if unreachable is not None:
            raise failed from unreachable
        raise failed

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
