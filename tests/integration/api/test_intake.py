"""`POST /orders` on the real API, database and Temporal dev server: idempotency keys, declines,
invalid bodies, reading orders back, and the health probes."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.intake import request_fingerprint
from api.schemas import OrderIn
from core.models import IdempotencyKey, KeyState, Order, PaymentCharge, utcnow
from core.payments import DECLINING_TOKENS
from core.settings import Settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, free_port
from tests.support import (
    count_rows,
    new_key,
    order_body,
    place_order,
    wait_for_order_status,
    wait_until,
)

Sessions = async_sessionmaker[AsyncSession]


async def rows_for_key(sessions: Sessions, key: str) -> dict[str, int]:
    return {
        "orders": await count_rows(sessions, Order, Order.idempotency_key == key),
        "charges": await count_rows(sessions, PaymentCharge, PaymentCharge.idempotency_key == key),
        "keys": await count_rows(sessions, IdempotencyKey, IdempotencyKey.key == key),
    }


async def table_sizes(sessions: Sessions) -> dict[str, int]:
    return {
        "orders": await count_rows(sessions, Order),
        "charges": await count_rows(sessions, PaymentCharge),
        "keys": await count_rows(sessions, IdempotencyKey),
    }


async def workflow_runs(env: WorkflowEnvironment, query: str) -> int:
    return (await env.client.count_workflows(query)).count


def post(api: httpx.AsyncClient, body: dict[str, Any], key: str) -> Any:
    return api.post("/orders", json=body, headers={"Idempotency-Key": key})


async def test_same_key_and_body_again_answers_the_same_order(
    api: httpx.AsyncClient, sessions: Sessions
) -> None:
    body, key = order_body(), new_key()
    first = await post(api, body, key)
    second = await post(api, body, key)

    assert first.status_code == second.status_code == 202
    assert second.json() == first.json()
    assert second.headers["Location"] == first.headers["Location"]
    assert await rows_for_key(sessions, key) == {"orders": 1, "charges": 1, "keys": 1}


async def test_concurrent_submits_with_one_key_make_one_charge_order_workflow_and_effects(
    api: httpx.AsyncClient,
    worker: Worker,
    env: WorkflowEnvironment,
    mail: MailSink,
    warehouse: WarehouseReceiver,
    sessions: Sessions,
) -> None:
    body, key = order_body(), new_key()
    answers = await asyncio.gather(*(post(api, body, key) for _ in range(10)))

    accepted = [a for a in answers if a.status_code == 202]
    in_flight = [a for a in answers if a.status_code == 409]
    assert len(accepted) + len(in_flight) == len(answers), [a.text for a in answers]
    assert accepted, "the request that took the key answers 202"
    order_ids = {a.json()["order_id"] for a in accepted}
    assert len(order_ids) == 1
    for answer in in_flight:
        assert int(answer.headers["Retry-After"]) >= 1
    # Once the first request finished, the key answers with its order.
    (order_id,) = order_ids
    assert (await post(api, body, key)).json()["order_id"] == order_id

    await wait_for_order_status(api, order_id, "completed")
    assert await rows_for_key(sessions, key) == {"orders": 1, "charges": 1, "keys": 1}
    assert len(mail.to(body["customer_email"])) == 1
    assert len(warehouse.deliveries_for(order_id)) == 1
    # Visibility lags behind the start; once the run shows up it must be the only one.
    query = f'WorkflowId="{order_id}"'
    await wait_until(lambda: workflow_runs(env, query), within=30, message="workflow visible")
    assert await workflow_runs(env, query) == 1
    assert len([w async for w in env.client.list_workflows(query)]) == 1


async def test_same_key_with_another_body_is_rejected_and_writes_nothing(
    api: httpx.AsyncClient, sessions: Sessions
) -> None:
    body, key = order_body(), new_key()
    first = await post(api, body, key)
    assert first.status_code == 202
    before = await table_sizes(sessions)

    reused = await post(api, {**body, "payment_token": "tok_mastercard"}, key)

    assert reused.status_code == 422
    [error] = reused.json()["detail"]  # FastAPI's list shape, as the schema declares for 422
    assert error["type"] == "idempotency_key_reused"
    assert "different request" in error["msg"]
    assert await table_sizes(sessions) == before
    # The key still answers the request it was first used for.
    assert (await post(api, body, key)).json() == first.json()


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "Idempotency-Key header is required"),
        ({"Idempotency-Key": "k" * 256}, "Idempotency-Key"),
    ],
    ids=["missing", "overlong"],
)
async def test_missing_or_overlong_idempotency_key_is_a_400_with_a_clear_message(
    headers: dict[str, str], detail: str, api: httpx.AsyncClient, sessions: Sessions
) -> None:
    before = await table_sizes(sessions)
    response = await api.post("/orders", json=order_body(), headers=headers)

    assert response.status_code == 400
    assert detail in response.json()["detail"]
    assert await table_sizes(sessions) == before


async def test_gateway_outage_is_503_and_frees_the_key_for_the_retry(
    api: httpx.AsyncClient, sessions: Sessions
) -> None:
    body, key = order_body(payment_token="tok_gateway_down"), new_key()
    down = await post(api, body, key)

    assert down.status_code == 503
    assert int(down.headers["Retry-After"]) >= 1
    # The charge's outcome is unknown, so the key is not kept as answered or as in flight.
    assert await rows_for_key(sessions, key) == {"orders": 0, "charges": 0, "keys": 0}
    again = await post(api, body, key)
    assert again.status_code == 503, "a retry is not told the key is still in progress"


async def _hold_key(sessions: Sessions, key: str, body: dict[str, Any], lease: float) -> None:
    """Writes the key row a request leaves while it is mid-way (claimed, not yet answered)."""
    async with sessions.begin() as session:
        session.add(
            IdempotencyKey(
                key=key,
                request_hash=request_fingerprint(OrderIn.model_validate(body)),
                state=KeyState.IN_FLIGHT,
                locked_until=utcnow() + timedelta(seconds=lease),
            )
        )


async def test_key_still_in_flight_answers_409_with_retry_after(
    api: httpx.AsyncClient, sessions: Sessions
) -> None:
    body, key = order_body(), new_key()
    await _hold_key(sessions, key, body, lease=30)

    response = await post(api, body, key)

    assert response.status_code == 409
    assert 1 <= int(response.headers["Retry-After"]) <= 30
    assert await rows_for_key(sessions, key) == {"orders": 0, "charges": 0, "keys": 1}


async def test_key_whose_holder_died_is_taken_over_and_charged_once(
    api: httpx.AsyncClient, sessions: Sessions
) -> None:
    body, key = order_body(), new_key()
    await _hold_key(sessions, key, body, lease=-1)

    first = await post(api, body, key)
    again = await post(api, body, key)

    assert first.status_code == again.status_code == 202
    assert again.json()["order_id"] == first.json()["order_id"]
    assert await rows_for_key(sessions, key) == {"orders": 1, "charges": 1, "keys": 1}


# docs/http-api.md: the sandbox's declining test tokens and the reason each answers with.
DECLINES = {
    "tok_declined": "card_declined",
    "tok_insufficient_funds": "insufficient_funds",
    "tok_expired": "expired_card",
}


def test_every_declining_token_of_the_sandbox_is_tested() -> None:
    assert set(DECLINING_TOKENS) == set(DECLINES)


@pytest.mark.parametrize(("token", "reason"), DECLINES.items(), ids=DECLINES.keys())
async def test_declined_card_is_402_with_the_reason_and_replays_under_the_same_key(
    token: str,
    reason: str,
    api: httpx.AsyncClient,
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: Sessions,
) -> None:
    body, key = order_body(payment_token=token), new_key()
    declined = await post(api, body, key)
    again = await post(api, body, key)

    assert declined.status_code == again.status_code == 402
    assert declined.json()["detail"].startswith(f"{reason}: ")
    assert again.json() == declined.json()
    assert await rows_for_key(sessions, key) == {"orders": 0, "charges": 1, "keys": 1}
    # This test's task queue is its own: any workflow on it would be this order's.
    assert await workflow_runs(env, f'TaskQueue="{settings.TEMPORAL_TASK_QUEUE}"') == 0


def _item(**changes: Any) -> dict[str, Any]:
    return {"sku": "BOOK-1", "quantity": 1, "unit_price_cents": 100, **changes}


INVALID_BODIES: dict[str, dict[str, Any]] = {
    "bad e-mail": order_body(customer_email="not-an-email"),
    "oversized e-mail": order_body(customer_email="a" * 250 + "@example.com"),
    "empty items": order_body(items=[]),
    "quantity 0": order_body(items=[_item(quantity=0)]),
    "negative price": order_body(items=[_item(unit_price_cents=-1)]),
    "unknown currency": order_body(currency="XYZ"),
    "lower-case currency": order_body(currency="usd"),
    "unknown field": order_body(coupon="FREE"),
    "card number": order_body(card_number="4242424242424242"),
    "unknown item field": order_body(items=[_item(discount=5)]),
    "sku over 64 chars": order_body(items=[_item(sku="S" * 65)]),
    "too many items": order_body(items=[_item() for _ in range(101)]),
    "token not tok_": order_body(payment_token="4242424242424242"),
    # The amount columns are 32-bit on PostgreSQL: a total beyond them is refused, not a 500.
    "total over 2**31 cents": order_body(
        items=[_item(quantity=10_000, unit_price_cents=100_000_000)]
    ),
    "missing token": {k: v for k, v in order_body().items() if k != "payment_token"},
}


@pytest.mark.parametrize("body", INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
async def test_invalid_body_is_422_and_writes_nothing(
    api: httpx.AsyncClient, sessions: Sessions, body: dict[str, Any]
) -> None:
    before = await table_sizes(sessions)
    key = new_key()

    response = await post(api, body, key)

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert all({"loc", "msg", "type"} <= set(error) for error in detail)
    assert await table_sizes(sessions) == before
    assert await rows_for_key(sessions, key) == {"orders": 0, "charges": 0, "keys": 0}


async def test_unknown_order_is_404(api: httpx.AsyncClient) -> None:
    response = await api.get("/orders/ord_does_not_exist")
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]


async def test_order_reads_back_with_amount_currency_status_and_steps(
    api: httpx.AsyncClient, worker: Worker
) -> None:
    body = order_body(currency="EUR")
    order_id = await place_order(api, body)

    order = await wait_for_order_status(api, order_id, "completed")

    assert order["order_id"] == order_id
    assert order["amount_cents"] == 2699
    assert order["currency"] == "EUR"
    assert order["items"] == body["items"]
    assert {step["step"] for step in order["steps"]} == {"send_receipt", "notify_warehouse"}
    for step in order["steps"]:
        assert step["status"] == "succeeded"
        assert step["attempts"] == 1
        assert step["last_error"] is None


async def test_healthz_and_readyz_with_the_real_stack(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).status_code == 200
    ready = await api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"database": "ok", "temporal": "ok"}}


async def test_readyz_is_503_when_temporal_is_unreachable(settings: Settings) -> None:
    unreachable = settings.model_copy(update={"TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})
    async with api_client(unreachable) as api:
        assert (await api.get("/healthz")).status_code == 200
        ready = await api.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["temporal"] != "ok"
