"""Records the histories tests/test_replay.py replays: each scenario runs one real order against
a Temporal dev server with the suite's own fixtures (database, SMTP sink, warehouse receiver,
worker, API) and writes its workflow's history as JSON beside this file.

    .venv/bin/python -m tests.histories.record            # every scenario
    .venv/bin/python -m tests.histories.record cancelled  # the scenarios whose names match

A re-recorded history replaces the file of the same name; histories recorded by earlier code
(any other file here) are kept, as they prove that workflows already running still replay.
docs/changing-the-workflow.md says when to record. The scenarios are pytest functions named
`record_*`, so the suite (which collects `test_*`) never runs them."""

from __future__ import annotations

import re
import site
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from core.dead_letters import DeadLetterOperator
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import ROOT, api_client, running_worker
from tests.support import Parker, place_order, wait_for_workflow_closed

HERE = Path(__file__).resolve().parent
# What a worker's identity is recorded as: the real one names the host and the process.
IDENTITY = "orderflow-recorder"
# A frame of a stack trace that still names an absolute path after normalising.
ABSOLUTE_FRAME = re.compile(r'File \\"/')


def normalise(history_json: str) -> str:
    """The history with nothing of the machine it was recorded on: stack-trace paths are made
    relative to the repository, the installed packages or the standard library, and the worker's
    pid@host (its identity, and the name of its sticky task queue) is replaced. Replay reads
    neither, so a history replays the same after."""
    text = history_json
    for directory in sorted(_installed_package_dirs(), key=len, reverse=True):
        text = text.replace(f"{directory}/", "<site-packages>/")
    text = text.replace(f"{ROOT}/", "")
    text = text.replace(f"{sysconfig.get_paths()['stdlib']}/", "<python>/")
    # Paths of another checkout or interpreter (a history recorded elsewhere).
    text = re.sub(r'(?:/[^/"\\\s]+)+/site-packages/', "<site-packages>/", text)
    text = re.sub(r'(?:/[^/"\\\s]+)+/lib/python3\.\d+/', "<python>/", text)
    text = re.sub(
        r'(?:/[^/"\\\s]+)+/(?=(?:activities|api|bench|core|devsinks|tests|workflows)/)', "", text
    )
    text = re.sub(r'"identity": "[^"]*"', f'"identity": "{IDENTITY}"', text)
    # A worker's sticky task queue is named after its identity.
    text = re.sub(r'"name": "[^"@]*@[^"]*-([0-9a-f]{32})"', rf'"name": "{IDENTITY}-\1"', text)
    if ABSOLUTE_FRAME.search(text):
        raise ValueError("a stack trace still names an absolute path; extend normalise()")
    return text


def _installed_package_dirs() -> set[str]:
    return {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}


async def save(client: Client, order_id: str, name: str) -> None:
    await wait_for_workflow_closed(client, order_id)
    history = await client.get_workflow_handle(order_id).fetch_history()
    path = HERE / f"{name}.json"
    path.write_text(normalise(history.to_json()) + "\n")


async def record_succeeded(
    env: WorkflowEnvironment, worker: object, api: httpx.AsyncClient
) -> None:
    await save(env.client, await place_order(api), "order_succeeded")


async def record_retried_then_succeeded(
    env: WorkflowEnvironment, worker: object, api: httpx.AsyncClient, warehouse: WarehouseReceiver
) -> None:
    # The local first attempt fails; the second, an activity task, succeeds.
    warehouse.faults.configure(fail_next=1, status=503)
    await save(env.client, await place_order(api), "order_retried_then_succeeded")


async def record_parked_then_retried(
    env: WorkflowEnvironment,
    parker: Parker,
    api: httpx.AsyncClient,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=503)
    letter = await parker.park(api)
    warehouse.faults.reset()
    await DeadLetterOperator(sessions, env.client).retry(letter.id)
    await save(env.client, letter.order_id, "order_parked_then_retried")


async def record_parked_then_discarded(
    env: WorkflowEnvironment,
    parker: Parker,
    api: httpx.AsyncClient,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=503)
    letter = await parker.park(api)
    operator = DeadLetterOperator(sessions, env.client)
    await operator.discard(letter.id, "shipped by hand", "recorder")
    await save(env.client, letter.order_id, "order_parked_then_discarded")


async def record_cancelled_before_its_steps_ran(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    api: httpx.AsyncClient,
) -> None:
    # No worker polls yet: the cancel is in the history before the first workflow task.
    order_id = await place_order(api)
    assert (await api.post(f"/orders/{order_id}/cancel")).status_code == 202
    async with running_worker(env.client, settings, sessions):
        await save(env.client, order_id, "order_cancelled_before_its_steps_ran")


async def record_cancelled_while_parked(
    env: WorkflowEnvironment, parker: Parker, api: httpx.AsyncClient, warehouse: WarehouseReceiver
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=503)
    letter = await parker.park(api)
    assert (await api.post(f"/orders/{letter.order_id}/cancel")).status_code == 202
    await save(env.client, letter.order_id, "order_cancelled_while_parked")


async def record_park_timed_out(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    waiting_briefly = settings.model_copy(update={"PARK_TIMEOUT_SECONDS": 1.0})
    warehouse.faults.configure(fail_rate=1.0, status=503)
    async with (
        running_worker(env.client, waiting_briefly, sessions),
        api_client(waiting_briefly) as api,
    ):
        await save(env.client, await place_order(api), "order_park_timed_out")


def main(scenarios: list[str]) -> int:
    started = time.time()
    selection = ["-k", " or ".join(scenarios)] if scenarios else []
    status = pytest.main(
        [
            str(Path(__file__)),
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "python_functions=record_*",
            "-o",
            "addopts=",
            *selection,
        ]
    )
    for path in sorted(HERE.glob("*.json")):
        if path.stat().st_mtime >= started:
            print(f"recorded {path.relative_to(ROOT)}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
