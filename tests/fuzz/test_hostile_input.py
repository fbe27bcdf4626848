"""Hand-written hostile requests against the real uvicorn API (production mode, keys set): each
gets its 4xx with a body the schema declares, and writes nothing (no key claim, charge, order
or workflow). Sent over real sockets, some byte by byte, because the HTTP parser is part of what
is under test."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db import create_engine, create_sessionmaker
from core.models import IdempotencyKey, Order, PaymentCharge, WorkflowOutbox
from tests.fuzz.conftest import FUZZ_KEY, FuzzServer
from tests.support import count_rows, new_key, order_body

Sessions = async_sessionmaker[AsyncSession]
TEN_MB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
async def fuzz_sessions(fuzz_server: FuzzServer) -> AsyncIterator[Sessions]:
    engine = create_engine(fuzz_server.settings)
    yield create_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
async def http(fuzz_server: FuzzServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=fuzz_server.url, headers=fuzz_server.keys, timeout=60
    ) as client:
        yield client


async def written(sessions: Sessions) -> dict[str, int]:
    return {
        model.__tablename__: await count_rows(sessions, model)
        for model in (IdempotencyKey, PaymentCharge, Order, WorkflowOutbox)
    }


@pytest.fixture
async def nothing_written(fuzz_sessions: Sessions) -> AsyncIterator[None]:
    """Fails the test if it left any row behind."""
    before = await written(fuzz_sessions)
    yield
    assert await written(fuzz_sessions) == before


def json_post(body: bytes, key: str | None = None) -> dict[str, Any]:
    return {
        "content": body,
        "headers": {"Content-Type": "application/json", "Idempotency-Key": key or new_key()},
    }


def assert_field_errors(response: httpx.Response) -> list[dict[str, Any]]:
    """A 422 in FastAPI's shape: a list of errors, each with loc, msg and type."""
    assert response.status_code == 422, response.text
    errors: list[dict[str, Any]] = response.json()["detail"]
    assert isinstance(errors, list) and errors
    for error in errors:
        assert {"loc", "msg", "type"} <= error.keys()
    return errors


def assert_problem(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail: str = response.json()["detail"]
    assert isinstance(detail, str)
    return detail


async def raw_request(server: FuzzServer, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Sends bytes exactly as given (no client library to tidy them up); returns the status
    and the raw response."""
    address = urlsplit(server.url)
    assert address.hostname and address.port
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(head + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 30)
    finally:
        writer.close()
    status_line = answer.split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), answer


def request_head(key: bytes, body: bytes) -> bytes:
    return (
        b"POST /orders HTTP/1.1\r\nHost: orderflow.test\r\n"
        + f"Authorization: Bearer {FUZZ_KEY}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + b"Idempotency-Key: "
        + key
        + b"\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    )


@pytest.mark.usefixtures("nothing_written")
async def test_malformed_json_is_a_422_naming_the_position(http: httpx.AsyncClient) -> None:
    response = await http.post("/orders", **json_post(b'{"customer_email": "a@example.com",'))
    [error] = assert_field_errors(response)
    assert error["type"] == "json_invalid"


@pytest.mark.usefixtures("nothing_written")
async def test_a_10_mb_body_is_a_413_whether_declared_or_chunked(
    http: httpx.AsyncClient,
) -> None:
    declared = await http.post("/orders", **json_post(b" " * TEN_MB))
    assert "larger than" in assert_problem(declared, 413)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(TEN_MB // 65536):
            yield b" " * 65536

    streamed = await http.post(
        "/orders",
        content=chunks(),
        headers={"Content-Type": "application/json", "Idempotency-Key": new_key()},
    )
    assert "larger than" in assert_problem(streamed, 413)


@pytest.mark.usefixtures("nothing_written")
async def test_deeply_nested_json_is_refused(http: httpx.AsyncClient) -> None:
    depth = 20_000  # 40 KB: under the body limit, far past any parser's recursion limit
    nested = b'{"customer_email": "a@example.com", "items": ' + b"[" * depth + b"]" * depth + b"}"
    response = await http.post("/orders", **json_post(nested))
    assert "error parsing the body" in assert_problem(response, 400)


@pytest.mark.usefixtures("nothing_written")
async def test_invalid_utf8_is_a_400(http: httpx.AsyncClient) -> None:
    body = json.dumps(order_body()).encode().replace(b"buyer-", b"buyer-\xff\xfe", 1)
    response = await http.post("/orders", **json_post(body))
    assert "error parsing the body" in assert_problem(response, 400)


@pytest.mark.usefixtures("nothing_written")
@pytest.mark.parametrize(
    "item",
    [
        {"sku": "BOOK-1", "quantity": 10**30, "unit_price_cents": 100},
        {"sku": "BOOK-1", "quantity": 1, "unit_price_cents": 2**63},
        {"sku": "BOOK-1", "quantity": -(2**64), "unit_price_cents": 1},
        {"sku": "BOOK-1", "quantity": 1e308, "unit_price_cents": 1},
    ],
)
async def test_huge_integers_are_a_422(http: httpx.AsyncClient, item: dict[str, Any]) -> None:
    body = json.dumps(order_body(items=[item])).encode()
    assert_field_errors(await http.post("/orders", **json_post(body)))


@pytest.mark.usefixtures("nothing_written")
async def test_an_integer_too_long_to_parse_is_a_400(http: httpx.AsyncClient) -> None:
    body = json.dumps(order_body(items=[{"sku": "B", "quantity": 1, "unit_price_cents": 0}]))
    body = body.replace('"quantity": 1', '"quantity": ' + "9" * 5000)
    response = await http.post("/orders", **json_post(body.encode()))
    assert "error parsing the body" in assert_problem(response, 400)


@pytest.mark.usefixtures("nothing_written")
@pytest.mark.parametrize("path", ["/dead-letters/2147483648", "/dead-letters/0"])
async def test_ids_beyond_the_database_are_a_422(http: httpx.AsyncClient, path: str) -> None:
    assert_field_errors(await http.get(path))
    assert_field_errors(await http.post(f"{path}/retry"))


@pytest.mark.usefixtures("nothing_written")
@pytest.mark.parametrize(
    "email",
    [
        "bu\x00yer@example.com",  # NUL
        "buyer\ud800@example.com",  # a lone surrogate
        "buyer\uff20example.com",  # a fullwidth at sign is not an at sign
        "buy er@exämple.com",  # a space in the local part
        "buyer@exa\u202emple.com",  # a right-to-left override in the domain
        "büyer@" + "ä" * 250 + ".com",  # over 254 characters
    ],
)
async def test_broken_unicode_email_addresses_are_a_422(
    http: httpx.AsyncClient, email: str
) -> None:
    # json.dumps escapes what UTF-8 cannot carry, as a client's JSON encoder would.
    body = json.dumps(order_body(email=email)).encode()
    errors = assert_field_errors(await http.post("/orders", **json_post(body)))
    assert any("customer_email" in error["loc"] for error in errors), errors


async def test_an_internationalized_email_address_is_taken(
    http: httpx.AsyncClient, fuzz_sessions: Sessions
) -> None:
    """Not hostile: a real address in Unicode is an order like any other (email-validator
    normalises it), so refusing non-ASCII outright would be wrong."""
    key = new_key()
    body = json.dumps(order_body(email=f"jösé-{uuid.uuid4().hex[:6]}@exämple.de")).encode()
    response = await http.post("/orders", **json_post(body, key))
    assert response.status_code == 202, response.text
    assert await count_rows(fuzz_sessions, Order, Order.idempotency_key == key) == 1


@pytest.mark.usefixtures("nothing_written")
@pytest.mark.parametrize(
    "key",
    [
        b"abc\rdef",  # a bare CR inside the value
        b"abc\ndef",  # a bare LF
        b"abc\r\n def",  # obsolete line folding
        b"abc\x00def",  # NUL
        b"abc\x7fdef",  # DEL
        b"abc\x01def",  # another control character
        b" ",  # blank
    ],
)
async def test_control_characters_or_blank_idempotency_keys_are_a_400(
    fuzz_server: FuzzServer, key: bytes
) -> None:
    """Most of these never reach the app: the HTTP parser refuses the header (its own 400)."""
    body = json.dumps(order_body()).encode()
    status, _answer = await raw_request(fuzz_server, request_head(key, body), body)
    assert status == 400


@pytest.mark.usefixtures("nothing_written")
@pytest.mark.parametrize(
    "key", ["clé-1".encode(), "clé-1".encode("latin-1"), "ключ".encode(), "k\u00a0ey".encode()]
)
async def test_non_ascii_idempotency_keys_are_a_400(http: httpx.AsyncClient, key: bytes) -> None:
    response = await http.post(
        "/orders",
        content=json.dumps(order_body()).encode(),
        headers={b"Content-Type": b"application/json", b"Idempotency-Key": key},
    )
    assert "Idempotency-Key" in assert_problem(response, 400)


@pytest.mark.usefixtures("nothing_written")
@pytest.mark.parametrize(
    "body",
    [
        {"reason": "\ud800"},
        {"reason": "ok", "actor": "ops\x00"},
        {"reason": "x" * 2001},
    ],
)
async def test_unstorable_discard_reasons_are_a_422(
    http: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await http.post(
        "/dead-letters/1/discard",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert_field_errors(response)


@pytest.mark.usefixtures("nothing_written")
async def test_a_form_body_where_json_is_expected_is_a_415(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/orders", data={"customer_email": "a@example.com"}, headers={"Idempotency-Key": "k-1"}
    )
    assert "application/json" in assert_problem(response, 415)
