"""An SMTP sink for `make run` and the tests: keeps every message it accepts, in memory and as
.eml files a person can open, and can be told to refuse or fail."""

from __future__ import annotations

from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from devsinks.faults import FaultInjector, MailFaultsIn


@dataclass
class ReceivedMail:
    sender: str
    recipients: list[str]
    message: EmailMessage

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"]).strip()


class MailSink:
    """An aiosmtpd handler."""

    def __init__(self, maildir: Path | None = None) -> None:
        self.maildir = maildir
        # 451 by default: a transient refusal, which the receipt activity retries.
        self.faults = FaultInjector(default_status=451)
        self.messages: list[ReceivedMail] = []

    def to(self, recipient: str) -> list[ReceivedMail]:
        return [m for m in self.messages if recipient in m.recipients]

    def router(self) -> APIRouter:
        """The sink's HTTP side: read what it received, and set or clear its faults."""
        router = APIRouter(prefix="/mail", tags=["mail"])

        @router.get("")
        async def messages() -> list[dict[str, Any]]:
            """Every e-mail the sink accepted."""
            return [
                {
                    "message_id": m.message_id,
                    "to": m.recipients,
                    "subject": str(m.message["Subject"]),
                    "body": m.message.get_content() if not m.message.is_multipart() else "",
                }
                for m in self.messages
            ]

        @router.get("/faults")
        async def get_faults() -> dict[str, object]:
            """The faults in force."""
            return self.faults.faults.as_dict()

        @router.put("/faults")
        async def set_faults(changes: MailFaultsIn) -> dict[str, object]:
            """Change the SMTP faults: fail_next, fail_rate, status, latency_ms,
            reject_recipients (answered 550 at RCPT)."""
            return self.faults.configure(**changes.model_dump(exclude_unset=True)).as_dict()

        @router.delete("/faults")
        async def clear_faults() -> dict[str, object]:
            """Heal the SMTP sink."""
            self.faults.reset()
            return self.faults.faults.as_dict()

        return router

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address in self.faults.faults.reject_recipients:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await self.faults.delay()
        if self.faults.should_fail():
            status = self.faults.faults.status
            return f"{status} {'4.3.0' if status < 500 else '5.3.0'} sink told to fail"
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        mail = ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), message)
        self.messages.append(mail)
        if self.maildir is not None:
            self.maildir.mkdir(parents=True, exist_ok=True)
            name = f"{len(self.messages):06d}-{mail.message_id.strip('<>').replace('/', '_')}.eml"
            (self.maildir / name).write_bytes(envelope.content)
        return "250 Message accepted"
