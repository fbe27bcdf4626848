"""Workflows already running keep running: every history under tests/histories/ replays with the
code as it is now (temporalio's Replayer raises on any nondeterminism).
docs/changing-the-workflow.md says how to change OrderWorkflow so that this stays true.

`python -m tests.histories.record` records the histories of today's code, one per path an order
takes: order_succeeded, order_retried_then_succeeded, order_parked_then_retried,
order_parked_then_discarded, order_cancelled_before_its_steps_ran, order_cancelled_while_parked
and order_park_timed_out.

The others were recorded by earlier code and are kept as they are:
- *_before_local_first.json: every step attempt an activity task (before STEP_FIRST_ATTEMPT
  existed); their policy lacks `first_attempt`, and must decode to the shape they ran with.
- order_dead_lettered_a_database_outage_before_ride_out.json: a worker whose activities already
  raised DatabaseUnavailable but whose workflow still dead-lettered it (a mixed fleet mid-deploy);
  without the workflow.patched guard it would replay as a ride-out and fail.
- order_rode_out_a_database_outage.json: its steps were waited out and run again.
- *_before_local_dead_letter.json: a step's dead letter written by an activity task, before it
  was a local activity of the workflow task that gave up (without the workflow.patched guard
  they would fail to replay).
- *_before_policy_input.json: the retry policy loaded by the workflow's first local activity,
  before the starters passed it in the input (a workflow with no policy in its input still
  loads it, so they replay)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from core.tracing import sandbox_runner
from tests.histories.record import normalise
from workflows.order import OrderWorkflow

HISTORIES = sorted((Path(__file__).resolve().parents[2] / "histories").glob("*.json"))
RECORDED_PATHS = (
    "order_succeeded",
    "order_retried_then_succeeded",
    "order_parked_then_retried",
    "order_parked_then_discarded",
    "order_cancelled_before_its_steps_ran",
    "order_cancelled_while_parked",
    "order_park_timed_out",
)


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
async def test_a_recorded_history_replays_with_the_current_workflow(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, await asyncio.to_thread(path.read_text))
    replayer = Replayer(workflows=[OrderWorkflow], workflow_runner=sandbox_runner())
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


def test_every_path_an_order_takes_has_a_history() -> None:
    assert set(RECORDED_PATHS) <= {path.stem for path in HISTORIES}


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
def test_a_recorded_history_names_nothing_of_the_machine_it_ran_on(path: Path) -> None:
    text = path.read_text().rstrip("\n")
    assert normalise(text) == text
