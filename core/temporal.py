"""Connecting to Temporal, and the one call that starts an order's workflow: the start path
(core/relay.py, for the API and the relay) and the cancel's signal-with-start both make it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from temporalio.client import Client, Interceptor, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.runtime import Runtime

from core.contracts import (
    ORDER_STATUS_ATTRIBUTE,
    OrderWorkflowInput,
    OrderWorkflowStatus,
    StepPolicy,
)
from core.models import OrderStatus
from core.names import ORDER_WORKFLOW
from core.outages import TEMPORAL, DependencyUnavailable
from core.settings import Settings


def client_connect_config(settings: Settings) -> dict[str, object]:
    """The SDK's own environment configuration (profiles, TLS, API key), with the address and
    namespace from our settings when they were set there explicitly."""
    env = dict(os.environ)
    for name in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE"):
        if name in settings.model_fields_set:
            env[name] = str(getattr(settings, name))
    config: dict[str, object] = dict(ClientConfig.load_client_connect_config(override_env_vars=env))
    config.setdefault("target_host", settings.TEMPORAL_ADDRESS)
    config.setdefault("namespace", settings.TEMPORAL_NAMESPACE)
    return config


async def connect_temporal(
    settings: Settings,
    *,
    interceptors: Sequence[Interceptor] = (),
    runtime: Runtime | None = None,
    lazy: bool = False,
) -> Client:
    config = client_connect_config(settings)
    target = str(config.pop("target_host"))
    return await Client.connect(
        target,
        interceptors=interceptors,
        runtime=runtime,
        lazy=lazy,
        **config,  # type: ignore[arg-type]
    )


async def start_order_workflow(
    client: Client,
    order_id: str,
    task_queue: str,
    *,
    policy: StepPolicy | None = None,
    rpc_timeout: timedelta | None = None,
    start_signal: str | None = None,
    start_signal_args: Sequence[Any] = (),
    eager: bool = False,
) -> WorkflowHandle[object, OrderWorkflowStatus]:
    """Starts the order's workflow, or finds the one already started: the workflow ID is the
    order ID, so a second start (a retried request, the relay) never makes a second workflow.

    With `start_signal` it is a signal-with-start: the signal reaches the workflow whether or not
    it was started yet; a closed workflow raises WorkflowAlreadyStartedError (the signal was lost).
    `eager` asks for the first workflow task in the answer; it only helps a client that a worker
    on `task_queue` also uses. `policy` (core/policy.py) travels in the input and spares the
    workflow loading it; without one, the workflow loads the worker's.
    """
    try:
        return await client.start_workflow(
            ORDER_WORKFLOW,
            OrderWorkflowInput(order_id, policy),
            id=order_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(ORDER_STATUS_ATTRIBUTE, OrderStatus.PROCESSING.value)]
            ),
            result_type=OrderWorkflowStatus,
            rpc_timeout=rpc_timeout,
            start_signal=start_signal,
            start_signal_args=start_signal_args,
            request_eager_start=eager,
        )
    except WorkflowAlreadyStartedError:
        if start_signal is not None:
            raise
        # The workflow ran and closed already: it was started, which is all the caller needs.
        return client.get_workflow_handle(order_id, result_type=OrderWorkflowStatus)


# How long the "is the server there?" probe after an unanswered command may take.
HEALTH_PROBE_SECONDS = 2.0


def temporal_unavailable(failure: BaseException) -> DependencyUnavailable:
    """What an operator's tool answers when Temporal cannot be reached: 503, retry later."""
    return DependencyUnavailable(
        TEMPORAL, f"Temporal cannot be reached ({type(failure).__name__}); retry later"
    )


async def ensure_server_reachable(client: Client, silence: BaseException) -> None:
    """After a command nobody answered in time, tells "no worker took it" (the server is there:
    the caller answers 504) from "the server is not there" (raises: 503, try again later)."""
    try:
        async with asyncio.timeout(HEALTH_PROBE_SECONDS):
            await client.service_client.check_health()
    except Exception as failure:
        raise temporal_unavailable(failure) from silence
