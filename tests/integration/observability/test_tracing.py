"""One trace per order, from the HTTP request to each side effect, on real components (API with
its lifespan, Temporal dev server, worker, SMTP and HTTP sinks), exported to memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.main import create_app
from core.settings import Settings
from core.temporal import connect_temporal
from core.tracing import ORDER_ID_ATTRIBUTE, Tracing, tracing_from_environment
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import running_worker
from tests.support import new_key, order_body, wait_until

STEPS = ("send_receipt", "notify_warehouse")


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(spans: InMemorySpanExporter) -> Tracing:
    return Tracing.with_processors("orderflow-test", [SimpleSpanProcessor(spans)])


@pytest.fixture
async def traced_api(settings: Settings, tracing: Tracing) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, tracing=tracing)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderflow.test") as c:
            yield c


async def test_one_trace_runs_from_the_request_to_every_activity_attempt(
    traced_api: httpx.AsyncClient,
    settings: Settings,
    tracing: Tracing,
    spans: InMemorySpanExporter,
    sessions: async_sessionmaker[AsyncSession],
    mail: MailSink,
    warehouse: WarehouseReceiver,
) -> None:
    # The worker's client carries the interceptor, as `python worker.py` builds it.
    client = await connect_temporal(settings, interceptors=tracing.interceptors())
    async with running_worker(client, settings, sessions):
        warehouse.faults.configure(fail_next=1, status=503)
        response = await traced_api.post(
            "/orders", json=order_body(), headers={"Idempotency-Key": new_key()}
        )
        assert response.status_code == 202
        order_id = response.json()["order_id"]

        def finished() -> list[ReadableSpan]:
            done = spans.get_finished_spans()
            runs = [s for s in done if s.name == "RunActivity:notify_warehouse"]
            receipts = [s for s in done if s.name == "RunActivity:send_receipt"]
            return list(done) if len(runs) == 2 and receipts else []

        finished_spans = await wait_until(finished, within=30, message="activity spans")

    by_name: dict[str, list[ReadableSpan]] = {}
    for span in finished_spans:
        by_name.setdefault(span.name, []).append(span)

    [http] = [s for s in by_name["POST /orders"] if s.kind == SpanKind.SERVER]
    [start] = by_name["StartWorkflow:OrderWorkflow"]
    [run] = by_name["RunWorkflow:OrderWorkflow"]
    assert _parent(start) == http.context.span_id
    assert _parent(run) == start.context.span_id
    chain = [http, start, run]
    for step in STEPS:
        starts = by_name[f"StartActivity:{step}"]
        attempts = by_name[f"RunActivity:{step}"]
        # TracingInterceptor parents the workflow's outbound calls on the workflow's incoming
        # context (the StartWorkflow span); each attempt hangs under its StartActivity.
        assert {_parent(s) for s in starts} == {start.context.span_id}
        assert {_parent(a) for a in attempts} <= {s.context.span_id for s in starts}
        chain += [*starts, *attempts]
    # The webhook failed once: both attempts are in the trace, the first marked as an error.
    warehouse_attempts = by_name["RunActivity:notify_warehouse"]
    assert len(warehouse_attempts) == 2
    assert sorted(not a.status.is_ok for a in warehouse_attempts) == [False, True]

    assert {span.context.trace_id for span in chain} == {http.context.trace_id}
    for span in chain:
        assert span.attributes is not None
        assert span.attributes.get(ORDER_ID_ATTRIBUTE) == order_id, span.name


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def test_tracing_is_off_unless_an_exporter_is_configured() -> None:
    assert not tracing_from_environment("x", {}).enabled
    assert tracing_from_environment("x", {}).interceptors() == []
    assert not tracing_from_environment("x", {"OTEL_TRACES_EXPORTER": "none"}).enabled
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    on = tracing_from_environment("x", endpoint)
    assert on.enabled and len(on.interceptors()) == 1
    on.shutdown()
    console = tracing_from_environment("x", {"OTEL_TRACES_EXPORTER": "console"})
    assert console.enabled
    console.shutdown()
    with pytest.raises(ValueError, match="not supported"):
        tracing_from_environment("x", {"OTEL_TRACES_EXPORTER": "zipkin"})
