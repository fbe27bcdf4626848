"""What an operator sees and does with Temporal's own tools: the `temporal` CLI (the binary
`make run` uses) finds a parked order by `OrderStatus`, shows its current details and retries it
with the `retry_step` update; every activity call carries a summary for the Web UI."""

from __future__ import annotations

import asyncio
import json

import httpx
from temporalio.testing import WorkflowEnvironment

from core.contracts import OrderWorkflowStatus
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import installed_binary
from tests.support import place_order, wait_for_order_status, wait_until

STEP = "notify_warehouse"


async def temporal(settings: Settings, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        installed_binary("temporal"),
        *args,
        "--address",
        settings.TEMPORAL_ADDRESS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_park_find_and_retry_with_the_temporal_cli(
    api: httpx.AsyncClient,
    worker: object,
    env: WorkflowEnvironment,
    settings: Settings,
    warehouse: WarehouseReceiver,
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=503)
    order_id = await place_order(api)
    await wait_for_order_status(api, order_id, "needs_attention")

    async def listed() -> bool:
        code, out = await temporal(
            settings, "workflow", "list", "--query", 'OrderStatus="needs_attention"'
        )
        return code == 0 and order_id in out

    # The list reads the visibility store, which catches up shortly after the upsert.
    await wait_until(listed, within=30, interval=0.5, message="order listed as needs_attention")

    code, described = await temporal(settings, "workflow", "metadata", "--workflow-id", order_id)
    assert code == 0, described
    assert "Current Details" in described
    assert f"{STEP} is parked" in described
    assert "WarehouseUnavailable" in described
    assert f'`{{"step": "{STEP}"}}`' in described and "retry_step" in described

    code, refused = await temporal(
        settings,
        "workflow",
        "update",
        "execute",
        "--workflow-id",
        order_id,
        "--name",
        "retry_step",
        "--input",
        '{"step": "send_receipt"}',
    )
    assert code != 0 and "not dead_lettered" in refused

    warehouse.faults.reset()
    code, updated = await temporal(
        settings,
        "workflow",
        "update",
        "execute",
        "--workflow-id",
        order_id,
        "--name",
        "retry_step",
        "--input",
        json.dumps({"step": STEP}),
    )
    assert code == 0, updated
    await wait_for_order_status(api, order_id, "completed")
    handle = env.client.get_workflow_handle(order_id, result_type=OrderWorkflowStatus)
    assert (await handle.result()).status == "completed"

    summaries = []
    for event in (await handle.fetch_history()).events:
        # Activity tasks, and the local activities a step's first attempt runs as.
        if event.user_metadata.HasField("summary"):
            summaries.append(json.loads(event.user_metadata.summary.data))
    assert f"{STEP} for order {order_id}" in summaries
    assert f"send_receipt for order {order_id}" in summaries
    assert f"dead-letter {STEP} of order {order_id}" in summaries
    # The first run and the retry; local-first, the first run is its local attempt and then its
    # activity task.
    runs = 3 if settings.STEP_FIRST_ATTEMPT == "local" else 2
    assert summaries.count(f"{STEP} for order {order_id}") == runs
