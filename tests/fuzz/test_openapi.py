"""Schemathesis against the API's own /openapi.json on a real uvicorn server in production mode:
every operation, with the keys and without them, through the examples, coverage, fuzzing and
stateful phases, with the four conformance checks. Then: nothing exists for a refused request.

The seed is fixed and the examples are few, so the normal suite stays quick and repeatable;
`make test-fuzz` runs many more (FUZZ_MAX_EXAMPLES, FUZZ_SEED)."""

from __future__ import annotations

import os
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import Case, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment

from core.db import create_engine, create_sessionmaker
from core.models import IdempotencyKey, Order, PaymentCharge
from tests.fuzz.conftest import FuzzRecord, FuzzServer
from tests.support import wait_until

SEED = int(os.environ.get("FUZZ_SEED", "20261201"))
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "20"))
STATEFUL_EXAMPLES = int(os.environ.get("FUZZ_STATEFUL_EXAMPLES", "10"))
STATEFUL_STEPS = int(os.environ.get("FUZZ_STATEFUL_STEPS", "6"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
AUTH_MODES = ("with-keys", "without-keys")


def fuzz_config(headers: dict[str, str]) -> schemathesis.Config:
    only_ours = {"enabled": False, **{check.__name__: {"enabled": True} for check in CHECKS}}
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": headers,
            "request-timeout": 30,
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "checks": only_ours,
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": True, "max-steps": STATEFUL_STEPS},
            },
        }
    )


@pytest.fixture(scope="module", params=AUTH_MODES)
def auth(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: FuzzServer, auth: str) -> schemathesis.BaseSchema:
    headers = fuzz_server.keys if auth == "with-keys" else {}
    return schemathesis.openapi.from_url(
        f"{fuzz_server.url}/openapi.json", config=fuzz_config(headers)
    )


schema = schemathesis.pytest.from_fixture("api_schema")


def _note(record: FuzzRecord, auth: str, case: Case[Any], response: Response) -> None:
    key = case.headers.get("Idempotency-Key") if case.headers else None
    phase = case.meta.phase.name.value if case.meta is not None else "explicit"
    record.note(auth, phase, f"{case.method.upper()} {case.path}", key, response.status_code)


@schema.parametrize()
def test_every_operation_answers_as_its_schema_says(
    case: Case[Any], auth: str, fuzz_record: FuzzRecord
) -> None:
    response = case.call()
    _note(fuzz_record, auth, case, response)
    case.validate_response(response, checks=CHECKS)


def test_stateful_sequences_answer_as_the_schema_says(
    api_schema: schemathesis.BaseSchema, auth: str, fuzz_record: FuzzRecord
) -> None:
    base = api_schema.as_state_machine()

    class Recorded(base):  # type: ignore[misc, valid-type]
        def after_call(self, response: Response, case: Case[Any]) -> None:
            _note(fuzz_record, auth, case, response)

        def validate_response(
            self, response: Response, case: Case[Any], *args: Any, **kwargs: Any
        ) -> None:
            case.validate_response(response, checks=CHECKS)

    Recorded.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )


async def test_nothing_exists_for_a_refused_request(
    fuzz_server: FuzzServer, fuzz_record: FuzzRecord, env: WorkflowEnvironment
) -> None:
    """Every order, charge and workflow belongs to a POST /orders that was answered 202; a
    declined card (402) leaves its charge and nothing else; anything else left nothing."""
    print(fuzz_record.write())
    accepted = {key for key, answers in fuzz_record.order_answers.items() if 202 in answers}
    declined = {key for key, answers in fuzz_record.order_answers.items() if 402 in answers}
    engine = create_engine(fuzz_server.settings)
    sessions: async_sessionmaker[AsyncSession] = create_sessionmaker(engine)
    try:
        async with sessions() as session:
            order_keys = (await session.execute(select(Order.idempotency_key, Order.id))).all()
            charge_keys = (await session.scalars(select(PaymentCharge.idempotency_key))).all()
            key_rows = await session.scalar(select(func.count()).select_from(IdempotencyKey))
    finally:
        await engine.dispose()

    assert {key for key, _ in order_keys} == accepted
    assert len(order_keys) == len(accepted)
    assert set(charge_keys) == accepted | declined
    assert len(charge_keys) == len(set(charge_keys))
    assert key_rows == len(accepted | declined)

    # Order workflows only: an accepted bulk retry starts a RedriveWorkflow on the same queue.
    query = (
        f'TaskQueue = "{fuzz_server.settings.TEMPORAL_TASK_QUEUE}" '
        'AND WorkflowType = "OrderWorkflow"'
    )

    async def workflows() -> set[str]:
        return {w.id async for w in env.client.list_workflows(query)}

    expected = {order_id for _, order_id in order_keys}
    await wait_until(
        lambda: _same(workflows(), expected), within=30, message="one workflow per order"
    )


async def _same(found: Any, expected: set[str]) -> bool:
    return bool(await found == expected)
