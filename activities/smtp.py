"""The SMTP client the receipt activity sends through, built once by the worker."""

from __future__ import annotations

import time
from email.message import EmailMessage

import aiosmtplib

# Idle connections kept for the next receipt: a connection per message costs a TCP handshake,
# the greeting, EHLO and QUIT on both ends, about as much as the message itself.
MAX_IDLE_CONNECTIONS = 8
# Reused only while younger than this idle time, well under the minutes servers allow (RFC 5321
# asks for 5), so a reused connection is not one the server is about to drop.
REUSE_WITHIN_SECONDS = 10.0
# Idle longer than this, a connection is checked with a NOOP before it carries a message: a
# server restart or a dropped connection then costs a reconnect, not a failed attempt.
CHECK_AFTER_SECONDS = 1.0


class SmtpMailer:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._host = host
        self._port = port
        self._timeout = timeout
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []

    async def send(self, message: EmailMessage) -> None:
        client = await self._take()
        try:
            await client.send_message(message)
        except BaseException:
            # Whatever failed, the session may be mid-transaction: it is never reused.
            client.close()
            raise
        await self._put_back(client)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for client, _since in idle:
            await self._quit(client)

    async def _take(self) -> aiosmtplib.SMTP:
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            idle = now - since
            if not client.is_connected or idle >= REUSE_WITHIN_SECONDS:
                await self._quit(client)
                continue
            if idle >= CHECK_AFTER_SECONDS:
                try:
                    await client.noop()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()
                    continue
            return client
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            timeout=self._timeout,
            start_tls=False,
            use_tls=False,
        )
        await client.connect()
        return client

    async def _put_back(self, client: aiosmtplib.SMTP) -> None:
        if len(self._idle) < MAX_IDLE_CONNECTIONS:
            self._idle.append((client, time.monotonic()))
        else:
            await self._quit(client)

    @staticmethod
    async def _quit(client: aiosmtplib.SMTP) -> None:
        try:
            if client.is_connected:
                await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            client.close()
