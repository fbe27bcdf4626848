"""`orderflow` as an operator runs it: the installed console script in a subprocess, configured by
environment variables only, against the test database, the dev server and the dev sinks."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment

from core.models import DeadLetter
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import DevSinksProcess, free_port, installed_binary
from tests.integration.operator.conftest import OwnStack
from tests.support import parked_in_its_workflow, place_order, wait_for_order_status, wait_until

STEP = "notify_warehouse"


@dataclass
class Run:
    code: int
    out: str
    err: str


async def orderflow(settings: Settings, *args: str, sinks_url: str | None = None) -> Run:
    """Runs the console script without blocking the event loop the worker runs on."""
    process = await start_orderflow(settings, *args, sinks_url=sinks_url)
    return await finished(process)


async def finished(process: asyncio.subprocess.Process) -> Run:
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def start_orderflow(
    settings: Settings, *args: str, sinks_url: str | None = None
) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "DATABASE_URL": settings.DATABASE_URL,
        "TEMPORAL_ADDRESS": settings.TEMPORAL_ADDRESS,
        # A bulk retry starts its redrive on the test's queue, where the test's worker polls.
        "TEMPORAL_TASK_QUEUE": settings.TEMPORAL_TASK_QUEUE,
        "ORDERFLOW_ENV": "test",
    }
    if sinks_url:
        env["SINKS_URL"] = sinks_url
    return await asyncio.create_subprocess_exec(
        installed_binary("orderflow"),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def open_letter(api: httpx.AsyncClient, order_id: str) -> int:
    async def probe() -> int | None:
        items = (await api.get("/dead-letters", params={"order_id": order_id})).json()["items"]
        return int(items[0]["id"]) if items and items[0]["status"] == "open" else None

    found: int = await wait_until(probe, within=30, message=f"open dead letter of {order_id}")
    return found


async def test_dlq_list_show_retry_and_discard(
    api: httpx.AsyncClient,
    worker: object,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    warehouse: WarehouseReceiver,
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=400)
    retried_order, discarded_order = await place_order(api), await place_order(api)
    to_retry = await open_letter(api, retried_order)
    to_discard = await open_letter(api, discarded_order)

    listed = await orderflow(settings, "dlq", "list", "--order", retried_order)
    assert listed.code == 0, listed.err
    header, row, footer = listed.out.splitlines()
    assert header.split() == [
        "ID",
        "ORDER",
        "STEP",
        "OCC",
        "STATUS",
        "ATTEMPTS",
        "ERROR",
        "CREATED",
    ]
    # Aligned: every column starts where its heading does.
    for heading, value in (("ORDER", retried_order), ("STATUS", "open"), ("ERROR", "Warehouse")):
        assert row.index(value) == header.index(heading)
    assert row.split()[0] == str(to_retry) and footer == "1 of 1 dead letter(s)"

    shown = await orderflow(settings, "dlq", "show", str(to_retry))
    assert shown.code == 0, shown.err
    assert f"order           {retried_order}" in shown.out
    assert "error type      WarehouseRejected" in shown.out

    warehouse.faults.reset()
    retried = await orderflow(settings, "dlq", "retry", str(to_retry))
    assert retried.code == 0, retried.err
    assert f"dead letter {to_retry}" in retried.out
    await wait_for_order_status(api, retried_order, "completed")

    again = await orderflow(settings, "dlq", "retry", str(to_retry))
    assert again.code == 1 and "not open" in again.err and again.out == ""
    missing = await orderflow(settings, "dlq", "show", "999999999")
    assert missing.code == 1 and "dead letter 999999999 not found" in missing.err
    usage = await orderflow(settings, "dlq", "retry", str(to_discard), "--step", STEP)
    assert usage.code == 2 and "--all" in usage.err
    no_reason = await orderflow(settings, "dlq", "discard", str(to_discard))
    assert no_reason.code == 2 and "--reason" in no_reason.err

    discarded = await orderflow(
        settings, "dlq", "discard", str(to_discard), "--reason", "sold out", "--actor", "bob"
    )
    assert discarded.code == 0, discarded.err
    assert discarded.out.strip().endswith("discarded")
    async with sessions() as session:
        letter = await session.get(DeadLetter, to_discard)
        assert letter is not None
        assert (letter.status, letter.discarded_by, letter.discard_reason) == (
            "discarded",
            "bob",
            "sold out",
        )
    await wait_for_order_status(api, discarded_order, "completed")
    history = await orderflow(settings, "dlq", "list", "--status", "all", "--order", retried_order)
    assert "resolved" in history.out


async def test_dlq_retry_all_redrives_the_matching_letters(
    own_stack: OwnStack, warehouse: WarehouseReceiver
) -> None:
    settings, api = own_stack.settings, own_stack.api
    warehouse.faults.configure(fail_rate=1.0, status=400)
    orders = [await place_order(api) for _ in range(3)]
    letters = [await open_letter(api, order_id) for order_id in orders]
    warehouse.faults.reset()

    run = await orderflow(
        settings, "dlq", "retry", "--all", "--step", STEP, "--per-second", "10", "--follow"
    )
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    redrive_id = lines[0].split()[1].rstrip(":")
    assert lines[0] == f"redrive {redrive_id}: 3 open dead letter(s) at most 10/s"
    # Not a terminal: one plain line per change of the progress, then the summary.
    assert all(" sent, " in line for line in lines[1:-1]), run.out
    assert lines[-2].startswith("3/3 sent, 3 resolved, 0 failed again, 0 skipped")
    assert lines[-1].startswith("finished: sent 3 of 3, resolved 3, failed again 0, skipped 0")
    # The letters the redrive took are exactly the three, each resolved by its retry.
    async with own_stack.sessions() as session:
        for letter_id in letters:
            letter = await session.get(DeadLetter, letter_id)
            assert letter is not None
            assert (letter.status, letter.resolution) == ("resolved", "succeeded")
    for order_id in orders:
        await wait_for_order_status(api, order_id, "completed")
    shown = await orderflow(settings, "dlq", "redrive", "show", redrive_id)
    assert shown.code == 0, shown.err
    assert shown.out.strip() == (
        f"redrive {redrive_id}: 3/3 sent, 3 resolved, 0 failed again, 0 skipped (finished)"
    )
    over = await orderflow(settings, "dlq", "redrive", "pause", redrive_id)
    assert over.code == 1 and "over" in over.err
    unknown = await orderflow(settings, "dlq", "redrive", "show", "redrive-nope")
    assert unknown.code == 1 and "not a redrive ID" in unknown.err
    misuse = await orderflow(settings, "dlq", "retry", str(letters[0]), "--follow")
    assert misuse.code == 2 and "--all" in misuse.err
    nothing = await orderflow(settings, "dlq", "retry", "--all")
    assert (nothing.code, nothing.out.strip()) == (0, "no open dead letter matches")


async def test_dlq_retry_all_follow_exits_1_when_letters_were_skipped_and_3_without_temporal(
    own_stack: OwnStack, env: WorkflowEnvironment, warehouse: WarehouseReceiver
) -> None:
    """docs/redrive.md: --follow's exit code is 1 when letters were skipped (here one an operator
    discarded before the redrive's turn came); Temporal out of reach is 3, as for every command."""
    settings, api = own_stack.settings, own_stack.api
    warehouse.faults.configure(fail_rate=1.0, status=400)
    orders = [await place_order(api) for _ in range(3)]
    letters = [await open_letter(api, order_id) for order_id in orders]
    for order_id in orders:
        await parked_in_its_workflow(env.client, order_id, STEP)
    warehouse.faults.reset()

    nowhere = settings.model_copy(update={"TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})
    down = await orderflow(nowhere, "dlq", "retry", "--all", "--follow")
    assert down.code == 3 and "cannot reach" in down.err, down

    process = await start_orderflow(
        settings, "dlq", "retry", "--all", "--step", STEP, "--per-second", "0.5", "--follow"
    )
    assert process.stdout is not None
    first = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
    redrive_id = first.split()[1].rstrip(":")
    location = f"/dead-letters/redrives/{redrive_id}"

    async def letters_taken() -> bool:
        response = await api.get(location)
        return response.status_code == 200 and response.json()["state"] != "listing"

    await wait_until(letters_taken, message="the redrive took its letters")
    # The newest letter's turn is four seconds away at 0.5/s: an operator discards it first.
    discarded = await api.post(
        f"/dead-letters/{letters[-1]}/discard", json={"reason": "sold out", "actor": "bob"}
    )
    assert discarded.status_code == 200, discarded.text
    run = await finished(process)

    assert run.code == 1, run
    assert "sent 2 of 3, resolved 2, failed again 0, skipped 1" in run.err, run.err
    assert "last skipped" in run.err, run.err
    for order_id in orders[:-1]:
        await wait_for_order_status(api, order_id, "completed")


async def test_sinks_fault_and_heal_drive_the_dev_sinks(
    settings: Settings, devsinks_process: DevSinksProcess
) -> None:
    url = devsinks_process.http_url
    broke = await orderflow(
        settings,
        "sinks",
        "fault",
        "warehouse",
        "--fail-next",
        "2",
        "--status",
        "429",
        "--retry-after",
        "3",
        "--rate",
        "0.25",
        "--latency-ms",
        "20",
        sinks_url=url,
    )
    assert broke.code == 0, broke.err
    assert ["fail_next", "2"] in [line.split() for line in broke.out.splitlines()]
    async with httpx.AsyncClient() as http:
        faults = (await http.get(f"{url}/webhooks/faults")).json()
        assert faults == {
            "fail_next": 2,
            "fail_rate": 0.25,
            "status": 429,
            "retry_after": "3",
            "latency_ms": 20,
            "reject_recipients": [],
        }
        smtp = await orderflow(
            settings, "sinks", "fault", "smtp", "--reject", "gone@example.com", sinks_url=url
        )
        assert smtp.code == 0, smtp.err
        mail_faults = (await http.get(f"{url}/mail/faults")).json()
        assert mail_faults["reject_recipients"] == ["gone@example.com"]

        healed = await orderflow(settings, "sinks", "heal", "warehouse", sinks_url=url)
        assert healed.code == 0, healed.err
        assert (await http.get(f"{url}/webhooks/faults")).json()["fail_next"] == 0

    wrong = await orderflow(settings, "sinks", "fault", "smtp", "--retry-after", "3", sinks_url=url)
    assert wrong.code == 1 and "SMTP" in wrong.err
    refused = await orderflow(
        settings, "sinks", "fault", "warehouse", "--status", "200", sinks_url=url
    )
    assert refused.code == 1 and "refused" in refused.err
    nobody = f"http://127.0.0.1:{free_port()}"
    down = await orderflow(settings, "sinks", "heal", "smtp", sinks_url=nobody)
    assert down.code == 3 and "cannot reach" in down.err
