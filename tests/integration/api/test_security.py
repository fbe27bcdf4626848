"""Security rules, each against the real app: API keys, body and field limits, card data refused
and never echoed or logged, the webhook signature checked by an independent HMAC, loopback binds."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.limits import MAX_BODY_BYTES
from api.main import create_app
from core.models import Order, PaymentCharge
from core.settings import Settings
from core.signing import SIGNATURE_HEADER, verify_signature
from devsinks.plan import plan
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import (
    ROOT,
    WEBHOOK_SECRET,
    DevSinksProcess,
    WarehouseServer,
    api_client,
    free_port,
    running_worker,
)
from tests.support import (
    count_rows,
    independent_sign,
    new_key,
    order_body,
    wait_for_order_status,
    wait_until,
)

ORDER_KEY = "order-key-" + uuid.uuid4().hex
ADMIN_KEY = "admin-key-" + uuid.uuid4().hex
CARD_NUMBER = "4242424242424242"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(password: str, user: str = "operator") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def with_keys(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "API_KEYS": [SecretStr("old-order-key"), SecretStr(ORDER_KEY)],
            "ADMIN_API_KEYS": [SecretStr(ADMIN_KEY)],
        }
    )


@pytest.fixture
async def secured(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API with API_KEYS and ADMIN_API_KEYS set."""
    async with api_client(with_keys(settings)) as client:
        yield client


# --- settings and start-up -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "missing"),
    [
        ({}, "API_KEYS and ADMIN_API_KEYS"),
        ({"API_KEYS": [SecretStr(ORDER_KEY)]}, "ADMIN_API_KEYS"),
        ({"ADMIN_API_KEYS": [SecretStr(ADMIN_KEY)]}, "API_KEYS"),
    ],
)
async def test_production_api_refuses_to_start_without_keys(
    settings: Settings, keys: dict[str, Any], missing: str
) -> None:
    production = settings.model_copy(update={"ORDERFLOW_ENV": "production", **keys})
    with pytest.raises(RuntimeError, match=f"requires {missing}; refusing to start"):
        async with api_client(production):
            pass


async def test_production_api_starts_with_keys_and_secret(settings: Settings) -> None:
    production = with_keys(settings).model_copy(update={"ORDERFLOW_ENV": "production"})
    async with api_client(production) as client:
        assert (await client.get("/orders/nope")).status_code == 401
        assert (await client.get("/orders/nope", headers=bearer(ORDER_KEY))).status_code == 404


async def test_dev_api_without_keys_is_open_and_warns_at_start(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        async with api_client(settings) as client:
            assert (await client.get("/dead-letters")).status_code == 200
            assert (await client.get("/orders/nope")).status_code == 404
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("API_KEYS is not set" in message for message in warnings), warnings
    assert any("ADMIN_API_KEYS is not set" in message for message in warnings), warnings


# --- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer(ORDER_KEY + "x"),
        bearer(ADMIN_KEY),  # an admin key is not an order key
        basic(ORDER_KEY),  # the order endpoints take Bearer only
        {"Authorization": ORDER_KEY},
        {"Authorization": "Bearer"},
    ],
)
async def test_order_endpoints_need_an_api_key(
    secured: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    headers: dict[str, str],
) -> None:
    key = new_key()
    posted = await secured.post(
        "/orders", json=order_body(), headers={"Idempotency-Key": key, **headers}
    )
    read = await secured.get(f"/orders/{uuid.uuid4()}", headers=headers)

    for response in (posted, read):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "API key" in response.json()["detail"]
    assert await count_rows(sessions, PaymentCharge, PaymentCharge.idempotency_key == key) == 0
    assert await count_rows(sessions, Order, Order.idempotency_key == key) == 0


async def test_an_unauthenticated_invalid_body_gets_401_not_a_validation_answer(
    secured: httpx.AsyncClient,
) -> None:
    response = await secured.post("/orders", json={"nonsense": True})
    assert response.status_code == 401


async def test_order_endpoints_take_any_configured_api_key(
    secured: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], worker: Worker
) -> None:
    key = new_key()
    posted = await secured.post(
        "/orders", json=order_body(), headers={"Idempotency-Key": key, **bearer(ORDER_KEY)}
    )
    assert posted.status_code == 202, posted.text
    order_id = posted.json()["order_id"]
    again = await secured.get(f"/orders/{order_id}", headers=bearer("old-order-key"))
    assert again.status_code == 200
    assert again.json()["order_id"] == order_id
    assert await count_rows(sessions, PaymentCharge, PaymentCharge.idempotency_key == key) == 1


@pytest.mark.parametrize(
    "headers", [{}, bearer("wrong"), bearer(ORDER_KEY), basic("wrong"), basic(ORDER_KEY)]
)
async def test_dead_letter_endpoints_need_an_admin_key(
    secured: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    responses = [
        await secured.get("/dead-letters", headers=headers),
        await secured.get("/dead-letters/1", headers=headers),
        await secured.post("/dead-letters/1/retry", headers=headers),
        await secured.post("/dead-letters/retry", json={}, headers=headers),
        await secured.post("/dead-letters/1/discard", json={"reason": "no"}, headers=headers),
    ]
    for response in responses:
        assert response.status_code == 401, response.request.url
        challenges = response.headers.get_list("WWW-Authenticate")
        assert challenges == ['Bearer realm="orderflow"']


async def test_dead_letter_endpoints_refuse_basic_even_with_the_admin_key(
    secured: httpx.AsyncClient,
) -> None:
    # A browser logged in to /admin resends Basic to any form target on this host; the JSON
    # endpoints have no same-origin check, so they must not take it.
    response = await secured.post("/dead-letters/1/retry", headers=basic(ADMIN_KEY))
    assert response.status_code == 401


async def test_admin_pages_take_basic_and_prompt_for_it(secured: httpx.AsyncClient) -> None:
    refused = await secured.get("/admin")
    assert refused.status_code == 401
    assert any(c.startswith("Basic") for c in refused.headers.get_list("WWW-Authenticate"))
    assert (await secured.get("/admin", headers=basic(ADMIN_KEY))).status_code == 200


@pytest.mark.parametrize("headers", [bearer(ADMIN_KEY)])
async def test_dead_letter_endpoints_take_the_admin_key(
    secured: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await secured.get("/dead-letters", headers=headers)
    assert response.status_code == 200, response.text
    assert "items" in response.json()


# Everything else the app serves needs a key: a route added later is guarded or listed here.
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc"}
OPEN_PATHS |= {"/openapi.json"}
OPEN_PREFIXES = ("/admin/static",)  # stylesheets for the login-protected pages


async def test_every_route_but_the_probes_needs_a_key(
    settings: Settings, secured: httpx.AsyncClient
) -> None:
    app = create_app(with_keys(settings))
    checked = []
    for route_path, operations in app.openapi()["paths"].items():
        if route_path in OPEN_PATHS:
            continue
        path = re.sub(r"\{[^}]+\}", "1", route_path)
        admin = not route_path.startswith("/orders")
        for method in operations:
            wrong_key = bearer(ORDER_KEY if admin else ADMIN_KEY)
            for headers in ({}, wrong_key):
                response = await secured.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
            checked.append(f"{method.upper()} {route_path}")
    assert {"POST /orders", "GET /dead-letters", "GET /admin"} <= set(checked), checked
    for route in app.routes:
        if isinstance(route, Mount):
            assert route.path.startswith(OPEN_PREFIXES), route.path


async def test_probes_and_metrics_stay_open(secured: httpx.AsyncClient) -> None:
    assert (await secured.get("/healthz")).status_code == 200
    assert (await secured.get("/readyz")).status_code in (200, 503)
    metrics = await secured.get("/metrics")
    assert metrics.status_code in (200, 404)  # open whether or not metrics are mounted
    openapi = (await secured.get("/openapi.json")).json()
    assert set(openapi["components"]["securitySchemes"]) >= {"ApiKey", "AdminApiKey"}


# --- body size and field limits --------------------------------------------------------------


async def test_a_body_over_64_kib_gets_413(
    api: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    key = new_key()
    body = order_body(padding="x" * MAX_BODY_BYTES)
    response = await api.post("/orders", json=body, headers={"Idempotency-Key": key})
    assert response.status_code == 413
    assert "larger than 65536 bytes" in response.json()["detail"]
    assert await count_rows(sessions, PaymentCharge, PaymentCharge.idempotency_key == key) == 0


async def _chunks(payload: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


async def test_a_chunked_body_is_counted_as_it_streams(
    api: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], worker: Worker
) -> None:
    key = new_key()
    oversized = json.dumps(order_body(padding="x" * MAX_BODY_BYTES)).encode()
    request = api.build_request(
        "POST",
        "/orders",
        content=_chunks(oversized),
        headers={"Idempotency-Key": key, "Content-Type": "application/json"},
    )
    assert "Content-Length" not in request.headers
    response = await api.send(request)
    assert response.status_code == 413
    assert await count_rows(sessions, PaymentCharge, PaymentCharge.idempotency_key == key) == 0

    # A chunked body under the limit passes through intact.
    small = json.dumps(order_body()).encode()
    response = await api.post(
        "/orders",
        content=_chunks(small, 50),
        headers={"Idempotency-Key": new_key(), "Content-Type": "application/json"},
    )
    assert response.status_code == 202, response.text


async def test_the_admin_endpoints_have_the_same_body_limit(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/dead-letters/1/discard", json={"reason": "r" * (MAX_BODY_BYTES + 1)}
    )
    assert response.status_code == 413


def _item(**changes: Any) -> dict[str, Any]:
    return {"sku": "BOOK-1", "quantity": 1, "unit_price_cents": 100, **changes}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"items": [_item()] * 101}, "items"),
        ({"items": [_item(sku="S" * 65)]}, "sku"),
        ({"items": [_item(quantity=10_001)]}, "quantity"),
        ({"items": [_item(unit_price_cents=100_000_001)]}, "unit_price_cents"),
        # Every item within bounds, but the total would overflow the amount column.
        (
            {"items": [_item(quantity=10_000, unit_price_cents=100_000_000)] * 100},
            "order total",
        ),
        ({"customer_email": "a" * 250 + "@example.com"}, "customer_email"),
        ({"payment_token": "tok_" + "a" * 65}, "payment_token"),
        ({"currency": "XXX"}, "currency"),
    ],
)
async def test_out_of_bounds_fields_get_422_and_charge_nothing(
    api: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    changes: dict[str, Any],
    field: str,
) -> None:
    key = new_key()
    response = await api.post(
        "/orders", json=order_body(**changes), headers={"Idempotency-Key": key}
    )
    assert response.status_code == 422, response.text
    assert field in response.text
    assert await count_rows(sessions, PaymentCharge, PaymentCharge.idempotency_key == key) == 0


async def test_an_oversized_idempotency_key_gets_400(api: httpx.AsyncClient) -> None:
    response = await api.post("/orders", json=order_body(), headers={"Idempotency-Key": "k" * 256})
    assert response.status_code == 400


# --- card data -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"card_number": CARD_NUMBER},
        {"cardNumber": CARD_NUMBER},
        {"card-number": CARD_NUMBER},
        {"pan": CARD_NUMBER},
        {"number": CARD_NUMBER},
        {"card": {"number": CARD_NUMBER, "exp_month": 12, "cvc": "123"}},
        {"cvv": "123"},
        {"payment_token": CARD_NUMBER},
        {"payment_token": "4242 4242 4242 4242"},
        {"items": [_item(card_number=CARD_NUMBER)]},
    ],
)
async def test_card_data_is_refused_and_never_echoed(
    secured: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    changes: dict[str, Any],
) -> None:
    key = new_key()
    response = await secured.post(
        "/orders",
        json=order_body(**changes),
        headers={"Idempotency-Key": key, **bearer(ORDER_KEY)},
    )
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(error["type"] == "card_data_forbidden" for error in errors), errors
    assert any("never a card number" in error["msg"] for error in errors)
    assert not re.search(r"\d{3}", response.text), response.text  # no card digits, no CVC
    assert await count_rows(sessions, PaymentCharge, PaymentCharge.idempotency_key == key) == 0


async def test_a_malformed_token_is_not_echoed_either(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/orders",
        json=order_body(payment_token="secret-looking-value"),
        headers={"Idempotency-Key": new_key()},
    )
    assert response.status_code == 422
    assert "secret-looking-value" not in response.text
    assert response.json()["detail"][0]["loc"] == ["body", "payment_token"]


async def test_other_validation_errors_keep_fastapis_shape(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/orders",
        json=order_body(items=[_item(quantity=0)]),
        headers={"Idempotency-Key": new_key()},
    )
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "items", 0, "quantity"]
    assert error["type"] == "greater_than_equal"
    assert error["input"] == 0


# --- nothing sensitive in the logs -----------------------------------------------------------


# Our own loggers and the SDK's are read down to DEBUG; other libraries at INFO, the level a
# deployment runs at (aiosqlite's DEBUG prints SQL parameters; the logging setup must keep it
# quiet). The SMTP sink's "mail.log" plays the mail provider, not orderflow, so it is not read.
OWN_LOGGERS = ("orderflow", "api", "core", "activities", "workflows", "worker", "temporalio")
OUTSIDE_WORLD_LOGGERS = ("mail.log",)


class _Everything(logging.Handler):
    """Every record with all its fields (structured extras included), whatever the format."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(OUTSIDE_WORLD_LOGGERS):
            return
        if record.levelno < logging.INFO and not record.name.startswith(OWN_LOGGERS):
            return
        fields = {k: v for k, v in vars(record).items() if k not in ("args", "msg")}
        self.lines.append(f"{record.getMessage()} {fields!r} {record.exc_text or ''}")


async def test_logs_never_carry_tokens_secrets_keys_or_full_emails(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
    capfd: pytest.CaptureFixture[str],
) -> None:
    token = f"tok_{uuid.uuid4().hex}"
    email = f"private-{uuid.uuid4().hex[:10]}@example.com"
    secured_settings = with_keys(settings).model_copy(update={"LOG_LEVEL": "DEBUG"})
    captured = _Everything()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(captured)
    root.setLevel(logging.DEBUG)
    # One failed delivery first, so the failure paths log too.
    warehouse.faults.configure(fail_next=1, status=503)
    try:
        async with (
            api_client(secured_settings) as api,
            running_worker(env.client, secured_settings, sessions),
        ):
            await api.post(  # refused: wrong key
                "/orders", json=order_body(email), headers={"Idempotency-Key": new_key()}
            )
            await api.post(  # refused: card data
                "/orders",
                json=order_body(email, card_number=CARD_NUMBER),
                headers={"Idempotency-Key": new_key(), **bearer(ORDER_KEY)},
            )
            placed = await api.post(
                "/orders",
                json=order_body(email, payment_token=token),
                headers={"Idempotency-Key": new_key(), **bearer(ORDER_KEY)},
            )
            assert placed.status_code == 202, placed.text
            order_id = placed.json()["order_id"]
            await api.get("/dead-letters", headers=bearer(ADMIN_KEY))
            api.headers.update(bearer(ORDER_KEY))
            await wait_for_order_status(api, order_id, "completed")
    finally:
        root.removeHandler(captured)
        root.setLevel(previous_level)
    out, err = capfd.readouterr()
    text = "\n".join([*captured.lines, out, err])

    assert len(warehouse.deliveries_for(order_id)) == 2  # the failure path did run
    assert captured.lines, "nothing was logged, so the test proves nothing"
    for forbidden in (token, WEBHOOK_SECRET, ORDER_KEY, ADMIN_KEY, email, CARD_NUMBER):
        leaks = [line[:300] for line in text.splitlines() if forbidden in line]
        assert not leaks, f"{forbidden!r} appears in the logs: {leaks[:5]}"


# --- the webhook signature, checked independently ---------------------------------------------


def independent_verify(secret: str, header: str, body: bytes, now: float, tolerance: int) -> bool:
    """What a warehouse writes from the README alone: no orderflow code."""
    parts = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(parts["t"])
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    fresh = abs(now - timestamp) <= tolerance
    return fresh and hmac.compare_digest(expected.hexdigest(), parts["v1"])


@dataclass
class RawCapture:
    """A real HTTP receiver that keeps each request's raw bytes and headers."""

    requests: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        self.requests.append((await request.body(), dict(request.headers)))
        await JSONResponse({"ok": True}, status_code=202)(scope, receive, send)


@asynccontextmanager
async def raw_receiver() -> AsyncIterator[tuple[RawCapture, str]]:
    capture = RawCapture()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(capture, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started, message="raw receiver started")
    try:
        yield capture, f"http://127.0.0.1:{port}/webhooks/orders"
    finally:
        server.should_exit = True
        await serving


async def test_the_webhook_signature_verifies_with_plain_hmac_and_a_replay_is_rejected(
    settings: Settings,
    env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    warehouse_server: WarehouseServer,
) -> None:
    async with raw_receiver() as (capture, url):
        routed = settings.model_copy(update={"WAREHOUSE_WEBHOOK_URL": url})
        async with api_client(routed) as api, running_worker(env.client, routed, sessions):
            response = await api.post(
                "/orders", json=order_body(), headers={"Idempotency-Key": new_key()}
            )
            order_id = response.json()["order_id"]
            await wait_for_order_status(api, order_id, "completed")
    [(raw, headers)] = capture.requests
    header = headers[SIGNATURE_HEADER.lower()]
    signed_at = int(dict(part.split("=", 1) for part in header.split(","))["t"])

    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)
    assert json.loads(raw)["order_id"] == order_id
    assert independent_verify(WEBHOOK_SECRET, header, raw, time.time(), 300)
    assert not independent_verify("another-secret", header, raw, time.time(), 300)
    assert not independent_verify(WEBHOOK_SECRET, header, raw + b" ", time.time(), 300)

    # The same request captured and replayed more than five minutes later is stale.
    later = signed_at + 301
    assert not independent_verify(WEBHOOK_SECRET, header, raw, later, 300)
    assert not verify_signature(WEBHOOK_SECRET.encode(), header, raw, now=later)
    assert verify_signature(WEBHOOK_SECRET.encode(), header, raw, now=signed_at + 299)

    # A receiver built on verify_signature turns the stale replay away over HTTP.
    stale = independent_sign(WEBHOOK_SECRET, raw, int(time.time()) - 301)
    fresh = independent_sign(WEBHOOK_SECRET, raw, int(time.time()))
    async with httpx.AsyncClient() as client:
        replay_headers = {"Idempotency-Key": f"replay-{uuid.uuid4()}"}
        replayed = await client.post(
            warehouse_server.url, content=raw, headers={**replay_headers, SIGNATURE_HEADER: stale}
        )
        accepted = await client.post(
            warehouse_server.url, content=raw, headers={**replay_headers, SIGNATURE_HEADER: fresh}
        )
    assert replayed.status_code == 401
    assert accepted.status_code == 202


# --- what make run binds ---------------------------------------------------------------------


def test_make_run_binds_the_temporal_ui_and_the_api_to_loopback() -> None:
    stack = plan({})
    assert {port.host for port in stack.ports} == {"127.0.0.1"}
    argv = {service.name: " ".join(service.argv) for service in stack.services}
    assert "--ip 127.0.0.1" in argv["temporal"] and "--ui-ip 127.0.0.1" in argv["temporal"]
    assert re.search(r"uvicorn api\.main:app .*--host 127\.0\.0\.1 ", argv["api"])
    assert "0.0.0.0" not in str(argv)


def _listening_addresses(port: int) -> set[str]:
    """The local addresses listening on the port, from the kernel's own table."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


async def test_make_run_sinks_listen_on_loopback_only(devsinks_process: DevSinksProcess) -> None:
    # make run leaves SMTP_HOST at its default, which is loopback.
    assert "SMTP_HOST" not in (ROOT / "Makefile").read_text()
    assert Settings.model_fields["SMTP_HOST"].default == "127.0.0.1"
    loopback = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
    http_port = int(devsinks_process.http_url.rsplit(":", 1)[1])
    for port in (http_port, devsinks_process.smtp_port):
        await wait_until(partial(_listening_addresses, port), within=30, message=f"port {port}")
        assert _listening_addresses(port) == {loopback}
