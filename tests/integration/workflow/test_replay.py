"""Workflows already running keep running: histories recorded before a change to OrderWorkflow
replay with the code as it is now (temporalio's Replayer raises on any nondeterminism).

tests/histories/*_before_local_first.json were recorded with every step attempt an activity task
(before STEP_FIRST_ATTEMPT existed): their policy lacks `first_attempt`, and must decode to the
shape they ran with.

order_dead_lettered_a_database_outage_before_ride_out.json was recorded by a worker whose
activities already raised DatabaseUnavailable but whose workflow still dead-lettered it (a mixed
fleet mid-deploy): without the workflow.patched guard it would replay as a ride-out and fail.
order_rode_out_a_database_outage.json rode one out: its steps were waited out and run again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from core.tracing import sandbox_runner
from workflows.order import OrderWorkflow

HISTORIES = sorted((Path(__file__).resolve().parents[2] / "histories").glob("*.json"))


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
async def test_a_recorded_history_replays_with_the_current_workflow(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, await asyncio.to_thread(path.read_text))
    replayer = Replayer(workflows=[OrderWorkflow], workflow_runner=sandbox_runner())
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
