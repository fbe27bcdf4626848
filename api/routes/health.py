"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionsDep, TemporalDep
from api.errors import READINESS_ANSWERS
from api.schemas import Readiness
from core.outages import RETRY_AFTER_SECONDS

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_SECONDS = 2.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses=READINESS_ANSWERS)
async def readyz(sessions: SessionsDep, temporal: TemporalDep) -> JSONResponse:
    """The database and Temporal are reachable."""
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS), sessions() as session:
            await session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as failure:
        checks["database"] = f"unreachable: {type(failure).__name__}"
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            await temporal.service_client.check_health()
        checks["temporal"] = "ok"
    except Exception as failure:
        checks["temporal"] = f"unreachable: {type(failure).__name__}"
    ready = all(value == "ok" for value in checks.values())
    body = {"ready": ready, "checks": checks}
    if ready:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
