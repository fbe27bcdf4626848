"""The review page's pages: open dead letters grouped by cause, finding an order, and one
order's steps, dead letters and history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.admin.redrives import BULK_PER_SECOND
from api.admin.views import redirect, render, timeline, workflow_url
from api.admin.workflow import workflow_view
from api.deps import RedrivesDep, SessionsDep, SettingsDep, TemporalDep, require_admin_login
from api.errors import answers
from api.queries import find_order_ids, open_groups, order_with_steps
from api.schemas import StorableStr
from core.dead_letters import DeadLetterFilter, list_dead_letters
from core.models import DeadLetter, DeadLetterStatus

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin_login)],
)
# The pages answer HTML; their refusals and outages are JSON like the rest of the API.
PAGE_ERRORS = answers(401, 503, html=True)
# Enough rows for one screen of triage; the group counts above them are always complete.
PAGE_ROWS = 500


@dataclass
class Group:
    step: str
    error_type: str
    count: int
    oldest: datetime | None
    letters: list[DeadLetter]
    redriving: bool


@router.get(
    "",
    name="admin_index",
    summary="The review page: open dead letters by cause",
    response_class=HTMLResponse,
    responses=PAGE_ERRORS,
)
async def index(
    request: Request, sessions: SessionsDep, settings: SettingsDep, redrives: RedrivesDep
) -> Response:
    async with sessions() as session:
        counts = await open_groups(session)
        open_rows, open_total = await list_dead_letters(
            session, DeadLetterFilter(status=DeadLetterStatus.OPEN), limit=PAGE_ROWS, offset=0
        )
        retrying, retrying_total = await list_dead_letters(
            session, DeadLetterFilter(status=DeadLetterStatus.RETRYING), limit=50, offset=0
        )
    running = await redrives.running([(g.step, g.error_type) for g in counts])
    groups = {
        (g.step, g.error_type): Group(
            g.step, g.error_type, g.count, g.oldest, [], (g.step, g.error_type) in running
        )
        for g in counts
    }
    for letter in open_rows:
        group = groups.get((letter.step, letter.error_type))
        if group is not None:  # opened between the two queries: next load shows its group
            group.letters.append(letter)
    ordered = sorted(groups.values(), key=lambda g: (-g.count, g.step, g.error_type))
    return render(
        request,
        "admin/index.html",
        {
            "groups": ordered,
            "open_total": open_total,
            "shown": len(open_rows),
            "retrying": retrying,
            "retrying_total": retrying_total,
            "workflow_url": lambda workflow_id: workflow_url(settings, workflow_id),
            "bulk_per_second": BULK_PER_SECOND,
        },
    )


@router.get(
    "/orders",
    name="admin_search",
    summary="Find an order by its ID",
    status_code=303,
    response_class=RedirectResponse,
    responses={
        303: {"description": "To the order's page, or back with a flash message"},
        **answers(401, 503),
    },
)
async def search(
    sessions: SessionsDep,
    q: Annotated[StorableStr, Query(max_length=100)] = "",
) -> Response:
    wanted = q.strip()
    if not wanted:
        return RedirectResponse("/admin", status_code=303)
    # A pasted fragment of an ID is enough when it names exactly one order.
    async with sessions() as session:
        matches = await find_order_ids(session, wanted)
    if len(matches) == 1:
        return RedirectResponse(f"/admin/orders/{quote(matches[0], safe='')}", status_code=303)
    found = "several orders match" if matches else "no order matches"
    return redirect("/admin", "error", f"{found} {wanted!r}; paste the whole order ID")


@router.get(
    "/orders/{order_id}",
    name="admin_order",
    summary="One order's steps and history",
    response_class=HTMLResponse,
    responses={
        404: {"description": "No such order", "content": {"text/html": {}}},
        **PAGE_ERRORS,
    },
)
async def order_page(
    request: Request,
    order_id: Annotated[StorableStr, PathParam(max_length=40)],
    sessions: SessionsDep,
    settings: SettingsDep,
    temporal: TemporalDep,
) -> Response:
    async with sessions() as session:
        found = await order_with_steps(session, order_id)
        if found is None:
            return render(
                request, "admin/missing.html", {"query": order_id, "order_id": order_id}, 404
            )
        order, steps = found
        letters, _ = await list_dead_letters(
            session, DeadLetterFilter(order_id=order_id), limit=PAGE_ROWS, offset=0
        )
    return render(
        request,
        "admin/order.html",
        {
            "query": order_id,
            "order": order,
            "steps": steps,
            "letters": letters,
            "timeline": timeline(order, steps, letters),
            "workflow": await workflow_view(temporal, order.id),
            "workflow_url": lambda workflow_id: workflow_url(settings, workflow_id),
        },
    )
