"""The API's dependencies, as `Annotated` aliases; tests swap them with dependency overrides."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Sequence
from typing import Annotated, cast

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.datastructures import Headers
from temporalio.client import Client

from api.admin.redrives import PageRedrives
from api.dispatcher import WorkflowDispatcher
from api.intake import OrderIntake
from core.dead_letters import DeadLetterOperator
from core.settings import Settings


def app_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


# The getters are `async def` although they never await: FastAPI runs a plain `def` dependency
# in its thread pool, a round trip to a worker thread per dependency per request.
async def get_settings(request: Request) -> Settings:
    return app_settings(request)


async def get_sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    return cast(async_sessionmaker[AsyncSession], request.app.state.sessions)


async def get_temporal(request: Request) -> Client:
    return cast(Client, request.app.state.temporal)


async def get_intake(request: Request) -> OrderIntake:
    return cast(OrderIntake, request.app.state.intake)


async def get_dispatcher(request: Request) -> WorkflowDispatcher:
    return cast(WorkflowDispatcher, request.app.state.dispatcher)


async def get_redrives(request: Request) -> PageRedrives:
    return cast(PageRedrives, request.app.state.redrives)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessions)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
IntakeDep = Annotated[OrderIntake, Depends(get_intake)]
DispatcherDep = Annotated[WorkflowDispatcher, Depends(get_dispatcher)]
RedrivesDep = Annotated[PageRedrives, Depends(get_redrives)]


async def get_operator(sessions: SessionsDep, temporal: TemporalDep) -> DeadLetterOperator:
    # Built from the other dependencies, so an override of the sessions or client reaches it.
    return DeadLetterOperator(sessions, temporal)


OperatorDep = Annotated[DeadLetterOperator, Depends(get_operator)]


# Documents the schemes in OpenAPI (the "Authorize" button on /docs); the checks below read the
# Authorization header themselves so the admin guard can also take Basic from a browser.
_api_scheme = HTTPBearer(auto_error=False, scheme_name="ApiKey", description="API_KEYS")
_admin_scheme = HTTPBearer(
    auto_error=False, scheme_name="AdminApiKey", description="ADMIN_API_KEYS"
)
_Credentials = HTTPAuthorizationCredentials | None


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """The user name and password of an `Authorization: Basic ...` header, if it is one."""
    scheme, _, value = (authorization or "").partition(" ")
    value = value.strip()
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    return user, password


def _presented_key(authorization: str | None, *, allow_basic: bool) -> str | None:
    scheme, _, value = (authorization or "").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    credentials = basic_credentials(authorization) if allow_basic else None
    if credentials is not None:
        # Any user name; the password is the key, so a browser's login prompt works.
        return credentials[1] or None
    return None


def key_matches(presented: str, keys: Sequence[SecretStr]) -> bool:
    """Constant-time against every configured key, so timing reveals neither key nor position."""
    candidate = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.get_secret_value().encode())
    return matched


def _guard(request: Request, keys: Sequence[SecretStr], *, admin: bool) -> None:
    if not keys:  # dev mode: no keys configured (the lifespan warned; production refuses)
        return
    presented = _presented_key(request.headers.get("Authorization"), allow_basic=admin)
    if presented is not None and key_matches(presented, keys):
        return
    challenges = [(b"www-authenticate", b'Bearer realm="orderflow"')]
    if admin:
        challenges.append((b"www-authenticate", b'Basic realm="orderflow admin", charset="UTF-8"'))
    raise HTTPException(
        401,
        "missing or invalid API key: send Authorization: Bearer <key>",
        headers=Headers(raw=challenges),
    )


async def require_api_key(
    request: Request, _: Annotated[_Credentials, Security(_api_scheme)]
) -> None:
    """Guards the order endpoints with API_KEYS."""
    _guard(request, app_settings(request).API_KEYS, admin=False)


async def require_admin_key(
    request: Request, _: Annotated[_Credentials, Security(_admin_scheme)]
) -> None:
    """Guards the operator's JSON endpoints (dead letters) with ADMIN_API_KEYS, Bearer only: a
    browser resends Basic credentials by itself, so accepting them here would let any other site's
    form redrive or discard dead letters (the /admin pages, which take Basic, check the origin)."""
    _guard(request, app_settings(request).ADMIN_API_KEYS, admin=False)


async def require_admin_login(
    request: Request, _: Annotated[_Credentials, Security(_admin_scheme)]
) -> None:
    """Guards the /admin pages with ADMIN_API_KEYS; takes Bearer, or Basic with the key as the
    password so a browser shows a login prompt. Its POSTs must also pass the same-origin check."""
    _guard(request, app_settings(request).ADMIN_API_KEYS, admin=True)


# For a route parameter (`_: RequireAdminKey`) or, as `Depends(require_admin_key)`, a router's
# `dependencies=[...]`.
RequireApiKey = Annotated[None, Depends(require_api_key)]
RequireAdminKey = Annotated[None, Depends(require_admin_key)]
RequireAdminLogin = Annotated[None, Depends(require_admin_login)]


def check_api_keys(settings: Settings, log: logging.Logger) -> None:
    """Refuses to serve in production without keys (Settings already demands the webhook secret
    there); in dev, says loudly that the API is open. The worker needs no API keys, so this check
    belongs to the API rather than to Settings."""
    missing = [name for name in ("API_KEYS", "ADMIN_API_KEYS") if not getattr(settings, name)]
    if missing and settings.ORDERFLOW_ENV == "production":
        raise RuntimeError(
            f"ORDERFLOW_ENV=production requires {' and '.join(missing)}; refusing to start"
        )
    for name in missing:
        log.warning(
            "%s is not set: its endpoints accept requests from anyone (dev mode only)", name
        )
