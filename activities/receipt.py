"""The receipt e-mail: one message per order, recognisable by its stable Message-ID."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate
from typing import Protocol

import aiosmtplib
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from activities.checkpoint import BEFORE_EFFECT, Checkpoint, no_checkpoint
from activities.metrics import side_effect_timer
from activities.retry import Backoff, LedgerOutages, permanent, step_attempt
from activities.step_ledger import StepLedger
from core.contracts import StepInput, StepResult
from core.ledger import effect_key
from core.models import Order
from core.money import format_money
from core.settings import Settings
from core.states import Step, StepOutcome, StepStatus

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
        self._mailer = mailer
        self._backoff = backoff
        self._sender = settings.RECEIPT_FROM
        self._checkpoint = checkpoint or no_checkpoint
        self._ledger = StepLedger(
            sessions, STEP, outages or LedgerOutages(backoff), self._checkpoint
        )

    @activity.defn(name="send_receipt")
    async def send_receipt(self, input: StepInput) -> StepResult:
        attempt = step_attempt(input)
        order, step = await self._ledger.begin(input, attempt)
        if step.status == StepStatus.SUCCEEDED:
            return StepResult(input.order_id, STEP, StepOutcome.ALREADY_DONE)
        message = build_receipt(order, self._sender)

        await self._checkpoint(BEFORE_EFFECT)
        try:
            with side_effect_timer(STEP):
                await self._mailer.send(message)
        except aiosmtplib.SMTPRecipientsRefused as refused:
            codes = [error.code for error in refused.recipients]
            error = f"recipient refused: {'; '.join(str(e) for e in refused.recipients)}"
            if all(500 <= code < 600 for code in codes):
                failed = permanent(error, error_type="MailboxRejected")
            else:
                failed = self._backoff.retryable(error, error_type="MailboxBusy", attempt=attempt)
            cause: Exception = refused
        except aiosmtplib.SMTPResponseException as response:
            error = f"SMTP {response.code}: {response.message}"
            if 500 <= response.code < 600:
                failed = permanent(error, error_type="MailboxRejected")
            else:
                failed = self._backoff.retryable(
                    error, error_type="SmtpUnavailable", attempt=attempt
                )
            cause = response
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as failure:
            error = f"SMTP unreachable: {type(failure).__name__}: {failure}"
            failed = self._backoff.retryable(error, error_type="SmtpUnavailable", attempt=attempt)
            cause = failure
        else:
            # A repeat after a crash carries the same Message-ID, for the receiver to drop.
            return await self._ledger.succeeded(
                input,
                attempt,
                {"message_id": message["Message-ID"]},
                recording="recording the receipt sent",
            )

        await self._ledger.failed(input, attempt, error)
        raise failed from cause
