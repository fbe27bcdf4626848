"""What the HTTP API accepts and answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    model_validator,
)

from api.limits import reject_card_data
from core.models import Step

if TYPE_CHECKING:
    from core.models import DeadLetter, Order, OrderStep
    from core.redrives import RedriveFilter, RedriveProgress


def _storable(value: str) -> str:
    # The database stores UTF-8 text: PostgreSQL refuses NUL in text and no encoder takes a lone
    # surrogate, so either one is the client's 422 here rather than the driver's 500 later.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogate code points)") from None
    return value


# Any client string that reaches the database (a body field, a path or query parameter). Put
# `Storable` after a type's own constraints: constraints after a validator lose their meaning.
Storable = AfterValidator(_storable)
StorableStr = Annotated[str, Storable]
# IDs and offsets are 32-bit integers in the database; a larger one cannot name a row.
MAX_DB_INT = 2**31 - 1
DbId = Annotated[int, Field(ge=1, le=MAX_DB_INT)]

# ISO 4217 codes the shop sells in; anything else is an unknown currency.
Currency = Literal[
    "USD", "EUR", "GBP", "CHF", "JPY", "CAD", "AUD", "NZD", "SEK", "NOK", "DKK", "PLN", "CZK",
    "HUF", "RON", "BGN", "ISK", "MXN", "BRL", "INR", "SGD", "HKD", "KRW", "ZAR", "ILS", "TRY",
]  # fmt: skip
Sku = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
# Only gateway tokens are taken; a card number never reaches this service.
PaymentToken = Annotated[str, StringConstraints(pattern=r"^tok_[A-Za-z0-9_]{1,64}$")]
MAX_ITEMS = 100
# The amount columns are 32-bit integers on PostgreSQL; a larger total is refused, not a 500.
MAX_ORDER_TOTAL_CENTS = 2**31 - 1


class OrderItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: Sku
    quantity: int = Field(ge=1, le=10_000)
    unit_price_cents: int = Field(ge=0, le=100_000_000)


class OrderIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "customer_email": "buyer@example.com",
                    "currency": "EUR",
                    "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price_cents": 1250}],
                    "payment_token": "tok_visa",
                },
                {
                    "customer_email": "declined@example.com",
                    "currency": "USD",
                    "items": [{"sku": "PEN-9", "quantity": 1, "unit_price_cents": 199}],
                    "payment_token": "tok_declined",
                },
            ]
        },
    )

    customer_email: Annotated[
        EmailStr, StringConstraints(max_length=254), AfterValidator(_storable)
    ]
    currency: Currency
    items: list[OrderItemIn] = Field(min_length=1, max_length=MAX_ITEMS)
    payment_token: PaymentToken

    @model_validator(mode="before")
    @classmethod
    def _no_card_data(cls, data: Any) -> Any:
        reject_card_data(data)
        return data

    @model_validator(mode="after")
    def _total_in_range(self) -> OrderIn:
        if self.amount_cents > MAX_ORDER_TOTAL_CENTS:
            raise ValueError(f"the order total must not exceed {MAX_ORDER_TOTAL_CENTS} cents")
        return self

    @property
    def amount_cents(self) -> int:
        return sum(item.quantity * item.unit_price_cents for item in self.items)


class OrderAccepted(BaseModel):
    order_id: str
    workflow_id: str
    status: str


class StepOut(BaseModel):
    step: str
    status: str
    attempts: int
    last_error: str | None
    updated_at: datetime


class OrderOut(BaseModel):
    order_id: str
    status: str
    amount_cents: int
    currency: str
    items: list[OrderItemIn]
    created_at: datetime
    cancelled_at: datetime | None
    steps: list[StepOut]

    @classmethod
    def of(cls, order: Order, steps: Sequence[OrderStep]) -> OrderOut:
        return cls(
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


class OrderCancelAccepted(BaseModel):
    order_id: str
    # "cancelling" while the workflow records it, or the order's status if it already had.
    status: str


class DeadLetterOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    order_id: str
    step: str
    occurrence: int
    status: str
    error_type: str
    error_message: str
    permanent: bool
    attempts: int
    workflow_id: str
    run_id: str
    created_at: datetime
    updated_at: datetime
    resolved_at: datetime | None
    resolution: str | None
    discarded_by: str | None
    discard_reason: str | None


class DeadLetterPage(BaseModel):
    items: list[DeadLetterOut]
    total: int
    limit: int
    offset: int


class DeadLetterCommandAccepted(BaseModel):
    dead_letter_id: int
    order_id: str
    step: str
    status: str

    @classmethod
    def of(cls, letter: DeadLetter) -> DeadLetterCommandAccepted:
        return cls(
            dead_letter_id=letter.id,
            order_id=letter.order_id,
            step=letter.step,
            status=letter.status,
        )


class DiscardIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"reason": "the warehouse cancelled the order", "actor": "ops"}]
        },
    )

    reason: Annotated[
        str, StringConstraints(min_length=1, max_length=2000, strip_whitespace=True), Storable
    ]
    actor: Annotated[str, StringConstraints(min_length=1, max_length=200), Storable] = "operator"


class Problem(BaseModel):
    """Every error answer but 422 (FastAPI's list of field errors) and 503."""

    detail: str


class Unavailable(Problem):
    """503: a dependency this request needs is down; retry after the Retry-After seconds."""

    dependency: Literal["database", "temporal", "payment_gateway"]


class Readiness(BaseModel):
    ready: bool
    # "ok", or why the dependency is not: {"database": "ok", "temporal": "unreachable: ..."}.
    checks: dict[str, str]


# --- bulk redrives -------------------------------------------------------------------------------

# A redrive's filter rides in its workflow's history with every page it reads: kept short.
MAX_REDRIVE_ORDER_IDS = 100
RedriveState = Literal[
    "listing", "sending", "paused", "waiting_for_outcomes", "finished", "cancelled"
]
OrderIdText = Annotated[str, StringConstraints(min_length=1, max_length=40), Storable]


class RedriveIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"step": "notify_warehouse", "error_type": "WarehouseRejected", "per_second": 5}
            ]
        },
    )

    step: Step | None = None
    error_type: Annotated[str, StringConstraints(max_length=200), Storable] | None = None
    order_id: OrderIdText | None = None
    order_ids: list[OrderIdText] = Field(default_factory=list, max_length=MAX_REDRIVE_ORDER_IDS)
    per_second: float = Field(default=5.0, gt=0, le=100)
    # The oldest `limit` letters that match; every match without it.
    limit: int | None = Field(default=None, ge=1, le=MAX_DB_INT)


class RedriveFilterOut(BaseModel):
    step: str | None
    error_type: str | None
    order_ids: list[str]


class RedriveStarted(BaseModel):
    redrive_id: str
    # Where its progress is (also the Location header).
    progress_url: str
    per_second: float
    limit: int | None
    filter: RedriveFilterOut

    @classmethod
    def of(
        cls, redrive_id: str, progress_url: str, body: RedriveIn, where: RedriveFilter
    ) -> RedriveStarted:
        return cls(
            redrive_id=redrive_id,
            progress_url=progress_url,
            per_second=body.per_second,
            limit=body.limit,
            filter=RedriveFilterOut(**asdict(where)),
        )


class RedriveOut(BaseModel):
    redrive_id: str
    state: RedriveState
    total: int
    sent: int
    resolved: int
    failed_again: int
    skipped: int
    per_second: float
    filter: RedriveFilterOut
    started_at: datetime | None
    finished_at: datetime | None
    # The latest few letters skipped, each with why.
    last_skips: list[str]

    @classmethod
    def of(cls, progress: RedriveProgress) -> RedriveOut:
        def moment(timestamp: float | None) -> datetime | None:
            return datetime.fromtimestamp(timestamp, tz=UTC) if timestamp else None

        return cls(
            **{
                **asdict(progress),
                "filter": RedriveFilterOut(**asdict(progress.filter)),
                "started_at": moment(progress.started_at),
                "finished_at": moment(progress.finished_at),
            }
        )
