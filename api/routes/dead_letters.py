"""The dead letters an operator reviews, retries and discards, and the bulk redrives of them. The
operator's and the redrives' refusals become 404, 409 and 504 in `api/errors.py`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response

from api.deps import OperatorDep, SessionsDep, SettingsDep, TemporalDep, require_admin_key
from api.errors import answers
from api.limits import require_json
from api.schemas import (
    MAX_DB_INT,
    DbId,
    DeadLetterCommandAccepted,
    DeadLetterOut,
    DeadLetterPage,
    DiscardIn,
    RedriveIn,
    RedriveOut,
    RedriveStarted,
    StorableStr,
)
from core.dead_letters import DeadLetterFilter, get_dead_letter, list_dead_letters
from core.models import DeadLetterStatus, Step
from core.redrives import (
    REDRIVE_ID,
    RedriveFilter,
    cancel_redrive,
    pause_redrive,
    redrive_progress,
    resume_redrive,
    start_redrive,
)

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
    response_model=RedriveStarted,
    responses={
        202: {
            "headers": {
                "Location": {"description": "the redrive's progress", "schema": {"type": "string"}}
            }
        },
        **answers(400, 413, 415),
    },
    dependencies=[Depends(require_json)],
)
async def retry_many(
    body: RedriveIn, response: Response, settings: SettingsDep, temporal: TemporalDep
) -> RedriveStarted:
    """Start a redrive of every open dead letter that matches (the oldest `limit`), paced at
    `per_second`; it runs as a workflow, its progress is at the Location answered."""
    where = RedriveFilter(
        step=body.step,
        error_type=body.error_type,
        order_ids=sorted({*body.order_ids, *([body.order_id] if body.order_id else [])}),
    )
    redrive_id = await start_redrive(
        temporal,
        settings.TEMPORAL_TASK_QUEUE,
        where,
        per_second=body.per_second,
        limit=body.limit,
    )
    progress_url = f"{router.prefix}/redrives/{redrive_id}"
    response.headers["Location"] = progress_url
    return RedriveStarted.of(redrive_id, progress_url, body, where)


RedriveIdPath = Annotated[str, Path(pattern=REDRIVE_ID.pattern, max_length=60)]
REDRIVE_ANSWERS = answers(404, 409, 504)


@router.get("/redrives/{redrive_id}", response_model=RedriveOut, responses=answers(404, 504))
async def get_redrive(redrive_id: RedriveIdPath, temporal: TemporalDep) -> RedriveOut:
    """A redrive's progress: total, sent, resolved, failed again, skipped."""
    return RedriveOut.of(await redrive_progress(temporal, redrive_id))


@router.post("/redrives/{redrive_id}/pause", response_model=RedriveOut, responses=REDRIVE_ANSWERS)
async def pause(redrive_id: RedriveIdPath, temporal: TemporalDep) -> RedriveOut:
    """No more sends until resumed."""
    return RedriveOut.of(await pause_redrive(temporal, redrive_id))


@router.post("/redrives/{redrive_id}/resume", response_model=RedriveOut, responses=REDRIVE_ANSWERS)
async def resume(redrive_id: RedriveIdPath, temporal: TemporalDep) -> RedriveOut:
    """Sends again, at the redrive's pace."""
    return RedriveOut.of(await resume_redrive(temporal, redrive_id))


@router.post("/redrives/{redrive_id}/cancel", response_model=RedriveOut, responses=REDRIVE_ANSWERS)
async def cancel(redrive_id: RedriveIdPath, temporal: TemporalDep) -> RedriveOut:
    """Stops it for good; the letters not reached stay open."""
    return RedriveOut.of(await cancel_redrive(temporal, redrive_id))


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
