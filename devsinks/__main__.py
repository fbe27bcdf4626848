"""Runs the local sinks for `make run`: SMTP on SMTP_HOST:SMTP_PORT and the warehouse receiver
(with its fault controls) on SINKS_HTTP_PORT."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import uvicorn
from aiosmtpd.controller import Controller

from core.settings import get_settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver, create_app


async def main() -> None:
    settings = get_settings()
    data = Path(os.environ.get("SINKS_DATA_DIR", ".data"))
    secret = settings.webhook_secret if settings.WEBHOOK_SIGNING_SECRET else None
    receiver = WarehouseReceiver(secret, journal=data / "warehouse.jsonl")
    mail = MailSink(maildir=data / "mail")
    smtp = Controller(mail, hostname=settings.SMTP_HOST, port=settings.SMTP_PORT)
    smtp.start()
    app = create_app(receiver)
    app.include_router(mail.router())
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=int(os.environ.get("SINKS_HTTP_PORT", "8025")),
        log_level="warning",
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        smtp.stop()


if __name__ == "__main__":
    asyncio.run(main())
