"""Where an order enters: `POST /orders` and reading an order back."""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Path
from fastapi.responses import JSONResponse
from temporalio.exceptions import WorkflowAlreadyStartedError

from api.deps import (
    DispatcherDep,
    IntakeDep,
    SessionsDep,
    SettingsDep,
    TemporalDep,
    require_api_key,
)
from api.errors import answers
from api.limits import require_json
from api.queries import order_with_steps
from api.schemas import (
    OrderAccepted,
    OrderCancelAccepted,
    OrderIn,
    OrderOut,
    StorableStr,
)
from core.cancellation import CancelVerdict, cancel_verdict
from core.contracts import CancelRequest
from core.db import read_session
from core.models import OrderStatus
from core.names import CANCEL_SIGNAL
from core.policy import step_policy
from core.temporal import start_order_workflow

router = APIRouter(
    prefix="/orders",
    tags=["orders"],
    dependencies=[Depends(require_api_key)],
    responses=answers(401, 503),
)

MAX_KEY_LENGTH = 255
OrderId = Annotated[StorableStr, Path(max_length=40)]


def _checked_key(key: str | None) -> str:
    if key is None or not key.strip():
        raise HTTPException(
            400, "Idempotency-Key header is required: send a unique value per order attempt"
        )
    if len(key) > MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise HTTPException(
            400, f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII chars"
        )
    return key


@router.post(
    "",
    status_code=202,
    response_model=OrderAccepted,
    responses=answers(400, 402, 409, 413, 415),
    dependencies=[Depends(require_json)],
)
async def place_order(
    order: OrderIn,
    intake: IntakeDep,
    dispatcher: DispatcherDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", examples=["checkout-8f3a2c-attempt-1"])
    ] = None,
) -> JSONResponse:
    """Charge the card, record the order and hand its follow-ups to a workflow."""
    outcome = await intake.place(_checked_key(idempotency_key), order)
    if outcome.new_order_id is not None:
        if settings.FAULT_EXIT_AFTER_ORDER_COMMIT:
            # The system suite's fault point: the order and its outbox entry are committed, the
            # workflow is not started, and the process dies as if killed (no cleanup, no answer).
            os._exit(70)
        await dispatcher.submit(outcome.new_order_id)
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=outcome.headers)


@router.get("/{order_id}", response_model=OrderOut, responses=answers(404))
async def get_order(order_id: OrderId, sessions: SessionsDep) -> OrderOut:
    """The order, its overall status and each follow-up step's status."""
    async with read_session(sessions) as session:
        found = await order_with_steps(session, order_id)
    if found is None:
        raise HTTPException(404, f"order {order_id} not found")
    return OrderOut.of(*found)


@router.post(
    "/{order_id}/cancel",
    status_code=202,
    response_model=OrderCancelAccepted,
    responses=answers(404, 409),
)
async def cancel_order(
    order_id: OrderId, sessions: SessionsDep, temporal: TemporalDep, settings: SettingsDep
) -> OrderCancelAccepted:
    """Ask the order's workflow to cancel it. The warehouse notification is skipped if it has not
    been delivered yet; once the warehouse accepted the order, the cancel is too late (409)."""
    async with sessions() as session:
        found = await order_with_steps(session, order_id)
    if found is None:
        raise HTTPException(404, f"order {order_id} not found")
    order, steps = found
    verdict = cancel_verdict(order, steps)
    if verdict == CancelVerdict.ALREADY_CANCELLED:
        return OrderCancelAccepted(order_id=order_id, status=order.status)
    if verdict == CancelVerdict.TOO_LATE:
        raise HTTPException(
            409, f"order {order_id} was already sent to the warehouse; cancel it there"
        )
    # Not part of the rule the workflow applies: a completed order's workflow has closed, and
    # the signal-with-start below would start it again.
    if order.status == OrderStatus.COMPLETED:
        raise HTTPException(409, f"order {order_id} is already completed")
    try:
        # Signal-with-start: the cancel reaches the workflow even if the outbox has not started
        # it yet, and the workflow then handles it before any follow-up.
        await start_order_workflow(
            temporal,
            order_id,
            settings.TEMPORAL_TASK_QUEUE,
            policy=step_policy(settings),
            start_signal=CANCEL_SIGNAL,
            start_signal_args=[CancelRequest(actor="api")],
        )
    except WorkflowAlreadyStartedError as closed:
        raise HTTPException(
            409, f"order {order_id}'s workflow has already closed; it cannot be cancelled"
        ) from closed
    return OrderCancelAccepted(order_id=order_id, status="cancelling")
