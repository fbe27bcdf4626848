"""Where an order enters: `POST /orders` and reading an order back."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.deps import DispatcherDep, IntakeDep, SessionsDep, require_api_key
from api.schemas import OrderAccepted, OrderIn, OrderItemIn, OrderOut, Problem, StepOut
from core.models import Order, OrderStep

router = APIRouter(
    prefix="/orders",
    tags=["orders"],
    dependencies=[Depends(require_api_key)],
    responses={401: {"model": Problem}},
)

MAX_KEY_LENGTH = 255


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
    responses={
        400: {"model": Problem},
        402: {"model": Problem},
        409: {"model": Problem},
        503: {"model": Problem},
    },
)
async def place_order(
    order: OrderIn,
    intake: IntakeDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Charge the card, record the order and hand its follow-ups to a workflow."""
    outcome = await intake.place(_checked_key(idempotency_key), order)
    if outcome.new_order_id is not None:
        await dispatcher.submit(outcome.new_order_id)
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=outcome.headers)


@router.get("/{order_id}", response_model=OrderOut, responses={404: {"model": Problem}})
async def get_order(order_id: str, sessions: SessionsDep) -> OrderOut:
    """The order, its overall status and each follow-up step's status."""
    async with sessions() as session:
        order = await session.get(Order, order_id)
        if order is None:
            raise HTTPException(404, f"order {order_id} not found")
        steps = (
            await session.scalars(
                select(OrderStep).where(OrderStep.order_id == order_id).order_by(OrderStep.step)
            )
        ).all()
    return OrderOut(
        order_id=order.id,
        status=order.status,
        amount_cents=order.amount_cents,
        currency=order.currency,
        items=[OrderItemIn.model_validate(item) for item in order.items],
        created_at=order.created_at,
        cancelled_at=order.cancelled_at,
        steps=[
            StepOut(
                step=step.step,
                status=step.status,
                attempts=step.attempts,
                last_error=step.last_error,
                updated_at=step.updated_at,
            )
            for step in steps
        ],
    )
