"""The worker's step metrics, recorded through the Temporal SDK's metric meter so they are served
on the same Prometheus endpoint as the SDK's own (WORKER_METRICS_ADDRESS): one port per worker,
one scrape target, and no second HTTP server to run.

Attempt outcomes are counted by an activity interceptor, so the activities stay free of
bookkeeping; the activities only mark the side effect itself with `side_effect_timer`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from activities.retry import PERMANENT_ERROR_TYPES
from core.contracts import STEPS, StepInput
from core.metrics import LATENCY_BUCKETS, SIDE_EFFECT_DURATION, STEP_ATTEMPTS
from core.names import RECORD_DEAD_LETTER_ACTIVITY
from core.states import AttemptOutcome
from core.tracing import mark_failed

log = logging.getLogger(__name__)

# Finer than the SDK's defaults: a task waiting 0.5 s for a worker is already worth seeing.
SCHEDULE_TO_START_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def worker_runtime(bind_address: str) -> Runtime | None:
    """A Temporal runtime that serves Prometheus metrics on `bind_address` (host:port), with
    durations in seconds; None when the address is empty (metrics off)."""
    if not bind_address:
        return None
    config = PrometheusConfig(
        bind_address=bind_address,
        durations_as_seconds=True,
        histogram_bucket_overrides={
            SIDE_EFFECT_DURATION: LATENCY_BUCKETS,
            "activity_schedule_to_start_latency": SCHEDULE_TO_START_BUCKETS,
            "workflow_task_schedule_to_start_latency": SCHEDULE_TO_START_BUCKETS,
        },
    )
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=config))
    except ValueError as failure:
        # A second worker on one host with the same address: losing its metrics is better than
        # losing the worker, and the scrape target going down raises OrderflowTargetDown.
        log.error(
            "worker metrics disabled: cannot serve on %s (%s); give each worker on a host its "
            "own WORKER_METRICS_ADDRESS, or set it empty to turn metrics off",
            bind_address,
            failure,
        )
        return None


def record_step_attempt(step: str, outcome: AttemptOutcome) -> None:
    activity.metric_meter().create_counter(
        STEP_ATTEMPTS,
        "Step attempts by outcome: succeeded, retried (failed, retryable), failed_permanent "
        "(failed, not retryable), dead_lettered (parked for an operator).",
    ).add(1, {"step": step, "outcome": outcome})


@contextmanager
def side_effect_timer(step: str) -> Iterator[None]:
    """Times the call to the downstream (SMTP, webhook), failed or not, in seconds."""
    started = time.perf_counter()
    try:
        yield
    finally:
        activity.metric_meter().create_histogram_float(
            SIDE_EFFECT_DURATION, "Time the downstream took to take (or refuse) a side effect."
        ).record(time.perf_counter() - started, {"step": step})


def attempt_outcome(error: BaseException | None) -> AttemptOutcome:
    if error is None:
        return "succeeded"
    if isinstance(error, ApplicationError) and (
        error.non_retryable or error.type in PERMANENT_ERROR_TYPES
    ):
        return "failed_permanent"
    return "retried"


class StepMetricsInterceptor(Interceptor):
    """Counts each attempt of a step activity by outcome (and each dead letter recorded), says it
    in one log line, and marks a failed attempt's span."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _StepMetricsInbound(next)


class _StepMetricsInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        activity_type = info.activity_type
        if activity_type in STEPS:
            # The step's attempt, not the activity's: a step whose first attempt ran locally
            # counts that one too.
            step_input = input.args[0] if input.args else None
            attempt = (
                step_input.attempt(info.attempt)
                if isinstance(step_input, StepInput)
                else info.attempt
            )
            try:
                result = await super().execute_activity(input)
            except Exception as failure:
                outcome = attempt_outcome(failure)
                record_step_attempt(activity_type, outcome)
                mark_failed(failure)
                # One line per failed attempt, with no traceback (the step's errors are benign,
                # which the SDK logs at DEBUG): activity.logger adds the order's workflow ID and
                # the step.
                activity.logger.info(
                    "step attempt %s: %s",
                    outcome,
                    failure,
                    extra={
                        "outcome": outcome,
                        "error_type": _error_type(failure),
                        "attempt": attempt,
                        "next_delay_s": _next_delay(failure),
                    },
                )
                raise
            record_step_attempt(activity_type, "succeeded")
            activity.logger.info(
                "step attempt succeeded", extra={"outcome": "succeeded", "attempt": attempt}
            )
            return result
        result = await super().execute_activity(input)
        opened = not getattr(result, "step_succeeded", False)
        if activity_type == RECORD_DEAD_LETTER_ACTIVITY and input.args and opened:
            record_step_attempt(str(getattr(input.args[0], "step", "unknown")), "dead_lettered")
        return result


def _next_delay(failure: BaseException) -> float | None:
    """The wait the failure asked for before the next attempt, in seconds (None: the policy's)."""
    if isinstance(failure, ApplicationError) and failure.next_retry_delay is not None:
        return round(failure.next_retry_delay.total_seconds(), 3)
    return None


def _error_type(failure: BaseException) -> str:
    if isinstance(failure, ApplicationError) and failure.type:
        return failure.type
    return type(failure).__name__
