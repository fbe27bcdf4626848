"""The SMTP client the receipt activity sends through, built once by the worker."""

from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib


class SmtpMailer:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._host = host
        self._port = port
        self._timeout = timeout

    async def send(self, message: EmailMessage) -> None:
        # A connection per message: receipts are not a hot loop, and a fresh connection cannot
        # carry a half-broken session from a previous failure into this one.
        await aiosmtplib.send(
            message,
            hostname=self._host,
            port=self._port,
            timeout=self._timeout,
            start_tls=False,
            use_tls=False,
        )
