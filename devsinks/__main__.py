"""Runs the local sinks for `make run`: SMTP on SMTP_HOST:SMTP_PORT and the warehouse receiver
(with its fault controls) on SINKS_HTTP_PORT. `--no-smtp` / `--no-warehouse` leave one out, for
a stack that sends that half to a real server of yours."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import uvicorn
from aiosmtpd.controller import Controller
from fastapi import FastAPI

from core.settings import get_settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver


async def main(*, smtp: bool, warehouse: bool) -> None:
    settings = get_settings()
    data = Path(os.environ.get("SINKS_DATA_DIR", ".data"))
    app = FastAPI(title="orderflow dev warehouse and mail sinks")
    if warehouse:
        secret = settings.webhook_secret if settings.WEBHOOK_SIGNING_SECRET else None
        app.include_router(WarehouseReceiver(secret, journal=data / "warehouse.jsonl").router())
    controller: Controller | None = None
    if smtp:
        mail = MailSink(maildir=data / "mail")
        controller = Controller(mail, hostname=settings.SMTP_HOST, port=settings.SMTP_PORT)
        controller.start()
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
        if controller is not None:
            controller.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devsinks", description=__doc__)
    parser.add_argument("--no-smtp", action="store_true", help="no SMTP sink (nor /mail)")
    parser.add_argument("--no-warehouse", action="store_true", help="no warehouse receiver")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    asyncio.run(main(smtp=not args.no_smtp, warehouse=not args.no_warehouse))
