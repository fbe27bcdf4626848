"""The system suite's own downstreams: the dev SMTP sink and warehouse receiver (they record
every delivery with its Message-ID / Idempotency-Key, can be slowed and told to fail), plus a
poison SKU the warehouse refuses with 400, as it would an order it can never take."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from aiosmtpd.controller import Controller
from fastapi import FastAPI, Request, Response

from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import WEBHOOK_SECRET, free_port
from tests.support import wait_until

POISON_SKU = "POISON-1"


class PoisonAwareWarehouse(WarehouseReceiver):
    """Refuses (400, permanently) an order carrying a poison SKU; everything else as the dev
    receiver does (signature check, dedup by key, injected latency and failures)."""

    def __init__(self) -> None:
        super().__init__(WEBHOOK_SECRET.encode())
        self.poison_skus: set[str] = set()

    async def receive(self, request: Request) -> Response:
        raw = await request.body()
        try:
            skus = {item.get("sku") for item in json.loads(raw).get("items", [])}
        except (ValueError, AttributeError):
            skus = set()
        if skus & self.poison_skus:
            body = json.loads(raw)
            return self._record(request.headers.get("Idempotency-Key"), True, 400, False, body)
        return await super().receive(request)

    def accepted_keys(self) -> Counter[str]:
        """How many deliveries each key had accepted (202, not answered as a duplicate)."""
        return Counter(
            d.idempotency_key
            for d in self.deliveries
            if d.answered == 202 and not d.duplicate and d.idempotency_key
        )


class SlowToAcceptMail(MailSink):
    """The dev SMTP sink, optionally slow before it accepts a recipient (as a server checking
    the address is): a client that dies meanwhile never sends the message, so an effect in
    flight at a kill is really not delivered yet. (The sink's own latency comes after DATA,
    when the message has already arrived.)"""

    rcpt_delay_seconds = 0.0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if self.rcpt_delay_seconds:
            await asyncio.sleep(self.rcpt_delay_seconds)
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@dataclass
class Sinks:
    mail: SlowToAcceptMail
    smtp_port: int
    warehouse: PoisonAwareWarehouse
    warehouse_url: str

    def heal(self) -> None:
        self.mail.faults.reset()
        self.mail.rcpt_delay_seconds = 0.0
        self.warehouse.faults.reset()
        self.warehouse.poison_skus.clear()

    def slow(self, milliseconds: int) -> None:
        """Both downstreams take this long: the SMTP server before it accepts the recipient,
        the warehouse before it answers."""
        self.mail.rcpt_delay_seconds = milliseconds / 1000
        self.warehouse.faults.configure(latency_ms=milliseconds)


@asynccontextmanager
async def running_sinks() -> AsyncIterator[Sinks]:
    mail = SlowToAcceptMail()
    smtp_port = free_port()
    # aiosmtpd serves from a thread of its own, so a busy test loop does not slow the SMTP side.
    controller = Controller(mail, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    warehouse = PoisonAwareWarehouse()
    app = FastAPI()
    app.include_router(warehouse.router())
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False)
    )
    serving = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started, message="warehouse receiver started")
        yield Sinks(mail, smtp_port, warehouse, f"http://127.0.0.1:{port}/webhooks/orders")
    finally:
        server.should_exit = True
        await serving
        controller.stop()
