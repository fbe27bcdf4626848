"""The receipt e-mail: one message per order, recognisable by its stable Message-ID."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate
from typing import Protocol

import aiosmtplib
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from activities.checkpoint import (
    AFTER_EFFECT,
    AFTER_RECORD,
    BEFORE_EFFECT,
    Checkpoint,
    no_checkpoint,
)
from activities.metrics import side_effect_timer
from activities.retry import Backoff, LedgerOutages, permanent, step_attempt
from core.contracts import StepInput, StepResult
from core.ledger import begin_attempt, effect_key, record_failed_attempt, record_success
from core.models import Order, Step, StepStatus
from core.money import format_money
from core.settings import Settings

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
        self._sessions = sessions
        self._mailer = mailer
        self._backoff = backoff
        self._outages = outages or LedgerOutages(backoff)
        self._sender = settings.RECEIPT_FROM
        self._checkpoint = checkpoint or no_checkpoint

    @activity.defn(name="send_receipt")
    async def send_receipt(self, input: StepInput) -> StepResult:
        attempt = step_attempt(input)
        with self._outages.guard(attempt, "reading the ledger"):
            order, step = await begin_attempt(self._sessions, input, STEP, attempt)
        if step.status == StepStatus.SUCCEEDED:
            return StepResult(input.order_id, STEP, "already_done")
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
            # Success is recorded only now that the sink has the message: a crash before this
            # line sends it again on the retry, with the same Message-ID for the receiver to drop.
            await self._checkpoint(AFTER_EFFECT)
            with self._outages.guard(attempt, "recording the receipt sent"):
                async with self._sessions.begin() as session:
                    await record_success(
                        session,
                        input.order_id,
                        STEP,
                        attempt,
                        {"message_id": message["Message-ID"]},
                    )
            await self._checkpoint(AFTER_RECORD)
            return StepResult(input.order_id, STEP, "performed")

        # Recorded outside the except clauses, so a database error here is not chained to the
        # SMTP error (the outage classifier follows the chain, and an SMTP OSError is no outage).
        # A failure that cannot be recorded is retried as the database's: nothing was sent.
        with self._outages.guard(attempt, "recording a failed attempt", error):
            await record_failed_attempt(self._sessions, input.order_id, STEP, attempt, error)
        raise failed from cause
