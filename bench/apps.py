"""The two comparison endpoints of the intake benchmark, served by uvicorn like the real API:

- `bench.apps:floor_app`: a bare FastAPI endpoint that answers 202 (the HTTP floor);
- `bench.apps:inline_app`: the anti-pattern orderflow replaces: the same intake (key, charge,
  order row), then the receipt and the webhook sent inside the request before answering. It sends
  both at once (asyncio.gather), the fastest an inline handler can be.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated

import httpx
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse

from activities.receipt import build_receipt
from activities.smtp import SmtpMailer
from activities.warehouse import warehouse_payload
from api.intake import OrderIntake
from api.schemas import OrderIn
from core.db import create_engine, create_sessionmaker
from core.ledger import effect_key
from core.models import Order
from core.payments import SandboxGateway
from core.settings import get_settings
from core.signing import SIGNATURE_HEADER, sign

floor_app = FastAPI(title="HTTP floor")


@floor_app.post("/orders", status_code=202)
async def accept(order: OrderIn) -> dict[str, str]:
    """Validates the same body and answers 202: what any endpoint costs before doing work."""
    return {"status": "accepted"}


@asynccontextmanager
async def _inline_lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    engine = create_engine(settings)
    sessions = create_sessionmaker(engine)
    app.state.sessions = sessions
    app.state.intake = OrderIntake(
        sessions,
        SandboxGateway(sessions),
        lease=timedelta(seconds=settings.IDEMPOTENCY_LEASE_SECONDS),
    )
    app.state.mailer = SmtpMailer(
        settings.SMTP_HOST, settings.SMTP_PORT, settings.SMTP_TIMEOUT_SECONDS
    )
    async with httpx.AsyncClient(timeout=settings.WEBHOOK_TIMEOUT_SECONDS) as http:
        app.state.http = http
        try:
            yield
        finally:
            await engine.dispose()


inline_app = FastAPI(title="inline follow-ups", lifespan=_inline_lifespan)


@inline_app.post("/orders")
async def place_inline(
    order: OrderIn, idempotency_key: Annotated[str, Header(alias="Idempotency-Key")]
) -> JSONResponse:
    state = inline_app.state
    settings = get_settings()
    outcome = await state.intake.place(idempotency_key, order)
    if outcome.new_order_id is None:
        return JSONResponse(outcome.body, status_code=outcome.status_code)
    async with state.sessions() as session:
        row = await session.get(Order, outcome.new_order_id)
    assert row is not None
    body = json.dumps(warehouse_payload(row), separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": effect_key(row.id, "notify_warehouse"),
        SIGNATURE_HEADER: sign(settings.webhook_secret, body),
    }
    await asyncio.gather(
        state.mailer.send(build_receipt(row, settings.RECEIPT_FROM)),
        state.http.post(settings.WAREHOUSE_WEBHOOK_URL, content=body, headers=headers),
    )
    return JSONResponse(outcome.body, status_code=201)
