"""The databases a bench run measures against: a fresh one per phase, migrated with Alembic, and the
scalar queries the bench polls them with.

By default each is a SQLite file in the run's temporary directory (the project's default backend).
With `python -m bench --database postgresql+asyncpg://user@host:port/db` each is a new database
on that server, created through the URL's database and dropped (WITH (FORCE)) on `close`, which
also runs when the bench fails. Every database is named by the SQLAlchemy URL the processes get as
DATABASE_URL.

The polling side stays cheap: SQLite gets one read-only sqlite3 connection per file; PostgreSQL
one asyncpg connection per database, all on a private event loop that this (synchronous) harness
drives for each query.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import sys
import uuid
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.engine import URL, make_url

from bench.procs import ROOT

QUERY_TIMEOUT = 30.0
T = TypeVar("T")


def _migrate(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["skip_logging"] = True
    command.upgrade(config, "head")


def _asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _identifier(name: str) -> str:
    """`bench_<name>_<hex>`, lower case, only [a-z0-9_], within PostgreSQL's 63 bytes."""
    stem = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:40] or "db"
    return f"bench_{stem}_{uuid.uuid4().hex[:8]}"


class Databases:
    """Creates the run's fresh databases, answers scalar queries against them, and cleans up."""

    def __init__(self, workdir: Path, server: str | None = None) -> None:
        self.workdir = workdir
        self._sqlite: dict[str, sqlite3.Connection] = {}
        self._pg: dict[str, asyncpg.Connection] = {}
        self._created: list[str] = []  # PostgreSQL databases to drop on close
        # Queries this harness sent per database: each is a transaction PostgreSQL counts.
        self.queries: dict[str, int] = {}
        self._server: URL | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admin: asyncpg.Connection | None = None
        self.info: dict[str, str]
        if server is None:
            self.info = {
                "backend": "sqlite",
                "version": sqlite3.sqlite_version,
                "description": (
                    f"SQLite {sqlite3.sqlite_version} file (WAL), a new file per phase in the "
                    "run's temporary directory"
                ),
            }
            return
        url = make_url(server)
        if url.get_backend_name() != "postgresql":
            raise ValueError(f"--database takes a PostgreSQL URL, not {server!r}")
        if url.get_driver_name() != "asyncpg":
            # The processes use SQLAlchemy's async engine: asyncpg is the driver they have.
            url = url.set(drivername="postgresql+asyncpg")
        self._server = url
        self._loop = asyncio.new_event_loop()
        try:
            self._admin = self._run(asyncpg.connect(_asyncpg_dsn(url), timeout=QUERY_TIMEOUT))
            version = str(self._run(self._admin.fetchval("SHOW server_version"))).split()[0]
        except BaseException:
            self.close()
            raise
        where = f"{url.host or 'localhost'}:{url.port or 5432}"
        self.info = {
            "backend": "postgresql",
            "version": version,
            "server": where,
            "url": url.render_as_string(hide_password=True),
            "description": (
                f"PostgreSQL {version} at {where} (asyncpg), a new database per phase, dropped "
                "at the end; the server's own CPU is in none of the CPU columns"
            ),
        }

    # ---- the databases ----------------------------------------------------------------------

    def fresh(self, name: str) -> str:
        """A new, migrated database for one phase; returns its URL."""
        if self._server is None:
            path = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}.db"
            url = f"sqlite+aiosqlite:///{path}"
        else:
            assert self._admin is not None
            database = _identifier(name)
            self._run(self._admin.execute(f'CREATE DATABASE "{database}"'))
            self._created.append(database)
            url = self._server.set(database=database).render_as_string(hide_password=False)
        _migrate(url)
        return url

    def dbos_system(self, url: str) -> str:
        """DBOS's system database for the phase whose order database is at url, as a URL DBOS
        takes: a SQLite file beside the order file (SQLite has one writer per file, and DBOS's
        own default is a file of its own), or on PostgreSQL the order database itself, where DBOS
        keeps its tables in the schema `dbos`, as an application usually runs it."""
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            return f"sqlite:///{Path(parsed.database or '').with_suffix('.dbos.sqlite')}"
        return parsed.set(drivername="postgresql").render_as_string(hide_password=False)

    @staticmethod
    def dbos_table(system: str, table: str) -> str:
        """A DBOS system table by the name a query uses: on PostgreSQL it lives in `dbos`."""
        return table if make_url(system).get_backend_name() == "sqlite" else f"dbos.{table}"

    def unused(self) -> str:
        """A URL for processes that never open their database (floors, the bare worker)."""
        return f"sqlite+aiosqlite:///{self.workdir / 'unused.db'}"

    @staticmethod
    def label(url: str) -> str:
        """A short name for notes: the SQLite file's name or the PostgreSQL database's."""
        return Path(make_url(url).database or url).name

    def scalar(self, url: str, sql: str) -> Any:
        """The first column of the first row of a read-only query against the database at url."""
        self.queries[url] = self.queries.get(url, 0) + 1
        if make_url(url).get_backend_name() == "sqlite":
            conn = self._sqlite.get(url)
            if conn is None:
                path = make_url(url).database
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=QUERY_TIMEOUT)
                self._sqlite[url] = conn
            row = conn.execute(sql).fetchone()
            return row[0] if row else None
        pg = self._pg.get(url)
        if pg is None:
            pg = self._run(asyncpg.connect(_asyncpg_dsn(make_url(url)), timeout=QUERY_TIMEOUT))
            self._pg[url] = pg
        return self._run(pg.fetchval(sql, timeout=QUERY_TIMEOUT))

    def footprint(self, url: str, tables: tuple[str, ...]) -> dict[str, dict[str, int]]:
        """Each table's rows and the bytes it takes on disk, indexes included: SQLite's pages
        (the `dbstat` table, after a checkpoint so the WAL's pages count), PostgreSQL's
        `pg_total_relation_size` (heap, indexes and TOAST, in 8 KiB pages)."""
        sizes: dict[str, dict[str, int]] = {}
        if make_url(url).get_backend_name() == "sqlite":
            path = make_url(url).database or ""
            # A connection of its own: the checkpoint needs write access, the poller has none.
            with sqlite3.connect(path, timeout=QUERY_TIMEOUT) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                pages = dict(
                    conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
                )
                indexes = conn.execute(
                    "SELECT tbl_name, name FROM sqlite_schema WHERE type = 'index'"
                ).fetchall()
                for table in tables:
                    rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                    size = pages.get(table, 0)
                    size += sum(pages.get(index, 0) for owner, index in indexes if owner == table)
                    sizes[table] = {"rows": int(rows), "bytes": int(size)}
            conn.close()
            return sizes
        for table in tables:
            sizes[table] = {
                "rows": int(self.scalar(url, f"SELECT count(*) FROM {table}")),
                "bytes": int(self.scalar(url, f"SELECT pg_total_relation_size('{table}')")),
            }
        return sizes

    def writes(self, url: str) -> dict[str, int] | None:
        """PostgreSQL's counters for this database alone (the server is shared): committed
        transactions and rows inserted, updated and deleted. None on SQLite, which keeps none."""
        if make_url(url).get_backend_name() == "sqlite":
            return None
        # The statistics collector publishes a backend's counters within about a second.
        self.scalar(url, "SELECT pg_stat_clear_snapshot()")
        self.queries[url] = self.queries.get(url, 0) + 1
        row = self._run(
            self._pg[url].fetchrow(
                "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted "
                "FROM pg_stat_database WHERE datname = current_database()",
                timeout=QUERY_TIMEOUT,
            )
        )
        assert row is not None
        return {key: int(value) for key, value in dict(row).items()}

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Closes every connection and drops every PostgreSQL database this run created."""
        for conn in self._sqlite.values():
            conn.close()
        self._sqlite.clear()
        if self._loop is None:
            return
        for pg in self._pg.values():
            self._quietly(pg.close(timeout=5), "close a polling connection")
        self._pg.clear()
        if self._admin is not None:
            for database in self._created:
                self._quietly(
                    self._admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'),
                    f"drop database {database}",
                )
            self._created.clear()
            self._quietly(self._admin.close(timeout=5), "close the admin connection")
            self._admin = None
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Databases:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return self._loop.run_until_complete(coroutine)

    def _quietly(self, coroutine: Coroutine[Any, Any, Any], what: str) -> None:
        try:
            self._run(coroutine)
        except Exception as failure:  # keep cleaning up the rest
            print(f"could not {what}: {failure}", file=sys.stderr)
