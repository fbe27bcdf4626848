"""The warehouse webhook: a signed POST per order that the warehouse can deduplicate by key."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.checkpoint import (
    AFTER_EFFECT,
    AFTER_RECORD,
    BEFORE_EFFECT,
    Checkpoint,
    no_checkpoint,
)
from activities.metrics import side_effect_timer
from activities.retry import (
    Backoff,
    LedgerOutages,
    parse_retry_after,
    permanent,
    step_attempt,
)
from core.contracts import StepInput, StepResult
from core.ledger import begin_attempt, effect_key, record_failed_attempt, record_success
from core.models import Order
from core.settings import Settings
from core.signing import SIGNATURE_HEADER, sign
from core.states import Step, StepOutcome, StepStatus

STEP = Step.NOTIFY_WAREHOUSE.value
# Statuses that can succeed later (the contract of issue 2); any other 4xx means the request
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
        self._sessions = sessions
        self._http = http
        self._backoff = backoff
        self._outages = outages or LedgerOutages(backoff)
        self._url = settings.WAREHOUSE_WEBHOOK_URL
        self._secret = settings.webhook_secret
        self._timeout = settings.WEBHOOK_TIMEOUT_SECONDS
        self._checkpoint = checkpoint or no_checkpoint

    @activity.defn(name="notify_warehouse")
    async def notify_warehouse(self, input: StepInput) -> StepResult:
        attempt = step_attempt(input)
        with self._outages.guard(attempt, "reading the ledger"):
            order, step = await begin_attempt(self._sessions, input, STEP, attempt)
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
            # Recorded outside the except clause, so a database error here is not chained to
            # the HTTP error, which the outage classifier would follow.
            unreachable: httpx.HTTPError | None = failure
        else:
            unreachable = None
            if response.is_success:
                # Success is recorded only now that the warehouse has it: a crash before this
                # line delivers again on the retry, with the same Idempotency-Key to drop.
                await self._checkpoint(AFTER_EFFECT)
                with self._outages.guard(attempt, "recording the delivery"):
                    async with self._sessions.begin() as session:
                        await record_success(
                            session,
                            input.order_id,
                            STEP,
                            attempt,
                            {"http_status": response.status_code},
                        )
                await self._checkpoint(AFTER_RECORD)
                return StepResult(input.order_id, STEP, StepOutcome.PERFORMED)
            error = f"warehouse answered {response.status_code}: {response.text[:200]}"
            failed = self._failure(response, error, attempt)

        # A failure that cannot be recorded is retried as the database's: the warehouse did not
        # take the order, and the retry asks it again (a rejection is dead-lettered then).
        with self._outages.guard(attempt, "recording a failed attempt", error):
            await record_failed_attempt(self._sessions, input.order_id, STEP, attempt, error)
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
