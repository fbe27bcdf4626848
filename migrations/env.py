"""Alembic environment: migrates the database named by DATABASE_URL (or a URL a caller passes as
`config.attributes["database_url"]`, as the tests do)."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from core.db import create_engine
from core.models import Base
from core.settings import get_settings

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _settings() -> object:
    settings = get_settings()
    url = config.attributes.get("database_url")
    return settings.model_copy(update={"DATABASE_URL": url}) if url else settings


def run_migrations_offline() -> None:
    context.configure(
        url=_settings().DATABASE_URL,  # type: ignore[attr-defined]
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite can only change a table by copying it; batch mode does that for us.
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_engine(_settings())  # type: ignore[arg-type]
    async with engine.connect() as connection:
        await connection.run_sync(_migrate)
        await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
