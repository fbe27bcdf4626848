"""What the API refuses before it does any work: oversized bodies (413) and card data (422), and
the 422 answer itself, which must never echo a card number or a payment token back."""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import PydanticCustomError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024
REDACTED = "[redacted]"

# Field names that carry card data, compared lower-case with separators removed
# (card_number, cardNumber, card-number all become "cardnumber").
CARD_FIELDS = frozenset(
    {
        "card", "cardnumber", "cardno", "cardnum", "number", "pan", "primaryaccountnumber",
        "cvc", "cvv", "cvc2", "cvv2", "csc", "securitycode", "cardsecuritycode",
        "exp", "expiry", "expirydate", "expiration", "expirationdate", "expmonth", "expyear",
        "track1", "track2", "trackdata",
    }
)  # fmt: skip
# Values we never echo: card fields, and the token (a card number pasted into it included).
SENSITIVE_FIELDS = CARD_FIELDS | {"paymenttoken"}
CARD_NUMBER_LIKE = re.compile(r"[0-9][0-9 -]{10,21}[0-9]")
CARD_DATA_ERROR = "card_data_forbidden"
CARD_DATA_MESSAGE = (
    "card data is not accepted here: send only the payment gateway's token in payment_token "
    "(tok_...), never a card number, CVC or expiry"
)


def _normalized(name: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _carries_card_field(value: Any) -> bool:
    if isinstance(value, dict):
        return any(
            _normalized(key) in CARD_FIELDS or _carries_card_field(item)
            for key, item in value.items()
        )
    if isinstance(value, list):
        return any(_carries_card_field(item) for item in value)
    return False


def looks_like_card_number(value: object) -> bool:
    if not isinstance(value, str) or not CARD_NUMBER_LIKE.fullmatch(value.strip()):
        return False
    return 12 <= sum(char.isdigit() for char in value) <= 19


def reject_card_data(body: Any) -> None:
    """Raises a validation error naming the rule when a request body carries card data."""
    if _carries_card_field(body) or (
        isinstance(body, dict) and looks_like_card_number(body.get("payment_token"))
    ):
        raise PydanticCustomError(CARD_DATA_ERROR, CARD_DATA_MESSAGE)


def _scrubbed(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: REDACTED if _normalized(key) in SENSITIVE_FIELDS else _scrubbed(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_scrubbed(item) for item in value]
    return value


def redacted_errors(errors: Any) -> list[dict[str, Any]]:
    """FastAPI's error list with every sensitive `input` blanked out."""
    redacted = []
    for error in errors:
        error = dict(error)
        sensitive_loc = any(_normalized(part) in SENSITIVE_FIELDS for part in error.get("loc", ()))
        if "input" in error:
            if sensitive_loc or error.get("type") == CARD_DATA_ERROR:
                error["input"] = REDACTED
            else:
                error["input"] = _scrubbed(error["input"])
        redacted.append(error)
    return redacted


def _renderable(value: Any) -> Any:
    """What JSON can carry of an echoed input: a lone surrogate or a NaN the client sent would
    otherwise make the 422 itself fail to render (a 500)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {_renderable(key): _renderable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_renderable(item) for item in value]
    return value


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 shape, minus anything sensitive the client sent."""
    assert isinstance(exc, RequestValidationError)
    errors = jsonable_encoder(redacted_errors(exc.errors()))
    return JSONResponse(status_code=422, content={"detail": _renderable(errors)})


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length != "0")


async def require_json(request: Request) -> None:
    """415 for a body that is not JSON: otherwise a form or text body is taken as a string and
    refused with a 422 that talks about a dictionary the client never sent."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if _has_body(request) and media != "application/json" and not media.endswith("+json"):
        raise HTTPException(415, "send the body as JSON with Content-Type: application/json")


class BodySizeLimit:
    """Answers 413 for a body over the limit: at once from Content-Length, or, for a chunked
    body, as soon as the bytes read pass the limit (so the body is never buffered whole)."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return

        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body, so the
                    # client gets the ordinary error answer.
                    raise self._error()
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except HTTPException as error:
            # Someone outside FastAPI's routing read the body: answer here if nobody has yet.
            if error.status_code != 413 or started:
                raise
            await self._too_large(scope, receive, send)

    def _error(self) -> HTTPException:
        return HTTPException(413, f"request body is larger than {self.max_bytes} bytes")

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self._error()
        response = JSONResponse({"detail": error.detail}, status_code=413)
        await response(scope, receive, send)


def install_limits(app: FastAPI) -> None:
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
