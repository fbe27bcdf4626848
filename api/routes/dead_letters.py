"""The dead letters an operator reviews, retries and discards. The operator's refusals become
404, 409 and 504 in `api/errors.py`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from api.deps import OperatorDep, SessionsDep, require_admin_key
from api.errors import answers
from api.limits import require_json
from api.schemas import (
    MAX_DB_INT,
    BulkRetryAccepted,
    BulkRetryIn,
    DbId,
    DeadLetterCommandAccepted,
    DeadLetterOut,
    DeadLetterPage,
    DiscardIn,
    StorableStr,
)
from core.dead_letters import DeadLetterFilter, get_dead_letter, list_dead_letters
from core.models import DeadLetterStatus, Step

router = APIRouter(
    prefix="/dead-letters",
    tags=["dead-letters"],
    dependencies=[Depends(require_admin_key)],
    responses=answers(401, 503),
)

StatusFilter = Annotated[DeadLetterStatus | None, Query()]
StepFilter = Annotated[Step | None, Query()]
DeadLetterId = Annotated[DbId, Path()]


@router.get("", response_model=DeadLetterPage)
async def list_letters(
    sessions: SessionsDep,
    status: StatusFilter = None,
    step: StepFilter = None,
    order_id: Annotated[StorableStr | None, Query(max_length=40)] = None,
    error_type: Annotated[StorableStr | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_DB_INT)] = 0,
) -> DeadLetterPage:
    """Dead letters, filtered by status, step, order and error type, oldest first; `total`
    counts every match so a client can page with `limit` and `offset`."""
    where = DeadLetterFilter(status=status, step=step, order_id=order_id, error_type=error_type)
    async with sessions() as session:
        rows, total = await list_dead_letters(session, where, limit=limit, offset=offset)
    return DeadLetterPage(
        items=[DeadLetterOut.model_validate(row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.post(
    "/retry",
    status_code=202,
    response_model=BulkRetryAccepted,
    responses=answers(400, 413, 415),
    dependencies=[Depends(require_json)],
)
async def retry_many(body: BulkRetryIn, operator: OperatorDep) -> BulkRetryAccepted:
    """Retry every open dead letter that matches, paced at `per_second`."""
    outcome = await operator.retry_matching(
        DeadLetterFilter(step=body.step, error_type=body.error_type, order_id=body.order_id),
        per_second=body.per_second,
        limit=body.limit,
    )
    return BulkRetryAccepted(
        retried=outcome.retried,
        rejected=outcome.rejected,
        elapsed_seconds=round(outcome.elapsed_seconds, 3),
    )


@router.get("/{dead_letter_id}", response_model=DeadLetterOut, responses=answers(404))
async def get_letter(dead_letter_id: DeadLetterId, sessions: SessionsDep) -> DeadLetterOut:
    """One dead letter."""
    async with sessions() as session:
        return DeadLetterOut.model_validate(await get_dead_letter(session, dead_letter_id))


@router.post(
    "/{dead_letter_id}/retry",
    status_code=202,
    response_model=DeadLetterCommandAccepted,
    responses=answers(404, 409, 504),
)
async def retry_letter(
    dead_letter_id: DeadLetterId, operator: OperatorDep
) -> DeadLetterCommandAccepted:
    """Run the parked step again with a fresh retry budget."""
    return DeadLetterCommandAccepted.of(await operator.retry(dead_letter_id))


@router.post(
    "/{dead_letter_id}/discard",
    response_model=DeadLetterCommandAccepted,
    responses=answers(400, 404, 409, 413, 415, 504),
    dependencies=[Depends(require_json)],
)
async def discard_letter(
    dead_letter_id: DeadLetterId, body: DiscardIn, operator: OperatorDep
) -> DeadLetterCommandAccepted:
    """Give up on the parked step, recording who and why."""
    letter = await operator.discard(dead_letter_id, body.reason, body.actor)
    return DeadLetterCommandAccepted.of(letter)
