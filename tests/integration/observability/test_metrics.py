"""Prometheus metrics on real components: the API's GET /metrics (requests by route template,
intake outcomes, backlog gauges read from the database) and the worker's endpoint (the SDK's
metrics and our step outcomes and side-effect latency)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.metrics import worker_runtime
from core.metrics import (
    DATABASE_UP,
    DEAD_LETTERS_OPEN,
    HTTP_REQUEST_DURATION,
    HTTP_REQUESTS,
    ORDERS_ACCEPTED,
    ORDERS_DECLINED,
    ORDERS_DEDUPLICATED,
    OUTBOX_BACKLOG,
    OUTBOX_OLDEST_AGE,
    SIDE_EFFECT_DURATION,
    STEP_ATTEMPTS,
    TEMPORAL_SDK_METRICS,
    WorkflowStartMetrics,
)
from core.models import DeadLetter, DeadLetterStatus, Order, WorkflowOutbox, utcnow
from core.settings import Settings
from core.temporal import connect_temporal, start_order_workflow
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, free_port, running_worker
from tests.support import new_key, order_body, order_row, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def scrape(api: httpx.AsyncClient) -> Samples:
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def test_api_counts_requests_by_route_template_and_intake_outcomes(
    api: httpx.AsyncClient,
) -> None:
    before = await scrape(api)
    key = new_key()
    body = order_body()
    first = await api.post("/orders", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    again = await api.post("/orders", json=body, headers={"Idempotency-Key": key})
    assert again.json()["order_id"] == first.json()["order_id"]
    declined = await api.post(
        "/orders",
        json=order_body(payment_token="tok_declined"),
        headers={"Idempotency-Key": new_key()},
    )
    assert declined.status_code == 402
    order_id = first.json()["order_id"]
    assert (await api.get(f"/orders/{order_id}")).status_code == 200
    assert (await api.get(f"/no-such-path-{uuid.uuid4().hex}")).status_code == 404
    after = await scrape(api)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(ORDERS_ACCEPTED) == 1
    assert delta(ORDERS_DEDUPLICATED, by="key") == 1
    assert delta(ORDERS_DEDUPLICATED, by="workflow_id") == 0
    assert delta(ORDERS_DECLINED) == 1
    posts = {"method": "POST", "route": "/orders"}
    assert delta(HTTP_REQUESTS, **posts, status="202") == 2
    assert delta(HTTP_REQUESTS, **posts, status="402") == 1
    assert delta(f"{HTTP_REQUEST_DURATION}_count", **posts, status="202") == 2
    # The template, never the ID: one series however many orders are read.
    assert delta(HTTP_REQUESTS, method="GET", route="/orders/{order_id}", status="200") == 1
    assert not any(order_id in dict(labels).get("route", "") for _n, labels in after)
    assert delta(HTTP_REQUESTS, method="GET", route="<unmatched>", status="404") == 1


async def test_a_start_that_finds_the_workflow_running_counts_as_deduplicated_by_workflow_id(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    before = await scrape(api)
    placed = await api.post("/orders", json=order_body(), headers={"Idempotency-Key": new_key()})
    assert placed.status_code == 202
    # The API's own start created the workflow: not a duplicate.
    assert value(await scrape(api), ORDERS_DEDUPLICATED, by="workflow_id") == value(
        before, ORDERS_DEDUPLICATED, by="workflow_id"
    )
    # A second start of the same order (as the relay would make) finds it running.
    client = await connect_temporal(settings, interceptors=[WorkflowStartMetrics()])
    await start_order_workflow(client, placed.json()["order_id"], settings.TEMPORAL_TASK_QUEUE)
    after = await scrape(api)
    assert (
        value(after, ORDERS_DEDUPLICATED, by="workflow_id")
        - value(before, ORDERS_DEDUPLICATED, by="workflow_id")
        == 1
    )


@pytest.fixture
async def parked_rows(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[str]:
    """An order whose workflow start is five minutes overdue and whose warehouse step is parked,
    written straight into the database; removed afterwards so no other test sees it."""
    order = order_row("metrics@example.com", [{"sku": "X", "quantity": 1, "unit_price_cents": 100}])
    order_id = order.id
    async with sessions.begin() as session:
        session.add(order)
        await session.flush()
        session.add(WorkflowOutbox(order_id=order_id, created_at=utcnow() - timedelta(minutes=5)))
        session.add(
            DeadLetter(
                order_id=order_id,
                step="notify_warehouse",
                status=DeadLetterStatus.OPEN,
                error_type="WarehouseUnavailable",
                error_message="test",
                attempts=3,
                workflow_id=order_id,
                run_id="run",
            )
        )
    try:
        yield order_id
    finally:
        async with sessions.begin() as session:
            await session.execute(delete(Order).where(Order.id == order_id))
            await session.execute(delete(DeadLetter).where(DeadLetter.order_id == order_id))
            await session.execute(delete(WorkflowOutbox).where(WorkflowOutbox.order_id == order_id))


async def test_backlog_gauges_come_from_the_database_so_every_replica_agrees(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], parked_rows: str
) -> None:
    # Two API replicas on one database: neither saw the rows being written, both report them.
    async with api_client(settings) as one, api_client(settings) as two:
        first, second = await scrape(one), await scrape(two)
    for samples in (first, second):
        assert value(samples, DATABASE_UP) == 1
        assert value(samples, OUTBOX_BACKLOG) >= 1
        assert value(samples, OUTBOX_OLDEST_AGE) >= 300
        assert value(samples, DEAD_LETTERS_OPEN, step="notify_warehouse") >= 1
        # Every step is reported, at zero too, so an alert rule never meets a missing series.
        assert (DEAD_LETTERS_OPEN, frozenset({("step", "send_receipt")})) in samples
    assert value(first, DEAD_LETTERS_OPEN, step="notify_warehouse") == value(
        second, DEAD_LETTERS_OPEN, step="notify_warehouse"
    )
    assert value(first, OUTBOX_BACKLOG) == value(second, OUTBOX_BACKLOG)

    async with sessions.begin() as session:
        letter = await session.get(DeadLetter, await _letter_id(session, parked_rows))
        assert letter is not None
        letter.status = DeadLetterStatus.RESOLVED
    async with api_client(settings) as one:
        resolved = await scrape(one)
    assert value(resolved, DEAD_LETTERS_OPEN, step="notify_warehouse") == (
        value(first, DEAD_LETTERS_OPEN, step="notify_warehouse") - 1
    )


async def _letter_id(session: AsyncSession, order_id: str) -> int:
    letter_id = await session.scalar(select(DeadLetter.id).where(DeadLetter.order_id == order_id))
    assert letter_id is not None
    return letter_id


async def test_metrics_answer_without_the_database_and_say_so(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    missing = tmp_path_factory.mktemp("gone") / "no-such-dir" / "orderflow.db"
    broken = settings.model_copy(update={"DATABASE_URL": f"sqlite+aiosqlite:///{missing}"})
    async with api_client(broken) as api:
        samples = await scrape(api)
    assert value(samples, DATABASE_UP) == 0
    assert not any(name == OUTBOX_BACKLOG for name, _labels in samples)


@pytest.fixture
async def metered_worker(
    env: WorkflowEnvironment, settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[tuple[Worker, str]]:
    """The real worker on a client whose runtime serves Prometheus, as `python worker.py` does."""
    address = f"127.0.0.1:{free_port()}"
    runtime = worker_runtime(address)
    assert runtime is not None
    client = await connect_temporal(settings, runtime=runtime)
    async with running_worker(client, settings, sessions) as worker:
        yield worker, f"http://{address}/metrics"


async def test_worker_serves_sdk_metrics_and_step_outcomes(
    metered_worker: tuple[Worker, str],
    api: httpx.AsyncClient,
    settings: Settings,
    warehouse: WarehouseReceiver,
    env: WorkflowEnvironment,
) -> None:
    _worker, url = metered_worker
    queue = {"task_queue": settings.TEMPORAL_TASK_QUEUE}

    # One order whose webhook fails twice (local-first: its local first attempt and its first
    # activity task) and then goes through...
    warehouse.faults.configure(fail_next=2, status=503)
    healed = await _place(api)
    await wait_until(lambda: _status(api, healed, "completed"), within=30, message="completed")
    # ...and one the warehouse refuses outright: permanent, parked at once.
    warehouse.faults.configure(fail_next=1, status=400)
    refused = await _place(api)
    await wait_until(
        lambda: _status(api, refused, "needs_attention"), within=30, message="dead-lettered"
    )

    async def worker_metrics() -> Samples | None:
        async with httpx.AsyncClient() as http:
            samples = parse((await http.get(url)).text)
        settled = value(samples, STEP_ATTEMPTS, **queue, outcome="dead_lettered") >= 1
        return samples if settled else None

    samples = await wait_until(worker_metrics, within=30, message="worker metrics")

    def attempts(step: str, outcome: str) -> float:
        return value(samples, STEP_ATTEMPTS, **queue, step=step, outcome=outcome)

    assert attempts("send_receipt", "succeeded") == 2
    assert attempts("notify_warehouse", "retried") == 2
    assert attempts("notify_warehouse", "succeeded") == 1
    assert attempts("notify_warehouse", "failed_permanent") == 1
    assert attempts("notify_warehouse", "dead_lettered") == 1
    assert attempts("send_receipt", "dead_lettered") == 0
    # Every delivery was timed, the failed ones too: 2 e-mails, 4 webhook calls.
    side_effects = f"{SIDE_EFFECT_DURATION}_count"
    assert value(samples, side_effects, **queue, step="send_receipt") == 2
    assert value(samples, side_effects, **queue, step="notify_warehouse") == 4
    # A downstream's refusals are the normal life of a step (benign): the SDK does not count
    # them as failed executions, so its failure counters are left to what nobody expected.
    sdk_failed = ("temporal_activity_execution_failed", "temporal_local_activity_execution_failed")

    def failures(samples: Samples, counter: str, **labels: str) -> float:
        names = {name for name, _labels in samples if name.startswith(counter)}
        return sum(value(samples, name, **labels) for name in names)

    for counter in sdk_failed:
        assert failures(samples, counter, activity_type="notify_warehouse") == 0, counter

    # An order whose row is missing is such a thing: its workflow's steps fail unexpectedly,
    # and the SDK counts it.
    ghost = f"ord_{uuid.uuid4().hex}"
    handle = await start_order_workflow(env.client, ghost, settings.TEMPORAL_TASK_QUEUE)

    async def counted_as_failed() -> Samples | None:
        async with httpx.AsyncClient() as http:
            samples = parse((await http.get(url)).text)
        failed = all(failures(samples, counter) >= 1 for counter in sdk_failed)
        return samples if failed or settings.STEP_FIRST_ATTEMPT != "local" else None

    samples = await wait_until(counted_as_failed, within=30, message="an unexpected failure")
    await handle.terminate("a test's order without a row")
    names = {name for name, _labels in samples}
    expected = set(TEMPORAL_SDK_METRICS)
    if settings.STEP_FIRST_ATTEMPT != "local":
        # No step attempt is a local activity, and the policy's never fails.
        expected.discard("temporal_local_activity_execution_failed")
    for sdk_metric in expected:
        assert any(name.startswith(sdk_metric) for name in names), sdk_metric


async def _place(api: httpx.AsyncClient) -> str:
    response = await api.post("/orders", json=order_body(), headers={"Idempotency-Key": new_key()})
    assert response.status_code == 202
    return str(response.json()["order_id"])


async def _status(api: httpx.AsyncClient, order_id: str, status: str) -> bool:
    return bool((await api.get(f"/orders/{order_id}")).json()["status"] == status)


def test_a_taken_metrics_address_costs_the_metrics_not_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    first = worker_runtime(address)
    assert first is not None
    with caplog.at_level("ERROR", logger="activities.metrics"):
        assert worker_runtime(address) is None
    assert "worker metrics disabled" in caplog.text
    assert worker_runtime("") is None
