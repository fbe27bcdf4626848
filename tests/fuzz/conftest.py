"""One real API for the fuzz tests: `uvicorn api.main:app` in production mode (API keys and
admin keys set), on a database of its own, against the session's Temporal dev server. Every
request the tests send and every answer is recorded, so the last test can check that nothing was
written for a request that was refused.

Every POST /orders case whose Idempotency-Key the API would take gets a key of its own (the
generated key, with a unique suffix): the fuzzer draws few distinct header values, and a key
seen before is answered from the first request's stored answer, so the bodies behind it would
never reach the intake. Keys the API must refuse (blank, too long, not printable ASCII) are sent
as generated."""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from schemathesis import Case
from temporalio.testing import WorkflowEnvironment

from core.settings import Settings
from tests.conftest import ROOT, WEBHOOK_SECRET, fresh_database
from tests.integration.api.test_database_concurrency import api_processes

FUZZ_KEY = "fuzz-key-" + uuid.uuid4().hex
FIGURES = ROOT / "test-output" / "fuzz-figures.json"
KEY_HEADER = "Idempotency-Key"
# docs/http-api.md: a key is 1-255 printable ASCII characters.
MAX_KEY_LENGTH = 255
# Marks a key given to one case; the run's own part keeps it apart from other runs' keys.
KEY_SUFFIX = f"~fuzz-{uuid.uuid4().hex[:8]}-"


@dataclass
class FuzzServer:
    url: str
    settings: Settings

    @property
    def keys(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {FUZZ_KEY}"}


@dataclass
class FuzzRecord:
    """What the fuzzer sent to POST /orders (by Idempotency-Key) and how each case was answered."""

    # Idempotency-Key -> every status POST /orders answered for it.
    order_answers: dict[str, list[int]] = field(default_factory=dict)
    # How many cases were given a key of their own.
    keys_given: int = 0
    _numbers: itertools.count[int] = field(default_factory=itertools.count)
    # "<auth> <phase>" -> cases; "<auth> <operation>" -> cases; status -> answers.
    cases: Counter[str] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)

    def note(self, auth: str, phase: str, operation: str, key: str | None, status: int) -> None:
        self.cases[f"{auth} {phase}"] += 1
        self.operations[f"{auth} {operation}"] += 1
        self.statuses[status] += 1
        if operation == "POST /orders" and key is not None:
            self.order_answers.setdefault(key, []).append(status)

    def give_own_key(self, case: Case[Any]) -> None:
        """A POST /orders case's key, if the API would take it, made this case's alone."""
        if case.method.upper() != "POST" or case.path != "/orders" or not case.headers:
            return
        key = case.headers.get(KEY_HEADER)
        if not isinstance(key, str) or not acceptable_key(key):
            return
        suffix = f"{KEY_SUFFIX}{next(self._numbers)}"
        case.headers[KEY_HEADER] = key[: MAX_KEY_LENGTH - len(suffix)] + suffix
        self.keys_given += 1

    def write(self, path: Path = FIGURES) -> str:
        figures = {
            "cases_per_phase": dict(sorted(self.cases.items())),
            "cases_per_operation": dict(sorted(self.operations.items())),
            "answers_per_status": {str(k): v for k, v in sorted(self.statuses.items())},
            "order_keys": len(self.order_answers),
            "order_keys_given": self.keys_given,
        }
        text = json.dumps(figures, indent=2)
        path.parent.mkdir(exist_ok=True)
        path.write_text(text + "\n")
        return text


def acceptable_key(key: str) -> bool:
    """An Idempotency-Key the API takes, by its documented rule."""
    return (
        0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable() and bool(key.strip())
    )


@pytest.fixture(scope="module")
def fuzz_database(database_url: str) -> Iterator[str]:
    with fresh_database(database_url, "orderflow_fuzz") as url:
        yield url


@pytest.fixture(scope="module")
async def fuzz_server(env: WorkflowEnvironment, fuzz_database: str) -> AsyncIterator[FuzzServer]:
    settings = Settings(
        ORDERFLOW_ENV="production",
        DATABASE_URL=fuzz_database,
        TEMPORAL_ADDRESS=env.client.service_client.config.target_host,
        TEMPORAL_TASK_QUEUE=f"fuzz-{uuid.uuid4()}",
        WEBHOOK_SIGNING_SECRET=WEBHOOK_SECRET,
    )
    production = {
        "ORDERFLOW_ENV": "production",
        "API_KEYS": FUZZ_KEY,
        "ADMIN_API_KEYS": FUZZ_KEY,
        "LOG_LEVEL": "WARNING",
        # No worker runs here: the API itself must start every accepted order's workflow.
        "WORKFLOW_START_MODE": "request",
    }
    async with api_processes(settings, 1, **production) as [url]:
        yield FuzzServer(url, settings)


@pytest.fixture(scope="module")
def fuzz_record() -> FuzzRecord:
    return FuzzRecord()


@pytest.fixture(autouse=True)
def _schemathesis_node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis' lazy schemas (4.32) rename the pytest item through `_nodeid`, which pytest
    9.2 no longer has; giving it one lets the loader run (the report keeps pytest's own ID)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid
