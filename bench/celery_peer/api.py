"""The peer's API: charge, write the order row, enqueue the two follow-ups, answer 202."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse

from api.schemas import OrderIn
from bench.celery_peer.tasks import notify_warehouse, send_receipt
from core.db import create_engine, create_sessionmaker
from core.models import Order, utcnow
from core.payments import SandboxGateway
from core.settings import get_settings


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = create_engine(get_settings())
    sessions = create_sessionmaker(engine)
    app.state.sessions = sessions
    app.state.gateway = SandboxGateway(sessions)
    try:
        yield
    finally:
        await engine.dispose()


app = FastAPI(title="orderflow's Celery peer", lifespan=_lifespan)


@app.post("/orders", status_code=202)
async def place_order(
    order: OrderIn, idempotency_key: Annotated[str, Header(alias="Idempotency-Key")]
) -> JSONResponse:
    charge = await app.state.gateway.charge(
        order.amount_cents, order.currency, order.payment_token, idempotency_key=idempotency_key
    )
    if not charge.succeeded:
        return JSONResponse({"detail": charge.decline_reason}, status_code=402)
    order_id = f"ord_{uuid.uuid4().hex}"
    items = [item.model_dump() for item in order.items]
    async with app.state.sessions.begin() as session:
        session.add(
            Order(
                id=order_id,
                idempotency_key=idempotency_key,
                customer_email=order.customer_email,
                currency=order.currency,
                amount_cents=order.amount_cents,
                items=items,
                charge_id=charge.charge_id,
            )
        )
    message = {
        "id": order_id,
        "customer_email": order.customer_email,
        "currency": order.currency,
        "amount_cents": order.amount_cents,
        "items": items,
        "placed_at": utcnow().isoformat(),
    }
    # The usual FastAPI-plus-Celery code: a blocking publish to Redis inside the handler.
    send_receipt.delay(message)
    notify_warehouse.delay(message)
    return JSONResponse(
        {"order_id": order_id, "status": "processing"},
        status_code=202,
        headers={"Location": f"/orders/{order_id}"},
    )
