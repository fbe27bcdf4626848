"""Telling a dependency outage from a bug: which database errors count as an outage."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from core.outages import is_database_outage


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError(), True),
        (OperationalError("SELECT 1", {}, Exception("database is locked")), True),
        (sa_exc.TimeoutError("QueuePool limit reached"), True),
        (DBAPIError("SELECT 1", {}, asyncpg.TooManyConnectionsError("too many")), True),
        (DBAPIError("SELECT 1", {}, Exception("x"), connection_invalidated=True), True),
        (IntegrityError("INSERT", {}, Exception("duplicate key")), False),
        (DBAPIError("SELECT 1", {}, ValueError("invalid byte sequence")), False),
        (RuntimeError("a bug"), False),
    ],
)
def test_what_counts_as_a_database_outage(error: Exception, outage: bool) -> None:
    assert is_database_outage(error) is outage
