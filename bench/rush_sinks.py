"""The rush's receivers, in a process of their own: an SMTP server and a warehouse that take a
fixed time per call and count every call per key *before* any de-duplication, so a repeated
effect shows however the receiver would have treated it.

An order carrying FLAKY_SKU is refused twice (SMTP 451 at RCPT, warehouse 503) before it is
taken; one carrying POISON_SKU is refused by the warehouse for good (400), and every call after
that first 400 is counted.

    python -m bench.rush_sinks --smtp-port P --http-port Q \
        --smtp-latency-ms 150 --http-latency-ms 250
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from email import policy
from email.parser import BytesHeaderParser
from typing import Any

import uvicorn
from aiosmtpd.controller import Controller
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from core.ledger import ATTEMPT_HEADER

FLAKY_SKU = "FLAKY-2"
POISON_SKU = "POISON-1"
# The recipient of a flaky order's receipt (bench.loadgen sets it with FLAKY_SKU).
FLAKY_MAILBOX_MARK = "+flaky"
REFUSALS_BEFORE_SUCCESS = 2


class CountingMail:
    """An aiosmtpd handler: counts accepted messages per Message-ID, refuses a flaky recipient
    (451 at RCPT) twice first."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.accepted: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        # Message-ID -> the claim token of each accepted copy (the X-Orderflow-Attempt header).
        self.tokens: dict[str, list[str]] = {}

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if FLAKY_MAILBOX_MARK in address and self.refused[address] < REFUSALS_BEFORE_SUCCESS:
            self.refused[address] += 1
            return "451 4.3.0 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.latency)
        headers = BytesHeaderParser(policy=policy.default).parsebytes(envelope.content)
        message_id = str(headers.get("Message-ID", "")).strip()
        self.accepted[message_id] += 1
        self.tokens.setdefault(message_id, []).append(str(headers.get(ATTEMPT_HEADER, "")))
        return "250 Message accepted"


class CountingWarehouse:
    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.calls: Counter[str] = Counter()
        self.taken: Counter[str] = Counter()
        self.refused_for_good: set[str] = set()
        self.calls_after_refusal: Counter[str] = Counter()
        self.tokens: dict[str, list[str]] = {}

    async def receive(self, request: Request) -> Response:
        raw = await request.body()
        key = request.headers.get("Idempotency-Key", "")
        await asyncio.sleep(self.latency)
        self.calls[key] += 1
        if key in self.refused_for_good:
            self.calls_after_refusal[key] += 1
        skus = {item.get("sku") for item in json.loads(raw).get("items", [])}
        if POISON_SKU in skus:
            self.refused_for_good.add(key)
            return JSONResponse({"detail": "unknown SKU"}, 400)
        if FLAKY_SKU in skus and self.calls[key] <= REFUSALS_BEFORE_SUCCESS:
            return JSONResponse({"detail": "busy"}, 503)
        self.taken[key] += 1
        self.tokens.setdefault(key, []).append(request.headers.get(ATTEMPT_HEADER, ""))
        return JSONResponse({"accepted": key}, 202)


def create_app(mail: CountingMail, warehouse: CountingWarehouse) -> FastAPI:
    app = FastAPI()

    @app.post("/webhooks/orders")
    async def webhook(request: Request) -> Response:
        return await warehouse.receive(request)

    @app.get("/rush/counts")
    async def counts() -> dict[str, Any]:
        return {
            "mail_accepted": dict(mail.accepted),
            "mail_refused": sum(mail.refused.values()),
            "webhook_calls": dict(warehouse.calls),
            "webhook_taken": dict(warehouse.taken),
            "webhook_refused_for_good": len(warehouse.refused_for_good),
            "webhook_calls_after_refusal": dict(warehouse.calls_after_refusal),
            # The claim tokens of every effect taken more than once.
            "repeated": {
                key: tokens
                for key, tokens in (mail.tokens | warehouse.tokens).items()
                if len(tokens) > 1
            },
        }

    return app


async def serve(smtp_port: int, http_port: int, smtp_ms: int, http_ms: int) -> None:
    mail = CountingMail(smtp_ms / 1000)
    smtp = Controller(mail, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    app = create_app(mail, CountingWarehouse(http_ms / 1000))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=http_port, log_level="warning", access_log=False
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        smtp.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--smtp-latency-ms", type=int, default=150)
    parser.add_argument("--http-latency-ms", type=int, default=250)
    args = parser.parse_args()
    asyncio.run(serve(args.smtp_port, args.http_port, args.smtp_latency_ms, args.http_latency_ms))


if __name__ == "__main__":
    main()
