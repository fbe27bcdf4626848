"""A warehouse receiver for `make run` and the tests: verifies the signature, drops repeats by
`Idempotency-Key` as a real receiver would, and records every delivery it sees."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from core.ledger import ATTEMPT_HEADER
from core.signing import SIGNATURE_HEADER, verify_signature
from devsinks.faults import FaultInjector, WarehouseFaultsIn


@dataclass
class Delivery:
    idempotency_key: str | None
    signature_valid: bool
    answered: int
    duplicate: bool
    received_at: float
    body: dict[str, Any]
    # The token of the claim whose attempt sent it (X-Orderflow-Attempt): which attempt it was.
    attempt: str | None = None


class WarehouseReceiver:
    def __init__(self, secret: bytes | None, journal: Path | None = None) -> None:
        self.secret = secret
        self.journal = journal
        self.faults = FaultInjector()
        self.deliveries: list[Delivery] = []
        self.accepted: dict[str, Delivery] = {}

    def accepted_orders(self) -> list[str]:
        return [d.body.get("order_id", "") for d in self.accepted.values()]

    def deliveries_for(self, order_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.body.get("order_id") == order_id]

    async def receive(self, request: Request) -> Response:
        raw = await request.body()
        key = request.headers.get("Idempotency-Key")
        attempt = request.headers.get(ATTEMPT_HEADER)
        valid = self.secret is not None and verify_signature(
            self.secret, request.headers.get(SIGNATURE_HEADER), raw
        )
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        await self.faults.delay()
        if self.secret is not None and not valid:
            return self._record(key, valid, 401, False, body, attempt=attempt)
        if self.faults.should_fail():
            headers = {}
            if self.faults.faults.retry_after is not None:
                headers["Retry-After"] = self.faults.faults.retry_after
            status = self.faults.faults.status
            return self._record(key, valid, status, False, body, headers, attempt=attempt)
        if key is not None and key in self.accepted:
            return self._record(key, valid, 200, True, body, attempt=attempt)
        response = self._record(key, valid, 202, False, body, attempt=attempt)
        if key is not None:
            self.accepted[key] = self.deliveries[-1]
        return response

    def _record(
        self,
        key: str | None,
        valid: bool,
        status: int,
        duplicate: bool,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        *,
        attempt: str | None = None,
    ) -> Response:
        delivery = Delivery(key, valid, status, duplicate, time.time(), body, attempt)
        self.deliveries.append(delivery)
        if self.journal is not None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a") as journal:
                journal.write(json.dumps(asdict(delivery)) + "\n")
        return JSONResponse({"status": status, "duplicate": duplicate}, status, headers=headers)

    def router(self) -> APIRouter:
        router = APIRouter(tags=["warehouse"])

        @router.post("/webhooks/orders")
        async def webhook(request: Request) -> Response:
            """Receive an order webhook (signed, deduplicated by Idempotency-Key)."""
            return await self.receive(request)

        @router.get("/webhooks/deliveries")
        async def deliveries() -> list[dict[str, Any]]:
            """Every delivery received, repeats and failures included."""
            return [asdict(d) for d in self.deliveries]

        @router.get("/webhooks/faults")
        async def get_faults() -> dict[str, object]:
            """The faults in force."""
            return self.faults.faults.as_dict()

        @router.put("/webhooks/faults")
        async def set_faults(changes: WarehouseFaultsIn) -> dict[str, object]:
            """Change the faults: fail_next, fail_rate, status, retry_after, latency_ms."""
            return self.faults.configure(**changes.model_dump(exclude_unset=True)).as_dict()

        @router.delete("/webhooks/faults")
        async def clear_faults() -> dict[str, object]:
            """Heal the receiver."""
            self.faults.reset()
            return self.faults.faults.as_dict()

        return router


def create_app(receiver: WarehouseReceiver) -> FastAPI:
    app = FastAPI(title="orderflow dev warehouse and mail sinks")
    app.include_router(receiver.router())
    return app
