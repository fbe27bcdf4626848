"""How the review page looks: its templates and their filters, its static files, the flash
message an action leaves for the next page, and the order's timeline."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from core.models import DeadLetter, DeadLetterStatus, Order, OrderStep
from core.money import format_money
from core.settings import Settings

PACKAGE_DIR = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=PACKAGE_DIR / "templates")
STATIC_MOUNT = "/admin/static"
FLASH_COOKIE = "orderflow_flash"
FLASH_LEVELS = ("ok", "error")


def static_files() -> StaticFiles:
    """The page's CSS, served by the app itself (no CDN), mounted at STATIC_MOUNT."""
    return StaticFiles(directory=PACKAGE_DIR / "static")


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


def mask_emails(text: str) -> str:
    # A downstream's error often quotes the recipient; it is masked like the order's address.
    return EMAIL.sub(r"\1***@\2", text)


templates.env.filters.update(
    ago=_ago, utc=_utc, masked_email=_masked_email, mask_emails=mask_emails
)
templates.env.globals.update(money=format_money)


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


def render(
    request: Request, template: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    """The page, showing (and clearing) the flash the last action left."""
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


def redirect(target: str | None, level: str, message: str) -> RedirectResponse:
    """Back to a page of the review page, which then shows `message` as a flash."""
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


@dataclass(frozen=True)
class Event:
    at: datetime
    kind: str  # the CSS class of the dot: ok, bad, warn, info
    title: str
    detail: str = ""


def timeline(
    order: Order, steps: Sequence[OrderStep], letters: Sequence[DeadLetter]
) -> list[Event]:
    """The order's history, oldest first, from its row, its steps and its dead letters."""
    events = [Event(order.created_at, "info", "Order accepted", "card charged; workflow started")]
    for letter in letters:
        events.append(
            Event(
                letter.created_at,
                "bad",
                f"{letter.step} parked (occurrence {letter.occurrence})",
                mask_emails(
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
