"""The review page's actions: retry or discard one dead letter, retry a whole group. Each answers
with a redirect back to the page, whose flash message says how it went; a refusal is a flash,
not an error page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi import Path as PathParam
from fastapi.responses import RedirectResponse, Response
from fastapi.types import DecoratedCallable

from api.admin.guards import SameOrigin, actor
from api.admin.redrives import BULK_LIMIT, BULK_PER_SECOND
from api.admin.views import redirect
from api.deps import OperatorDep, RedrivesDep, SessionsDep, require_admin_login
from api.errors import answers
from api.schemas import DbId, StorableStr
from core.dead_letters import (
    CommandRejected,
    CommandUnconfirmed,
    DeadLetterFilter,
    DeadLetterNotFound,
    list_dead_letters,
)
from core.models import DeadLetterStatus

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin_login)],
)
DeadLetterId = Annotated[DbId, PathParam()]
BackTo = Annotated[StorableStr, Form()]
BACK_TO_PAGE: dict[int | str, dict[str, Any]] = {
    303: {"description": "Back to the page, which shows the outcome"},
    **answers(400, 401, 403, 413, 503),
}


def _action(path: str, *, name: str) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """A form's POST: from the page's own origin only, answered by a redirect back to a page."""
    return router.post(
        path,
        name=name,
        dependencies=SameOrigin,
        status_code=303,
        response_class=RedirectResponse,
        responses=BACK_TO_PAGE,
    )


# What the operator can refuse a command with; the JSON API answers them with 404, 409 and 504.
REFUSALS = (DeadLetterNotFound, CommandRejected, CommandUnconfirmed)


def _refused(back: str, action: str, refusal: Exception) -> Response:
    if isinstance(refusal, CommandUnconfirmed):
        return redirect(back, "error", str(refusal))  # it names the action itself
    return redirect(back, "error", f"{action} refused: {refusal}")


@_action("/dead-letters/{dead_letter_id}/retry", name="admin_retry")
async def retry(
    dead_letter_id: DeadLetterId, operator: OperatorDep, back: BackTo = "/admin"
) -> Response:
    try:
        letter = await operator.retry(dead_letter_id)
    except REFUSALS as refusal:
        return _refused(back, "Retry", refusal)
    return redirect(
        back,
        "ok",
        f"Retrying {letter.step} of order {letter.order_id} (dead letter {letter.id}); "
        "it resolves when the step succeeds.",
    )


@_action("/dead-letters/{dead_letter_id}/discard", name="admin_discard")
async def discard(
    request: Request,
    dead_letter_id: DeadLetterId,
    operator: OperatorDep,
    reason: Annotated[StorableStr, Form(max_length=2000)] = "",
    back: BackTo = "/admin",
) -> Response:
    if not reason.strip():
        return redirect(back, "error", "Discard needs a reason: say why this step is given up")
    try:
        letter = await operator.discard(dead_letter_id, reason.strip(), actor(request))
    except REFUSALS as refusal:
        return _refused(back, "Discard", refusal)
    return redirect(
        back, "ok", f"Discarded {letter.step} of order {letter.order_id} (dead letter {letter.id})."
    )


@_action("/dead-letters/retry", name="admin_bulk_retry")
async def bulk_retry(
    sessions: SessionsDep,
    redrives: RedrivesDep,
    step: Annotated[StorableStr, Form(max_length=40)],
    error_type: Annotated[StorableStr, Form(max_length=200)],
    back: BackTo = "/admin",
) -> Response:
    where = DeadLetterFilter(status=DeadLetterStatus.OPEN, step=step, error_type=error_type)
    async with sessions() as session:
        _, matching = await list_dead_letters(session, where, limit=1, offset=0)
    if not matching:
        return redirect(back, "error", f"No open dead letters for {step} / {error_type}.")
    if await redrives.start(step, error_type) is None:
        return redirect(back, "error", f"A retry of all {step} / {error_type} is already running.")
    return redirect(
        back,
        "ok",
        f"Retrying {min(matching, BULK_LIMIT)} dead letter(s) for {step} / {error_type} at "
        f"{BULK_PER_SECOND:g} per second; reload to follow.",
    )
