"""The review page's checks beyond the login (`require_admin_login` in `api/deps.py`): a POST
must come from the page's own origin, and a discard records who made it.

A browser resends Basic credentials on its own, so every POST here must also come from this
page's origin (`Origin`, else `Referer`, must name the `Host` the request was sent to); a form
on another site cannot pass that check."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request

from api.deps import basic_credentials


async def require_same_origin(request: Request) -> None:
    """Refuses a POST that another site's page made the browser send."""
    source = request.headers.get("origin") or request.headers.get("referer")
    host = request.headers.get("host")
    if not source or not host or urlsplit(source).netloc != host:
        raise HTTPException(403, "cross-origin form post refused: submit it from the admin page")


SameOrigin = [Depends(require_same_origin)]


def actor(request: Request) -> str:
    """Who discarded: the Basic user name the operator typed, if any."""
    credentials = basic_credentials(request.headers.get("authorization"))
    user = credentials[0].strip() if credentials else ""
    return f"admin page ({user[:100]})" if user else "admin page"
