"""The DBOS peer's API, which also runs its workflows: charge, write the order row, start the
order's workflow (workflow ID = order ID), answer 202.

    uvicorn bench.dbos_peer.api:app     # DATABASE_URL for the orders, DBOS_SYSTEM_DATABASE_URL
                                        # for DBOS's own tables (a sqlite:/// or postgresql:// URL)
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from dbos import DBOS, DBOSConfig, SetWorkflowID
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from sqlalchemy import event
from sqlalchemy.engine import Engine

from activities.smtp import SmtpMailer
from api.schemas import OrderIn
from bench.dbos_peer.workflow import Clients, process_order, use_clients
from core.db import create_engine, create_sessionmaker
from core.models import Order, utcnow
from core.payments import SandboxGateway
from core.settings import Settings, get_settings


@event.listens_for(Engine, "connect")
def _sqlite_as_the_bench_runs_it(connection: Any, _record: Any) -> None:
    """DBOS's SQLite system database gets the journal the bench gives orderflow's database and the
    Temporal server's (WAL, synchronous=NORMAL) instead of the rollback journal with a sync per
    commit. Only DBOS opens plain sqlite3 connections here (the orders go through aiosqlite)."""
    if isinstance(connection, sqlite3.Connection):
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")


def dbos_config(settings: Settings) -> DBOSConfig:
    return {
        "name": "orderflow-dbos-peer",
        "system_database_url": os.environ["DBOS_SYSTEM_DATABASE_URL"],
        # The pool orderflow's processes get (DBOS's default is 20 connections, which on a shared
        # PostgreSQL server runs it out of connections beside the order database's pool).
        "sys_db_pool_size": settings.DATABASE_POOL_SIZE,
        "log_level": os.environ.get("LOG_LEVEL", "WARNING"),
        # One executor, as a single-process deployment runs: at launch it recovers the PENDING
        # workflows this ID left behind.
        "executor_id": "bench-dbos-peer",
    }


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    engine = create_engine(settings)
    sessions = create_sessionmaker(engine)
    app.state.sessions = sessions
    app.state.gateway = SandboxGateway(sessions)
    mailer = SmtpMailer(settings.SMTP_HOST, settings.SMTP_PORT, settings.SMTP_TIMEOUT_SECONDS)
    async with httpx.AsyncClient(timeout=settings.WEBHOOK_TIMEOUT_SECONDS) as http:
        use_clients(Clients(mailer, http))
        DBOS(config=dbos_config(settings))
        DBOS.launch()
        try:
            yield
        finally:
            DBOS.destroy()
            use_clients(None)
            await mailer.aclose()
            await engine.dispose()


app = FastAPI(title="orderflow's DBOS peer", lifespan=_lifespan)


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
    placed_at = utcnow()
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
                created_at=placed_at,
            )
        )
    message = {
        "id": order_id,
        "customer_email": order.customer_email,
        "currency": order.currency,
        "amount_cents": order.amount_cents,
        "items": items,
        "placed_at": placed_at.isoformat(),
    }
    # Returns once the workflow's start is checkpointed; the workflow runs on in this process.
    with SetWorkflowID(order_id):
        await DBOS.start_workflow_async(process_order, message)
    return JSONResponse(
        {"order_id": order_id, "status": "processing"},
        status_code=202,
        headers={"Location": f"/orders/{order_id}"},
    )
