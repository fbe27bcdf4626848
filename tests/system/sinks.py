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

from core.ledger import ATTEMPT_HEADER
from devsinks.smtp import MailSink
from devsinks.warehouse import Delivery, WarehouseReceiver
from tests.conftest import WEBHOOK_SECRET, free_port
from tests.support import wait_until

POISON_SKU = "POISON-1"
# An order carrying it is refused twice first (503) by the warehouse, and its receipt's
# recipient (FLAKY_MAILBOX) twice first (451 at RCPT) by the SMTP server.
FLAKY_SKU = "FLAKY-2"
FLAKY_MAILBOX = "+flaky@"
REFUSALS_BEFORE_SUCCESS = 2


class PoisonAwareWarehouse(WarehouseReceiver):
    """Refuses (400, permanently) an order carrying a poison SKU, and an order carrying a flaky
    SKU twice (503) before it takes it; everything else as the dev receiver does (signature
    check, dedup by key, injected latency and failures). Every call is recorded, the repeats the
    dev receiver drops included."""

    def __init__(self) -> None:
        super().__init__(WEBHOOK_SECRET.encode())
        self.poison_skus: set[str] = set()
        self.flaky_skus: set[str] = set()
        self._refused: Counter[str] = Counter()

    async def receive(self, request: Request) -> Response:
        raw = await request.body()
        key = request.headers.get("Idempotency-Key")
        attempt = request.headers.get(ATTEMPT_HEADER)
        try:
            body = json.loads(raw)
            skus = {item.get("sku") for item in body.get("items", [])}
        except (ValueError, AttributeError):
            return await super().receive(request)
        if skus & self.poison_skus:
            return self._record(key, True, 400, False, body, attempt=attempt)
        if skus & self.flaky_skus and self._refused[str(key)] < REFUSALS_BEFORE_SUCCESS:
            self._refused[str(key)] += 1
            await self.faults.delay()
            return self._record(key, True, 503, False, body, attempt=attempt)
        return await super().receive(request)

    def calls_for(self, key: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.idempotency_key == key]

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
    when the message has already arrived.) A recipient with FLAKY_MAILBOX in it is refused
    twice (451) before it is taken. Every message is kept, repeats included."""

    rcpt_delay_seconds = 0.0

    def __init__(self) -> None:
        super().__init__()
        self._refused: Counter[str] = Counter()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if self.rcpt_delay_seconds:
            await asyncio.sleep(self.rcpt_delay_seconds)
        if FLAKY_MAILBOX in address and self._refused[address] < REFUSALS_BEFORE_SUCCESS:
            self._refused[address] += 1
            return "451 4.3.0 mailbox busy, try later"
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
        self.warehouse.flaky_skus.clear()

    def slow(self, milliseconds: int, warehouse_milliseconds: int | None = None) -> None:
        """The downstreams take this long (the warehouse `warehouse_milliseconds` if given): the
        SMTP server before it accepts the recipient, the warehouse before it answers."""
        self.mail.rcpt_delay_seconds = milliseconds / 1000
        self.warehouse.faults.configure(
            latency_ms=milliseconds if warehouse_milliseconds is None else warehouse_milliseconds
        )


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
