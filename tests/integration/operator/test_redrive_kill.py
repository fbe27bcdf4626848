"""A bulk redrive survives its worker: SIGKILL the only worker process in the middle of a redrive,
start another, and the redrive finishes with every letter redriven exactly once (one retry_step
per order, one accepted webhook per order, every letter resolved)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from temporalio.testing import WorkflowEnvironment

from core.db import create_engine, create_sessionmaker
from core.models import DeadLetter, Order
from core.settings import Settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client
from tests.integration.operator.test_redrive import (
    Stack,
    accepted_at,
    park_orders,
    progress,
    retry_updates,
    wait_for_state,
)
from tests.support import count_rows, wait_until
from tests.worker_processes import (
    wait_until_polling,
    worker_processes,
    workflow_task_identities,
)

LETTERS = 20
PER_SECOND = 4.0
KILL_AFTER_SENT = 6
DOWNTIME_SECONDS = 3.0


@pytest.mark.slow
async def test_redrive_finishes_after_its_worker_is_killed_with_every_letter_once(
    settings: Settings,
    own_database: str,
    env: WorkflowEnvironment,
    warehouse: WarehouseReceiver,
    mail: MailSink,
    tmp_path: Path,
) -> None:
    settings = settings.model_copy(update={"DATABASE_URL": own_database})
    engine = create_engine(settings)
    sessions = create_sessionmaker(engine)
    try:
        async with api_client(settings) as api:
            stack = Stack(settings, sessions, api, env.client)
            (tmp_path / "first").mkdir()
            (tmp_path / "second").mkdir()
            with worker_processes(1, settings, tmp_path / "first") as [first]:
                await wait_until_polling([first])
                orders = await park_orders(stack, warehouse, LETTERS)
                started_at = time.monotonic()
                started = await api.post("/dead-letters/retry", json={"per_second": PER_SECOND})
                assert started.status_code == 202, started.text
                location = started.headers["Location"]
                redrive_id = started.json()["redrive_id"]
                before_kill = await wait_until(
                    lambda: _sent(api, location, KILL_AFTER_SENT),
                    within=60,
                    message=f"{KILL_AFTER_SENT} sent",
                )
                first.process.kill()  # SIGKILL: no graceful shutdown, whatever was running dies
                await first.exited()
                killed_at = time.monotonic()
            # No worker at all for a while: the redrive's timers and state wait in Temporal.
            await wait_until(
                lambda: time.monotonic() - killed_at >= DOWNTIME_SECONDS,
                within=DOWNTIME_SECONDS + 5,
                message="the downtime",
            )
            with worker_processes(1, settings, tmp_path / "second") as [second]:
                await wait_until_polling([second])
                final = await wait_for_state(api, location, "finished", within=120)
                took = time.monotonic() - started_at
                identities = await workflow_task_identities(env.client, redrive_id)
                assert {first.identity, second.identity} <= identities, identities
            counts = {k: final[k] for k in ("total", "sent", "resolved", "failed_again", "skipped")}
            assert counts == {
                "total": LETTERS,
                "sent": LETTERS,
                "resolved": LETTERS,
                "failed_again": 0,
                "skipped": 0,
            }, final
            for order_id in orders:
                assert await retry_updates(env.client, order_id) == 1, order_id
            accepted_at(warehouse, orders)  # asserts one accepted webhook per order
            assert await count_rows(sessions, DeadLetter, DeadLetter.status != "resolved") == 0
            async with sessions() as session:
                emails = (
                    await session.scalars(select(Order.customer_email).where(Order.id.in_(orders)))
                ).all()
            assert [len(mail.to(email)) for email in emails] == [1] * LETTERS
            print(
                f"\nredrive kill figures: {LETTERS} letters at {PER_SECOND:g}/s; worker SIGKILLed "
                f"after {before_kill['sent']} sent, {DOWNTIME_SECONDS:g} s without a worker; "
                f"finished {took:.1f} s after the request (the pace alone: "
                f"{(LETTERS - 1) / PER_SECOND:.1f} s); every letter redriven once"
            )
    finally:
        await engine.dispose()


async def _sent(api: httpx.AsyncClient, location: str, count: int) -> dict[str, Any] | None:
    current = await progress(api, location)
    return current if current["sent"] >= count else None
