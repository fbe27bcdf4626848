"""The API's dependencies, as `Annotated` aliases; tests swap them with dependency overrides."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from api.dispatcher import WorkflowDispatcher
from api.intake import OrderIntake
from core.settings import Settings


def get_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


def get_sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    return cast(async_sessionmaker[AsyncSession], request.app.state.sessions)


def get_temporal(request: Request) -> Client:
    return cast(Client, request.app.state.temporal)


def get_intake(request: Request) -> OrderIntake:
    return cast(OrderIntake, request.app.state.intake)


def get_dispatcher(request: Request) -> WorkflowDispatcher:
    return cast(WorkflowDispatcher, request.app.state.dispatcher)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessions)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
IntakeDep = Annotated[OrderIntake, Depends(get_intake)]
DispatcherDep = Annotated[WorkflowDispatcher, Depends(get_dispatcher)]
