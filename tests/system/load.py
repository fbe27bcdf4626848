"""The system suite's client: places orders across the API processes the way a careful shop
does (one Idempotency-Key per order, retried with the same key until it gets its answer), and
notes every answer it had on the way."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support import order_body, wait_until

# Answers after which the same request, with the same key, is sent again.
RETRIED_STATUSES = frozenset({409, 500, 502, 503, 504})
DEFAULT_RETRY_PAUSE = 0.25


@dataclass
class Answer:
    at: float
    api: str
    status: int  # 0: no HTTP answer (connection refused or dropped, or a timeout)
    retry_after: str | None
    error: str | None = None  # why there was no answer
    took: float = 0.0  # seconds from sending the request to its answer


@dataclass
class Placed:
    key: str
    body: dict[str, Any]
    order_id: str | None = None
    answers: list[Answer] = field(default_factory=list)


@dataclass
class Client:
    """Round-robins over the API processes; a request that fails is retried on the next."""

    urls: Sequence[str]
    prefix: str
    # Generous: on a saturated machine one request can wait out several pool timeouts.
    give_up_after: float = 300.0
    placed: list[Placed] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._turn = itertools.count()
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(60.0), limits=httpx.Limits(max_connections=200)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def new_key(self) -> str:
        return f"{self.prefix}-{uuid.uuid4().hex}"

    async def place(
        self, body: dict[str, Any] | None = None, key: str | None = None, *, retry: bool = True
    ) -> Placed:
        placed = Placed(key or self.new_key(), body or order_body())
        self.placed.append(placed)
        await self.settle(placed, retry=retry)
        return placed

    async def settle(
        self, placed: Placed, *, retry: bool = True, api: int | None = None, url: str | None = None
    ) -> None:
        """Sends the request until it is accepted (first to `url`, or API number `api`)."""
        deadline = time.monotonic() + self.give_up_after
        first = url or (self.urls[api % len(self.urls)] if api is not None else None)
        while True:
            url, first = first or self.urls[next(self._turn) % len(self.urls)], None
            answer, response = await self._post(url, placed)
            placed.answers.append(answer)
            if response is not None and response.status_code == 202:
                placed.order_id = str(response.json()["order_id"])
                return
            if response is not None and response.status_code not in RETRIED_STATUSES:
                raise AssertionError(f"{placed.key}: {response.status_code} {response.text}")
            if not retry:
                return
            assert time.monotonic() < deadline, f"{placed.key} never accepted: {placed.answers}"
            await asyncio.sleep(_pause(answer))

    async def _post(self, url: str, placed: Placed) -> tuple[Answer, httpx.Response | None]:
        sent = time.perf_counter()
        try:
            response = await self._http.post(
                f"{url}/orders", json=placed.body, headers={"Idempotency-Key": placed.key}
            )
        except httpx.TransportError as failure:
            took = time.perf_counter() - sent
            return Answer(time.time(), url, 0, None, type(failure).__name__, took), None
        answer = Answer(
            time.time(),
            url,
            response.status_code,
            response.headers.get("Retry-After"),
            took=time.perf_counter() - sent,
        )
        return answer, response

    async def stream(
        self,
        count: int,
        per_second: float,
        *,
        body: Callable[[int], dict[str, Any] | None] | None = None,
    ) -> list[Placed]:
        """`count` orders, paced at `per_second`, each settled concurrently."""
        started = time.monotonic()
        tasks = []
        for n in range(count):
            # Pacing, not synchronisation: order n leaves n / per_second after the first.
            await asyncio.sleep(max(0.0, started + n / per_second - time.monotonic()))
            tasks.append(asyncio.create_task(self.place(body(n) if body else None)))
        return list(await asyncio.gather(*tasks))

    async def rush(
        self,
        count: int,
        customers: int,
        *,
        body: Callable[[int], dict[str, Any] | None] | None = None,
    ) -> list[Placed]:
        """`count` orders from `customers` concurrent customers, each placing its next order as
        soon as its last one was answered: a rush, not a paced stream."""
        numbers = iter(range(count))
        placed: list[Placed] = []

        async def customer() -> None:
            for n in numbers:
                placed.append(await self.place(body(n) if body else None))

        await asyncio.gather(*(customer() for _ in range(customers)))
        return placed

    async def sent(self, count: int) -> None:
        """Until the stream has sent `count` orders (where a scenario injects its fault)."""
        await wait_until(lambda: len(self.placed) >= count, within=300, message=f"{count} sent")

    def statuses(self) -> Counter[int]:
        return Counter(answer.status for placed in self.placed for answer in placed.answers)

    def transport_errors(self) -> Counter[str]:
        """Why requests got no HTTP answer (connection refused, reset, read timeout...)."""
        return Counter(
            answer.error for placed in self.placed for answer in placed.answers if answer.error
        )

    def accepted(self) -> dict[str, str]:
        """Key -> order ID for every order the API accepted."""
        return {p.key: p.order_id for p in self.placed if p.order_id is not None}


def _pause(answer: Answer) -> float:
    if answer.retry_after and answer.retry_after.isdigit():
        return min(float(answer.retry_after), 5.0)
    return DEFAULT_RETRY_PAUSE
