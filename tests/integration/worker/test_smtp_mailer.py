"""The receipt's SMTP client keeps connections open between messages, against a real aiosmtpd
server on loopback: one session carries many receipts, and a failed or dropped session is never
reused for the next one."""

from __future__ import annotations

from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller

import activities.smtp
from activities.smtp import SmtpMailer
from tests.conftest import free_port


class CountingSink:
    """An aiosmtpd handler that counts sessions (EHLOs) and messages, and can fail the next DATA."""

    def __init__(self) -> None:
        self.sessions = 0
        self.messages: list[str] = []
        self.fail_next_data = False

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.fail_next_data:
            self.fail_next_data = False
            return "451 4.3.0 try again later"
        self.messages.append(envelope.content.decode())
        return "250 OK"


def receipt(number: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "shop@example.com"
    message["To"] = "customer@example.com"
    message["Subject"] = f"receipt {number}"
    message["Message-ID"] = f"<receipt-{number}@example.com>"
    message.set_content(f"receipt {number}")
    return message


class SinkServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.sink = CountingSink()
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(self.sink, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture
def server() -> Iterator[SinkServer]:
    running = SinkServer()
    running.start()
    yield running
    running.stop()


async def test_one_session_carries_consecutive_receipts(server: SinkServer) -> None:
    mailer = SmtpMailer("127.0.0.1", server.port, timeout=5)
    try:
        for number in range(3):
            await mailer.send(receipt(number))
    finally:
        await mailer.aclose()

    assert len(server.sink.messages) == 3
    assert server.sink.sessions == 1


async def test_a_session_that_failed_is_not_reused(server: SinkServer) -> None:
    mailer = SmtpMailer("127.0.0.1", server.port, timeout=5)
    try:
        await mailer.send(receipt(1))
        server.sink.fail_next_data = True
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await mailer.send(receipt(2))
        assert refused.value.code == 451
        await mailer.send(receipt(3))
    finally:
        await mailer.aclose()

    assert [m for m in server.sink.messages if "receipt 2" in m] == []
    assert len(server.sink.messages) == 2
    assert server.sink.sessions == 2


async def test_a_session_the_server_dropped_is_replaced_before_sending(
    server: SinkServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Check every idle session, so the test needs no idle time to pass.
    monkeypatch.setattr(activities.smtp, "CHECK_AFTER_SECONDS", 0.0)
    mailer = SmtpMailer("127.0.0.1", server.port, timeout=5)
    try:
        await mailer.send(receipt(1))
        # The server restarts: the kept session is dead, though the client has not noticed.
        server.stop()
        server.start()
        await mailer.send(receipt(2))
    finally:
        await mailer.aclose()

    assert len(server.sink.messages) == 2
    assert server.sink.sessions == 2
