"""OpenTelemetry tracing, off unless an exporter is configured with the standard variables:

- `OTEL_TRACES_EXPORTER`: `otlp`, `console` (comma-separated for both) or `none`;
- `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: setting one alone turns
  on `otlp`; `OTEL_EXPORTER_OTLP_PROTOCOL` picks `http/protobuf` (default) or `grpc`;
- `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`: the resource, as usual.

With none of them set there is no tracer provider, no FastAPI middleware and no Temporal
interceptor, so tracing costs nothing. When on, one trace runs from `POST /orders` (the FastAPI
server span) through `StartWorkflow:OrderWorkflow`, `RunWorkflow:OrderWorkflow` and each
`StartActivity:<step>` / `RunActivity:<step>` attempt, and every span of an order carries
`order.id`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.worker import WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

ORDER_ID_ATTRIBUTE = "order.id"
# Set by temporalio's TracingInterceptor on every workflow and activity span.
TEMPORAL_WORKFLOW_ID_ATTRIBUTE = "temporalWorkflowID"
# Probes and scrapes are noise in a trace view.
EXCLUDED_URLS = "/metrics,/healthz,/readyz"


class OrderIdSpanProcessor(SpanProcessor):
    """Puts `order.id` on every Temporal span of an order: the workflow ID is the order ID."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        workflow_id = (span.attributes or {}).get(TEMPORAL_WORKFLOW_ID_ATTRIBUTE)
        if isinstance(workflow_id, str):
            span.set_attribute(ORDER_ID_ATTRIBUTE, workflow_id)

    def on_end(self, span: ReadableSpan) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def annotate_order(order_id: str) -> None:
    """Marks the current span (the HTTP request's) with the order it created; a no-op when
    tracing is off."""
    trace.get_current_span().set_attribute(ORDER_ID_ATTRIBUTE, order_id)


def mark_failed(failure: BaseException) -> None:
    """Marks the current span (an activity attempt's) as failed. temporalio's interceptor leaves
    a benign error's span OK, since it is no bug; in a trace, an attempt that the downstream
    refused still failed. A no-op when tracing is off."""
    trace.get_current_span().set_status(
        trace.Status(trace.StatusCode.ERROR, f"{type(failure).__name__}: {failure}")
    )


def sandbox_runner() -> WorkflowRunner:
    """The workflow sandbox with opentelemetry passed through: the tracing interceptor's workflow
    half must share the process's opentelemetry modules (its context keys and propagators)
    instead of a re-imported copy per workflow."""
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("opentelemetry")
    )


@dataclasses.dataclass(frozen=True)
class Tracing:
    """The process's tracing: a provider when on, nothing at all when off."""

    provider: TracerProvider | None = None

    @classmethod
    def with_processors(cls, service_name: str, processors: Sequence[SpanProcessor]) -> Tracing:
        provider = TracerProvider(resource=_resource(service_name, os.environ))
        provider.add_span_processor(OrderIdSpanProcessor())
        for processor in processors:
            provider.add_span_processor(processor)
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def interceptors(self) -> list[TracingInterceptor]:
        """For the Temporal client; a worker built on that client inherits them."""
        if self.provider is None:
            return []
        return [TracingInterceptor(self.provider.get_tracer("orderflow"))]

    def instrument_app(self, app: FastAPI) -> None:
        if self.provider is None:
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            excluded_urls=EXCLUDED_URLS,
            exclude_spans=["receive", "send"],
        )

    def flush(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def tracing_from_environment(
    service_name: str, environ: Mapping[str, str] | None = None
) -> Tracing:
    env = os.environ if environ is None else environ
    exporters = [_exporter(name, env) for name in _exporter_names(env)]
    if not exporters:
        return Tracing()
    return Tracing.with_processors(service_name, [BatchSpanProcessor(e) for e in exporters])


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    configured = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if configured:
        names = [name.strip() for name in configured.split(",") if name.strip()]
        return [name for name in names if name != "none"]
    # OTel's own default exporter is otlp; ours is none, unless an endpoint says where to send.
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ["otlp"]
    return []


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported; use otlp or console")
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    # Both exporters read their endpoint, headers and timeout from the OTEL_* variables.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpOTLPSpanExporter,
        )

        return HttpOTLPSpanExporter()
    raise ValueError(f"OTLP protocol {protocol!r} is not supported; use http/protobuf or grpc")


def _resource(service_name: str, env: Mapping[str, str]) -> Resource:
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which win.
    named = env.get("OTEL_SERVICE_NAME") or f"{SERVICE_NAME}=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    defaults = {} if named else {SERVICE_NAME: service_name}
    return Resource.create(defaults)
