"""The receipt e-mail: one message per order, recognisable by its stable Message-ID."""

from __future__ import annotations

from datetime import timedelta
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Protocol

import aiosmtplib
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from activities.checkpoint import Checkpoint, no_checkpoint
from activities.retry import Backoff, LedgerOutages, permanent
from activities.step_attempt import StepAttempts, StepRefused
from core.contracts import StepInput, StepResult
from core.ledger import ATTEMPT_HEADER, effect_key
from core.models import Order
from core.money import format_money
from core.settings import Settings
from core.states import Step

STEP = Step.SEND_RECEIPT.value


class Mailer(Protocol):
    async def send(self, message: EmailMessage) -> None: ...


def receipt_message_id(order_id: str, sender: str) -> str:
    domain = sender.rpartition("@")[2] or "orderflow.localhost"
    return f"<{effect_key(order_id, STEP).replace(':', '.')}@{domain}>"


def build_receipt(order: Order, sender: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = order.customer_email
    message["Subject"] = f"Your order {order.id}"
    message["Message-ID"] = receipt_message_id(order.id, sender)
    message["Date"] = formatdate(localtime=False, usegmt=True)
    lines = [f"Thank you for your order {order.id}.", ""]
    for item in order.items:
        line_total = item["quantity"] * item["unit_price_cents"]
        lines.append(
            f"  {item['quantity']} x {item['sku']}  {format_money(line_total, order.currency)}"
        )
    lines += ["", f"Total charged: {format_money(order.amount_cents, order.currency)}", ""]
    message.set_content("\n".join(lines))
    return message


class Receipt:
    """The receipt as a step's effect: SMTP 4xx and connection errors are retried, 5xx is a
    refusal for good."""

    step = STEP

    def __init__(self, mailer: Mailer, backoff: Backoff, sender: str) -> None:
        self._mailer = mailer
        self._backoff = backoff
        self._sender = sender

    def prepare(self, order: Order, token: str) -> EmailMessage:
        message = build_receipt(order, self._sender)
        message[ATTEMPT_HEADER] = token
        return message

    async def perform(self, message: EmailMessage, attempt: int) -> dict[str, Any]:
        try:
            await self._mailer.send(message)
        except aiosmtplib.SMTPRecipientsRefused as refused:
            codes = [error.code for error in refused.recipients]
            error = f"recipient refused: {'; '.join(str(e) for e in refused.recipients)}"
            if all(500 <= code < 600 for code in codes):
                raise StepRefused(permanent(error, error_type="MailboxRejected")) from refused
            raise StepRefused(
                self._backoff.retryable(error, error_type="MailboxBusy", attempt=attempt)
            ) from refused
        except aiosmtplib.SMTPResponseException as response:
            error = f"SMTP {response.code}: {response.message}"
            if 500 <= response.code < 600:
                raise StepRefused(permanent(error, error_type="MailboxRejected")) from response
            raise StepRefused(
                self._backoff.retryable(error, error_type="SmtpUnavailable", attempt=attempt)
            ) from response
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as failure:
            error = f"SMTP unreachable: {type(failure).__name__}: {failure}"
            raise StepRefused(
                self._backoff.retryable(error, error_type="SmtpUnavailable", attempt=attempt)
            ) from failure
        # A repeat after a crash carries the same Message-ID, for the receiver to drop.
        return {"message_id": message["Message-ID"]}


class ReceiptActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        mailer: Mailer,
        backoff: Backoff,
        settings: Settings,
        *,
        outages: LedgerOutages | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self._attempts = StepAttempts(
            sessions,
            Receipt(mailer, backoff, settings.RECEIPT_FROM),
            backoff,
            outages or LedgerOutages(backoff),
            checkpoint or no_checkpoint,
            attempt_timeout=timedelta(seconds=settings.STEP_ATTEMPT_TIMEOUT_SECONDS),
        )

    @activity.defn(name="send_receipt")
    async def send_receipt(self, input: StepInput) -> StepResult:
        return await self._attempts.run(input)
