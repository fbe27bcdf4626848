"""GET /metrics and the middleware that times every request by its route template."""

from __future__ import annotations

import time
from typing import cast

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import SessionsDep
from core.metrics import api_registry, http_request_duration, http_requests, scrape

router = APIRouter(tags=["observability"])

# Paths no route matched are one label value, so a scanner cannot mint a series per URL.
UNMATCHED_ROUTE = "<unmatched>"


class HttpMetricsMiddleware:
    """Counts and times each HTTP request by method, route template (`/orders/{order_id}`, not
    the ID) and status. Plain ASGI, so the response streams through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before it answers

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            labels = (scope["method"], route, str(status))
            http_requests.labels(*labels).inc()
            http_request_duration.labels(*labels).observe(time.perf_counter() - started)


def install_metrics(app: FastAPI) -> None:
    app.state.metrics_registry = api_registry()
    app.add_middleware(HttpMetricsMiddleware)
    app.include_router(router)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, sessions: SessionsDep) -> Response:
    """Prometheus text format: the API's counters and the database's backlog, read now."""
    registry = cast(CollectorRegistry, request.app.state.metrics_registry)
    collected = await scrape(registry, sessions)
    return Response(generate_latest(collected), media_type=CONTENT_TYPE_LATEST)
