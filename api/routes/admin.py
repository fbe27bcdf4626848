"""The review page for parked orders: server-rendered HTML over the same DeadLetterOperator the
API and the CLI use, so the page can do nothing the API could not.

Access: `require_admin_login` (ADMIN_API_KEYS; Bearer, or HTTP Basic with the key as the password
so a browser shows its login prompt). Because a browser resends Basic credentials on its own, every
POST here must also come from this page's origin (`Origin`, else `Referer`, must name the `Host`
the request was sent to); a form on another site cannot pass that check."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.service import RPCError

from api.deps import SessionsDep, SettingsDep, TemporalDep, require_admin_login
from api.errors import answers
from api.schemas import DbId, StorableStr
from core import dead_letters
from core.contracts import OrderWorkflowStatus
from core.dead_letters import (
    CommandRejected,
    CommandUnconfirmed,
    DeadLetterFilter,
    DeadLetterNotFound,
    DeadLetterOperator,
    list_dead_letters,
)
from core.models import DeadLetter, DeadLetterStatus, Order, OrderStep
from core.settings import Settings

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=PACKAGE_DIR / "templates")
STATIC_MOUNT = "/admin/static"

# Enough rows for one screen of triage; the group counts above them are always complete.
PAGE_ROWS = 500
# A bulk redrive from the page: a recovered receiver sees at most this many redriven orders a
# second (each redrive is two side effects at most), and one click moves at most BULK_LIMIT.
BULK_PER_SECOND = 5.0
BULK_LIMIT = 1000
QUERY_TIMEOUT = timedelta(seconds=3)
FLASH_COOKIE = "orderflow_flash"
FLASH_LEVELS = ("ok", "error")


def static_files() -> StaticFiles:
    """The page's CSS, served by the app itself (no CDN), mounted at STATIC_MOUNT."""
    return StaticFiles(directory=PACKAGE_DIR / "static")


async def require_same_origin(request: Request) -> None:
    """Refuses a POST that another site's page made the browser send."""
    source = request.headers.get("origin") or request.headers.get("referer")
    host = request.headers.get("host")
    if not source or not host or urlsplit(source).netloc != host:
        raise HTTPException(403, "cross-origin form post refused: submit it from the admin page")


router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin_login)],
)
# The pages answer HTML; their refusals and outages are JSON like the rest of the API.
PAGE_ERRORS = answers(401, 503, html=True)
SameOrigin = [Depends(require_same_origin)]
DeadLetterId = Annotated[DbId, PathParam()]
# Every action answers with a redirect back to a page, which shows the outcome as a flash.
BACK_TO_PAGE: dict[int | str, dict[str, Any]] = {
    303: {"description": "Back to the page, which shows the outcome"},
    **answers(400, 401, 403, 413, 503),
}


# --- presentation helpers -------------------------------------------------------------------


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return ""
    seconds = int((datetime.now(UTC) - moment).total_seconds())
    if seconds < 60:
        return "just now" if seconds < 5 else f"{seconds} s ago"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return ""


def _utc(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


def _masked_email(address: str) -> str:
    # The page identifies the customer without putting a full address on an operator's screen.
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+)")


def _mask_emails(text: str) -> str:
    # A downstream's error often quotes the recipient; it is masked like the order's address.
    return EMAIL.sub(r"\1***@\2", text)


def _money(cents: int, currency: str) -> str:
    return f"{cents / 100:.2f} {currency}"


templates.env.filters.update(
    ago=_ago, utc=_utc, masked_email=_masked_email, mask_emails=_mask_emails
)
templates.env.globals.update(money=_money)


def workflow_url(settings: Settings, workflow_id: str) -> str:
    """The workflow's page in the Temporal Web UI."""
    base = settings.TEMPORAL_UI_URL.rstrip("/")
    namespace = quote(settings.TEMPORAL_NAMESPACE, safe="")
    return f"{base}/namespaces/{namespace}/workflows/{quote(workflow_id, safe='')}"


@dataclass(frozen=True)
class Flash:
    level: str
    message: str


def _take_flash(request: Request) -> Flash | None:
    level, _, message = unquote(request.cookies.get(FLASH_COOKIE, "")).partition(":")
    return Flash(level, message) if level in FLASH_LEVELS and message else None


def _render(
    request: Request, template: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    flash = _take_flash(request)
    response = templates.TemplateResponse(
        request,
        template,
        {"flash": flash, "query": "", **context},
        status_code=status_code,
        headers={"Cache-Control": "no-store"},
    )
    if flash is not None:
        response.delete_cookie(FLASH_COOKIE, path="/admin")
    return response


def _back(target: str | None) -> str:
    # Only back to a page of this app: a crafted form must not turn this into an open redirect.
    if target and target.startswith("/admin") and not target.startswith("//"):
        return target
    return "/admin"


def _redirect(target: str | None, level: str, message: str) -> RedirectResponse:
    response = RedirectResponse(_back(target), status_code=303)
    response.set_cookie(
        FLASH_COOKIE,
        quote(f"{level}:{message[:500]}"),
        max_age=60,
        path="/admin",
        httponly=True,
        samesite="strict",
    )
    return response


def _actor(request: Request) -> str:
    """Who discarded: the Basic user name the operator typed, if any."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            user = base64.b64decode(value.strip(), validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            user = ""
        if user.strip():
            return f"admin page ({user.strip()[:100]})"
    return "admin page"


# --- bulk redrives ----------------------------------------------------------------------------


class Redrives:
    """Bulk retries started from the page run in the background of this API process, paced by
    DeadLetterOperator.retry_matching, so the browser gets its answer at once. One per group at a
    time; a second click while one runs is refused instead of doubling the pace."""

    def __init__(self) -> None:
        self._running: dict[tuple[str, str], asyncio.Task[Any]] = {}

    def running(self) -> set[tuple[str, str]]:
        return {key for key, task in self._running.items() if not task.done()}

    def start(self, key: tuple[str, str], work: Coroutine[Any, Any, Any]) -> bool:
        if key in self.running():
            work.close()
            return False
        task = asyncio.create_task(work, name=f"admin bulk retry {key}")
        self._running[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))
        return True

    def _finished(self, key: tuple[str, str], task: asyncio.Task[Any]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("bulk retry of %s failed", key, exc_info=task.exception())


def _redrives(request: Request) -> Redrives:
    state = request.app.state
    if not hasattr(state, "admin_redrives"):
        state.admin_redrives = Redrives()
    redrives: Redrives = state.admin_redrives
    return redrives


# --- pages ------------------------------------------------------------------------------------


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
async def index(request: Request, sessions: SessionsDep, settings: SettingsDep) -> Response:
    async with sessions() as session:
        counts = (
            await session.execute(
                select(
                    DeadLetter.step,
                    DeadLetter.error_type,
                    func.count(),
                    func.min(DeadLetter.created_at),
                )
                .where(DeadLetter.status == DeadLetterStatus.OPEN)
                .group_by(DeadLetter.step, DeadLetter.error_type)
            )
        ).all()
        open_rows, open_total = await list_dead_letters(
            session, DeadLetterFilter(status=DeadLetterStatus.OPEN), limit=PAGE_ROWS, offset=0
        )
        retrying, retrying_total = await list_dead_letters(
            session, DeadLetterFilter(status=DeadLetterStatus.RETRYING), limit=50, offset=0
        )
    running = _redrives(request).running()
    groups = {
        (step, error_type): Group(
            step, error_type, count, oldest, [], (step, error_type) in running
        )
        for step, error_type, count, oldest in counts
    }
    for letter in open_rows:
        group = groups.get((letter.step, letter.error_type))
        if group is not None:  # opened between the two queries: next load shows its group
            group.letters.append(letter)
    ordered = sorted(groups.values(), key=lambda g: (-g.count, g.step, g.error_type))
    return _render(
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
    request: Request,
    sessions: SessionsDep,
    q: Annotated[StorableStr, Query(max_length=100)] = "",
) -> Response:
    wanted = q.strip()
    if not wanted:
        return RedirectResponse("/admin", status_code=303)
    async with sessions() as session:
        if await session.get(Order, wanted) is not None:
            return RedirectResponse(f"/admin/orders/{quote(wanted, safe='')}", status_code=303)
        # A pasted fragment of an ID is enough when it names exactly one order.
        fragment = wanted.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        matches = (
            await session.scalars(
                select(Order.id).where(Order.id.like(f"%{fragment}%", escape="\\")).limit(2)
            )
        ).all()
    if len(matches) == 1:
        return RedirectResponse(f"/admin/orders/{quote(matches[0], safe='')}", status_code=303)
    found = "several orders match" if matches else "no order matches"
    return _redirect("/admin", "error", f"{found} {wanted!r}; paste the whole order ID")


@dataclass(frozen=True)
class Event:
    at: datetime
    kind: str  # the CSS class of the dot: ok, bad, warn, info
    title: str
    detail: str = ""


def _timeline(
    order: Order, steps: Sequence[OrderStep], letters: Sequence[DeadLetter]
) -> list[Event]:
    events = [Event(order.created_at, "info", "Order accepted", "card charged; workflow started")]
    for letter in letters:
        events.append(
            Event(
                letter.created_at,
                "bad",
                f"{letter.step} parked (occurrence {letter.occurrence})",
                _mask_emails(
                    f"after {letter.attempts} attempt(s): {letter.error_type}: "
                    f"{letter.error_message}"
                ),
            )
        )
        if letter.status == DeadLetterStatus.RETRYING:
            events.append(Event(letter.updated_at, "warn", f"{letter.step} retry requested"))
        elif letter.status == DeadLetterStatus.DISCARDED and letter.resolved_at:
            events.append(
                Event(
                    letter.resolved_at,
                    "warn",
                    f"{letter.step} discarded by {letter.discarded_by or 'an operator'}",
                    letter.discard_reason or "",
                )
            )
        elif letter.status == DeadLetterStatus.RESOLVED and letter.resolved_at:
            again = letter.resolution == "failed_again"
            events.append(
                Event(
                    letter.resolved_at,
                    "warn" if again else "ok",
                    f"{letter.step} occurrence {letter.occurrence} "
                    + ("failed again" if again else "resolved by its retry"),
                )
            )
    for step in steps:
        if step.succeeded_at is not None:
            outcome = json.dumps(step.outcome, sort_keys=True) if step.outcome else ""
            events.append(
                Event(
                    step.succeeded_at,
                    "ok",
                    f"{step.step} succeeded ({step.attempts} attempt(s) in all)",
                    outcome,
                )
            )
    if order.cancelled_at is not None:
        events.append(Event(order.cancelled_at, "warn", "Order cancelled"))
    return sorted(events, key=lambda event: event.at)


@dataclass(frozen=True)
class WorkflowView:
    status: OrderWorkflowStatus | None
    run_status: str | None
    problem: str | None


async def _workflow_view(client: Client, workflow_id: str) -> WorkflowView:
    handle = client.get_workflow_handle(workflow_id)

    async def describe() -> WorkflowExecutionDescription:
        return await handle.describe(rpc_timeout=QUERY_TIMEOUT)

    async def query() -> OrderWorkflowStatus:
        status: OrderWorkflowStatus = await handle.query(
            "status", result_type=OrderWorkflowStatus, rpc_timeout=QUERY_TIMEOUT
        )
        return status

    limit = QUERY_TIMEOUT.total_seconds() + 2
    described, queried = await asyncio.gather(
        asyncio.wait_for(describe(), limit),
        asyncio.wait_for(query(), limit),
        return_exceptions=True,
    )
    run_status = None
    if isinstance(described, WorkflowExecutionDescription) and described.status is not None:
        run_status = described.status.name.lower()
    if isinstance(queried, OrderWorkflowStatus):
        return WorkflowView(queried, run_status, None)
    expected = (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError, TimeoutError)
    if isinstance(queried, expected):
        problem = str(queried) or type(queried).__name__
        return WorkflowView(None, run_status, f"status query unavailable: {problem}")
    raise queried


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
        order = await session.get(Order, order_id)
        if order is None:
            return _render(
                request, "admin/missing.html", {"query": order_id, "order_id": order_id}, 404
            )
        steps = (
            await session.scalars(
                select(OrderStep).where(OrderStep.order_id == order_id).order_by(OrderStep.step)
            )
        ).all()
        letters, _ = await list_dead_letters(
            session, DeadLetterFilter(order_id=order_id), limit=PAGE_ROWS, offset=0
        )
    return _render(
        request,
        "admin/order.html",
        {
            "query": order_id,
            "order": order,
            "steps": steps,
            "letters": letters,
            "timeline": _timeline(order, steps, letters),
            "workflow": await _workflow_view(temporal, order.id),
            "workflow_url": lambda workflow_id: workflow_url(settings, workflow_id),
        },
    )


# --- actions ----------------------------------------------------------------------------------


def _unconfirmed(action: str, dead_letter_id: int) -> str:
    return (
        f"{action} of dead letter {dead_letter_id} not confirmed within "
        f"{dead_letters.COMMAND_TIMEOUT_SECONDS:g} s: is a worker running? The workflow may "
        "still take it when one is back; reload to check before trying again."
    )


@router.post(
    "/dead-letters/{dead_letter_id}/retry",
    name="admin_retry",
    dependencies=SameOrigin,
    status_code=303,
    response_class=RedirectResponse,
    responses=BACK_TO_PAGE,
)
async def retry(
    dead_letter_id: DeadLetterId,
    sessions: SessionsDep,
    temporal: TemporalDep,
    back: Annotated[StorableStr, Form()] = "/admin",
) -> Response:
    try:
        letter = await DeadLetterOperator(sessions, temporal).retry(dead_letter_id)
    except (DeadLetterNotFound, CommandRejected) as refused:
        return _redirect(back, "error", f"Retry refused: {refused}")
    except CommandUnconfirmed:
        return _redirect(back, "error", _unconfirmed("Retry", dead_letter_id))
    return _redirect(
        back,
        "ok",
        f"Retrying {letter.step} of order {letter.order_id} (dead letter {letter.id}); "
        "it resolves when the step succeeds.",
    )


@router.post(
    "/dead-letters/{dead_letter_id}/discard",
    name="admin_discard",
    dependencies=SameOrigin,
    status_code=303,
    response_class=RedirectResponse,
    responses=BACK_TO_PAGE,
)
async def discard(
    request: Request,
    dead_letter_id: DeadLetterId,
    sessions: SessionsDep,
    temporal: TemporalDep,
    reason: Annotated[StorableStr, Form(max_length=2000)] = "",
    back: Annotated[StorableStr, Form()] = "/admin",
) -> Response:
    if not reason.strip():
        return _redirect(back, "error", "Discard needs a reason: say why this step is given up")
    try:
        letter = await DeadLetterOperator(sessions, temporal).discard(
            dead_letter_id, reason.strip(), _actor(request)
        )
    except (DeadLetterNotFound, CommandRejected) as refused:
        return _redirect(back, "error", f"Discard refused: {refused}")
    except CommandUnconfirmed:
        return _redirect(back, "error", _unconfirmed("Discard", dead_letter_id))
    return _redirect(
        back, "ok", f"Discarded {letter.step} of order {letter.order_id} (dead letter {letter.id})."
    )


@router.post(
    "/dead-letters/retry",
    name="admin_bulk_retry",
    dependencies=SameOrigin,
    status_code=303,
    response_class=RedirectResponse,
    responses=BACK_TO_PAGE,
)
async def bulk_retry(
    request: Request,
    sessions: SessionsDep,
    temporal: TemporalDep,
    step: Annotated[StorableStr, Form(max_length=40)],
    error_type: Annotated[StorableStr, Form(max_length=200)],
    back: Annotated[StorableStr, Form()] = "/admin",
) -> Response:
    where = DeadLetterFilter(status=DeadLetterStatus.OPEN, step=step, error_type=error_type)
    async with sessions() as session:
        _, matching = await list_dead_letters(session, where, limit=1, offset=0)
    if not matching:
        return _redirect(back, "error", f"No open dead letters for {step} / {error_type}.")
    operator = DeadLetterOperator(sessions, temporal)
    work = operator.retry_matching(where, per_second=BULK_PER_SECOND, limit=BULK_LIMIT)
    if not _redrives(request).start((step, error_type), work):
        return _redirect(back, "error", f"A retry of all {step} / {error_type} is already running.")
    return _redirect(
        back,
        "ok",
        f"Retrying {min(matching, BULK_LIMIT)} dead letter(s) for {step} / {error_type} at "
        f"{BULK_PER_SECOND:g} per second; reload to follow.",
    )
