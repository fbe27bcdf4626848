"""The operator's tests share one set-up besides the root conftest's: the real worker and API on
a database of the test's own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment

from core.db import create_engine, create_sessionmaker
from core.settings import Settings
from tests.conftest import api_client, running_worker


@dataclass
class OwnStack:
    """The test's settings (its own DATABASE_URL), that database's sessions and the API on it."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    api: httpx.AsyncClient


@pytest.fixture
async def own_stack(
    env: WorkflowEnvironment, settings: Settings, own_database: str
) -> AsyncIterator[OwnStack]:
    """The real worker and API on a migrated database of the test's own, for a test that must see
    only the rows it made: "retry all" matches every open dead letter of a group."""
    own = settings.model_copy(update={"DATABASE_URL": own_database})
    engine = create_engine(own)
    sessions = create_sessionmaker(engine)
    try:
        async with running_worker(env.client, own, sessions), api_client(own) as api:
            yield OwnStack(own, sessions, api)
    finally:
        await engine.dispose()
