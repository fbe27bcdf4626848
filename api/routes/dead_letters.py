"""The dead letters an operator reviews, retries and discards, and the bulk redrives of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from temporalio.client import Client

from api.deps import SessionsDep, SettingsDep, TemporalDep, require_admin_key
from api.errors import answers
from api.limits import require_json
from api.schemas import (
    MAX_DB_INT,
    DbId,
    DeadLetterCommandAccepted,
    DeadLetterOut,
    DeadLetterPage,
    DiscardIn,
    RedriveFilterOut,
    RedriveIn,
    RedriveOut,
    RedriveStarted,
    StorableStr,
)
from core.dead_letters import (
    CommandRejected,
    CommandUnconfirmed,
    DeadLetterFilter,
    DeadLetterNotFound,
    DeadLetterOperator,
    get_dead_letter,
    list_dead_letters,
)
from core.models import DeadLetter, DeadLetterStatus, Step
from core.redrives import (
    REDRIVE_ID,
    RedriveFilter,
    RedriveNotFound,
    RedriveProgress,
    RedriveRefused,
    RedriveUnconfirmed,
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


def _accepted(letter: DeadLetter) -> DeadLetterCommandAccepted:
    return DeadLetterCommandAccepted(
        dead_letter_id=letter.id, order_id=letter.order_id, step=letter.step, status=letter.status
    )


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
    return RedriveStarted(
        redrive_id=redrive_id,
        progress_url=progress_url,
        per_second=body.per_second,
        limit=body.limit,
        filter=RedriveFilterOut(**asdict(where)),
    )


RedriveIdPath = Annotated[str, Path(pattern=REDRIVE_ID.pattern, max_length=60)]
REDRIVE_ANSWERS = answers(404, 409, 504)


async def _redrive_answer(
    command: Callable[[Client, str], Awaitable[RedriveProgress]], temporal: Client, redrive_id: str
) -> RedriveOut:
    try:
        progress = await command(temporal, redrive_id)
    except RedriveNotFound as missing:
        raise HTTPException(404, str(missing)) from missing
    except RedriveRefused as refused:
        raise HTTPException(409, str(refused)) from refused
    except RedriveUnconfirmed as unconfirmed:
        raise HTTPException(504, str(unconfirmed)) from unconfirmed
    moment = partial(datetime.fromtimestamp, tz=UTC)
    return RedriveOut(
        **{
            **asdict(progress),
            "filter": RedriveFilterOut(**asdict(progress.filter)),
            "started_at": moment(progress.started_at) if progress.started_at else None,
            "finished_at": moment(progress.finished_at) if progress.finished_at else None,
        }
    )


@router.get("/redrives/{redrive_id}", response_model=RedriveOut, responses=answers(404, 504))
async def get_redrive(redrive_id: RedriveIdPath, temporal: TemporalDep) -> RedriveOut:
    """A redrive's progress: total, sent, resolved, failed again, skipped."""
    return await _redrive_answer(redrive_progress, temporal, redrive_id)


@router.post("/redrives/{redrive_id}/pause", response_model=RedriveOut, responses=REDRIVE_ANSWERS)
async def pause(redrive_id: RedriveIdPath, temporal: TemporalDep) -> RedriveOut:
    """No more sends until resumed."""
    return await _redrive_answer(pause_redrive, temporal, redrive_id)


@router.post("/redrives/{redrive_id}/resume", response_model=RedriveOut, responses=REDRIVE_ANSWERS)
async def resume(redrive_id: RedriveIdPath, temporal: TemporalDep) -> RedriveOut:
    """Sends again, at the redrive's pace."""
    return await _redrive_answer(resume_redrive, temporal, redrive_id)


@router.post("/redrives/{redrive_id}/cancel", response_model=RedriveOut, responses=REDRIVE_ANSWERS)
async def cancel(redrive_id: RedriveIdPath, temporal: TemporalDep) -> RedriveOut:
    """Stops it for good; the letters not reached stay open."""
    return await _redrive_answer(cancel_redrive, temporal, redrive_id)


@router.get("/{dead_letter_id}", response_model=DeadLetterOut, responses=answers(404))
async def get_letter(dead_letter_id: DeadLetterId, sessions: SessionsDep) -> DeadLetterOut:
    """One dead letter."""
    try:
        async with sessions() as session:
            return DeadLetterOut.model_validate(await get_dead_letter(session, dead_letter_id))
    except DeadLetterNotFound as missing:
        raise HTTPException(404, str(missing)) from missing


@router.post(
    "/{dead_letter_id}/retry",
    status_code=202,
    response_model=DeadLetterCommandAccepted,
    responses=answers(404, 409, 504),
)
async def retry_letter(
    dead_letter_id: DeadLetterId, sessions: SessionsDep, temporal: TemporalDep
) -> DeadLetterCommandAccepted:
    """Run the parked step again with a fresh retry budget."""
    try:
        letter = await DeadLetterOperator(sessions, temporal).retry(dead_letter_id)
    except DeadLetterNotFound as missing:
        raise HTTPException(404, str(missing)) from missing
    except CommandRejected as rejected:
        raise HTTPException(409, str(rejected)) from rejected
    except CommandUnconfirmed as unconfirmed:
        raise HTTPException(504, str(unconfirmed)) from unconfirmed
    return _accepted(letter)


@router.post(
    "/{dead_letter_id}/discard",
    response_model=DeadLetterCommandAccepted,
    responses=answers(400, 404, 409, 413, 415, 504),
    dependencies=[Depends(require_json)],
)
async def discard_letter(
    dead_letter_id: DeadLetterId, body: DiscardIn, sessions: SessionsDep, temporal: TemporalDep
) -> DeadLetterCommandAccepted:
    """Give up on the parked step, recording who and why."""
    try:
        letter = await DeadLetterOperator(sessions, temporal).discard(
            dead_letter_id, body.reason, body.actor
        )
    except DeadLetterNotFound as missing:
        raise HTTPException(404, str(missing)) from missing
    except CommandRejected as rejected:
        raise HTTPException(409, str(rejected)) from rejected
    except CommandUnconfirmed as unconfirmed:
        raise HTTPException(504, str(unconfirmed)) from unconfirmed
    return _accepted(letter)
