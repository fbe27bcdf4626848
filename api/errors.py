"""The API's error answers: what each status means, declared once for the routes' OpenAPI
`responses`; the handlers that turn the dead-letter operator's refusals into 404, 409 and 504,
and a dependency outage into 503 + Retry-After (never a 500)."""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from temporalio import client as temporal_client
from temporalio.service import RPCError

from api.schemas import Problem, Readiness, Unavailable
from core.dead_letters import CommandRejected, CommandUnconfirmed, DeadLetterNotFound
from core.outages import (
    DATABASE,
    TEMPORAL,
    DependencyUnavailable,
    OutageLog,
    is_database_outage,
    is_temporal_outage,
)
from core.redrives import RedriveNotFound, RedriveRefused, RedriveUnconfirmed

RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "schema": {"type": "integer", "minimum": 1},
    }
}
_DESCRIPTIONS = {
    400: "Bad request: a missing or malformed header, or a body that cannot be parsed",
    401: "Missing or invalid API key",
    402: "The card was declined (replayed for the same Idempotency-Key)",
    403: "Cross-origin form post refused",
    404: "Not found",
    409: "Conflict with the resource's current state",
    413: "Request body too large",
    415: "The body must be application/json",
    503: "A dependency is unavailable; retry after Retry-After seconds",
    504: "No worker confirmed the command in time; it may still be applied",
}


def answers(*codes: int, html: bool = False) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of these error statuses, with their body models. On a route
    whose own answer is HTML (`html`), FastAPI would file the models under text/html, so their
    JSON is spelled out instead."""
    declared: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        model: type[BaseModel] = Unavailable if code == 503 else Problem
        entry: dict[str, Any] = {"description": _DESCRIPTIONS[code]}
        if html:
            entry["content"] = {"application/json": {"schema": model.model_json_schema()}}
        else:
            entry["model"] = model
        if code in (409, 503):
            entry["headers"] = RETRY_AFTER_HEADER
        declared[code] = entry
    return declared


READINESS_ANSWERS: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Readiness,
        "description": "The database or Temporal is unreachable",
        "headers": RETRY_AFTER_HEADER,
    }
}


def outage_logs(app: FastAPI) -> dict[str, OutageLog]:
    logs: dict[str, OutageLog] = app.state.outages
    return logs


def unavailable_response(unavailable: DependencyUnavailable) -> JSONResponse:
    return JSONResponse(
        {"detail": unavailable.detail, "dependency": unavailable.dependency},
        status_code=503,
        headers={"Retry-After": str(unavailable.retry_after)},
    )


def as_unavailable(error: BaseException) -> DependencyUnavailable | None:
    if isinstance(error, DependencyUnavailable):
        return error
    if is_database_outage(error):
        return DependencyUnavailable(DATABASE, "the database is unavailable; retry later")
    if is_temporal_outage(error):
        return DependencyUnavailable(TEMPORAL, "Temporal is unavailable; retry later")
    return None


async def _outage_handler(request: Request, error: Exception) -> JSONResponse:
    unavailable = as_unavailable(error)
    if unavailable is None:
        raise error  # a bug, not an outage: the 500 and its traceback are wanted
    if unavailable.dependency == DATABASE:
        # Temporal's failures are counted where the client makes the call (TemporalOutageWatch).
        outage_logs(request.app)[DATABASE].failed(error.__cause__ or error)
    return unavailable_response(unavailable)


# Every type an outage can surface as from a route; the handler re-raises whatever is not one.
OUTAGE_TYPES: tuple[type[Exception], ...] = (
    DependencyUnavailable,
    sa_exc.DBAPIError,
    sa_exc.TimeoutError,
    OSError,
    asyncpg.InterfaceError,
    RPCError,
    RuntimeError,
)


# What each refusal of the dead-letter operator answers; the review page, which answers with a
# page rather than JSON, catches them itself.
DEAD_LETTER_REFUSALS: dict[type[Exception], int] = {
    DeadLetterNotFound: 404,
    CommandRejected: 409,
    CommandUnconfirmed: 504,
    RedriveNotFound: 404,
    RedriveRefused: 409,
    RedriveUnconfirmed: 504,
}


async def _refusal_handler(request: Request, error: Exception) -> JSONResponse:
    status = next(code for kind, code in DEAD_LETTER_REFUSALS.items() if isinstance(error, kind))
    return JSONResponse({"detail": str(error)}, status_code=status)


def install_error_answers(app: FastAPI) -> None:
    app.state.outages = {name: OutageLog(name) for name in (DATABASE, TEMPORAL)}
    for error_type in OUTAGE_TYPES:
        app.add_exception_handler(error_type, _outage_handler)
    for refusal in DEAD_LETTER_REFUSALS:
        app.add_exception_handler(refusal, _refusal_handler)


class TemporalOutageWatch(temporal_client.Interceptor):
    """Ends the Temporal outage burst at the first call of the API's that Temporal answers
    again, and counts a failed one into it (so a burst is logged even where the caller turns
    the failure into an answer of its own)."""

    def __init__(self, outage: OutageLog) -> None:
        self._outage = outage

    def intercept_client(
        self, next: temporal_client.OutboundInterceptor
    ) -> temporal_client.OutboundInterceptor:
        return _WatchedOutbound(next, self._outage)


class _WatchedOutbound(temporal_client.OutboundInterceptor):
    def __init__(self, next: temporal_client.OutboundInterceptor, outage: OutageLog) -> None:
        super().__init__(next)
        self._outage = outage

    def _failed(self, error: BaseException) -> None:
        if is_temporal_outage(error):
            self._outage.failed(error)

    async def start_workflow(
        self, input: temporal_client.StartWorkflowInput
    ) -> temporal_client.WorkflowHandle[Any, Any]:
        try:
            handle = await super().start_workflow(input)
        except Exception as error:
            self._failed(error)
            raise
        self._outage.succeeded()
        return handle

    async def describe_workflow(
        self, input: temporal_client.DescribeWorkflowInput
    ) -> temporal_client.WorkflowExecutionDescription:
        try:
            described = await super().describe_workflow(input)
        except Exception as error:
            self._failed(error)
            raise
        self._outage.succeeded()
        return described

    async def start_workflow_update(
        self, input: temporal_client.StartWorkflowUpdateInput
    ) -> temporal_client.WorkflowUpdateHandle[Any]:
        try:
            handle = await super().start_workflow_update(input)
        except Exception as error:
            self._failed(error)
            raise
        self._outage.succeeded()
        return handle
