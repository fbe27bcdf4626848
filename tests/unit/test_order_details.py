"""What OrderWorkflow shows people: the Web UI's Current Details of an order (what is parked, why,
and how to act on it, in commands that work as written) and the (type, message) of a step's
failure that its dead letter records."""

from __future__ import annotations

import asyncio
import json
import re
import shlex

import pytest
from fastapi.routing import APIRoute
from temporalio.exceptions import ApplicationError, CancelledError, RetryState, TimeoutType

from api.routes.dead_letters import router as dead_letters_router
from cli import parser as cli_parser
from core.contracts import DiscardStepInput, RetryStepInput, StepState
from core.names import DISCARD_STEP_UPDATE, RETRY_STEP_UPDATE
from core.states import Step, StepStatus
from tests.support import activity_error, activity_timeout
from workflows.order_details import current_details, describe_failure

RECEIPT, WAREHOUSE = Step.SEND_RECEIPT.value, Step.NOTIFY_WAREHOUSE.value
PENDING = StepState(StepStatus.PENDING)
SUCCEEDED = StepState(StepStatus.SUCCEEDED)
CANCEL_NOTICE = "Order cancelled: the warehouse notification is skipped."


def parked(dead_letter_id: int, error: str = "WarehouseRejected: 400 bad sku") -> StepState:
    return StepState(
        StepStatus.DEAD_LETTERED, dead_letter_id=dead_letter_id, last_error=error, occurrences=1
    )


def details(
    receipt: StepState = SUCCEEDED,
    warehouse: StepState = SUCCEEDED,
    *,
    cancelled: bool = False,
    park_expired: tuple[str, ...] = (),
) -> str:
    steps = {RECEIPT: receipt, WAREHOUSE: warehouse}
    return current_details(steps, cancelled=cancelled, park_expired=park_expired)


def code_spans(markdown: str) -> list[str]:
    return re.findall(r"`([^`]+)`", markdown)


# --- current_details ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("receipt", "warehouse"),
    [
        (PENDING, PENDING),  # running
        (SUCCEEDED, PENDING),
        (SUCCEEDED, SUCCEEDED),  # completed
        (SUCCEEDED, StepState(StepStatus.DISCARDED, dead_letter_id=3)),  # an operator gave up
        (StepState(StepStatus.DISCARDED, dead_letter_id=3), SUCCEEDED),
    ],
)
def test_nothing_to_act_on_shows_nothing(receipt: StepState, warehouse: StepState) -> None:
    assert details(receipt, warehouse) == ""


def test_a_parked_step_says_why_and_how_to_retry_or_give_up() -> None:
    markdown = details(warehouse=parked(42, "WarehouseRejected: 400 unknown sku"))
    assert markdown.splitlines() == [
        "## notify_warehouse is parked (dead letter 42)",
        "",
        "Why: WarehouseRejected: 400 unknown sku",
        "",
        "Fix the cause, then retry: More Actions → Send an Update → Update name "
        '`retry_step`, input `{"step": "notify_warehouse"}`',
        "(or `orderflow dlq retry 42`, or `POST /dead-letters/42/retry`).",
        'To give up: update `discard_step` with `{"step": "notify_warehouse", "reason": "..."}`.',
    ]


def test_the_ways_to_act_that_a_parked_step_names_work_as_written() -> None:
    spans = code_spans(details(receipt=parked(7, "MailboxRejected: 550 no such user")))
    update, retry_input, cli, http, discard, discard_input = spans
    # The workflow's updates, with inputs that decode into what they take.
    assert (update, discard) == (RETRY_STEP_UPDATE, DISCARD_STEP_UPDATE)
    assert RetryStepInput(**json.loads(retry_input)) == RetryStepInput(step=RECEIPT)
    assert DiscardStepInput(**json.loads(discard_input)).step == RECEIPT
    # The operator's command line takes the command.
    program, *args = shlex.split(cli)
    assert program == "orderflow"
    parsed = cli_parser().parse_args(args)
    assert (parsed.group, parsed.action, parsed.id) == ("dlq", "retry", 7)
    # The API has the route.
    method, path = http.split()
    routes = {
        (route_method, route.path.replace("{dead_letter_id}", "7"))
        for route in dead_letters_router.routes
        if isinstance(route, APIRoute)
        for route_method in route.methods or ()
    }
    assert (method, path) in routes


def test_a_step_past_its_park_timeout_says_to_discard_it_and_not_to_retry() -> None:
    markdown = details(warehouse=parked(9), park_expired=(WAREHOUSE,))
    assert markdown.splitlines() == [
        "## notify_warehouse is parked (dead letter 9)",
        "",
        "Why: WarehouseRejected: 400 bad sku",
        "",
        "The park timeout passed and the workflow stopped waiting; the dead letter stays open: "
        "discard it with `orderflow dlq discard 9 --reason ...`.",
    ]
    # The workflow no longer takes updates for the step.
    assert RETRY_STEP_UPDATE not in markdown and DISCARD_STEP_UPDATE not in markdown
    program, *args = shlex.split(code_spans(markdown)[0])
    parsed = cli_parser().parse_args(args)
    assert (program, parsed.action, parsed.id, parsed.reason) == ("orderflow", "discard", 9, "...")


def test_each_parked_step_has_its_own_section_in_step_order() -> None:
    markdown = details(
        receipt=parked(1, "MailboxRejected: 550"),
        warehouse=parked(2, "Timeout.SCHEDULE_TO_CLOSE: activity timeout"),
        park_expired=(RECEIPT,),
    )
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == [
        "## send_receipt is parked (dead letter 1)",
        "## notify_warehouse is parked (dead letter 2)",
    ]
    receipt, warehouse = markdown.split("## notify_warehouse")
    assert "Why: MailboxRejected: 550" in receipt and "`orderflow dlq discard 1" in receipt
    assert "retry_step" not in receipt
    assert "Why: Timeout.SCHEDULE_TO_CLOSE: activity timeout" in warehouse
    assert "`orderflow dlq retry 2`" in warehouse


def test_a_cancelled_order_says_so_first() -> None:
    skipped = StepState(StepStatus.SKIPPED)
    assert details(warehouse=skipped, cancelled=True).splitlines() == [CANCEL_NOTICE]
    # A receipt parked before the cancel still needs an operator.
    lines = details(parked(5, "MailboxRejected: 550"), skipped, cancelled=True).splitlines()
    assert lines[:3] == [CANCEL_NOTICE, "", "## send_receipt is parked (dead letter 5)"]
    assert "(or `orderflow dlq retry 5`, or `POST /dead-letters/5/retry`)." in lines


# --- describe_failure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "described"),
    [
        # The message alone: the type is not repeated into it.
        (
            ApplicationError("400 unknown sku", type="WarehouseRejected", non_retryable=True),
            ("WarehouseRejected", "400 unknown sku"),
        ),
        (ApplicationError("no type given"), ("ApplicationError", "no type given")),
        (
            activity_error(ApplicationError("503 busy", type="WarehouseUnavailable")),
            ("WarehouseUnavailable", "503 busy"),
        ),
        (
            activity_error(
                ApplicationError("550 no such user", type="MailboxRejected"),
                RetryState.NON_RETRYABLE_FAILURE,
            ),
            ("MailboxRejected", "550 no such user"),
        ),
        (
            activity_error(
                activity_timeout(
                    TimeoutType.SCHEDULE_TO_CLOSE,
                    ApplicationError("503 busy", type="WarehouseUnavailable"),
                ),
                RetryState.TIMEOUT,
            ),
            (
                "Timeout.SCHEDULE_TO_CLOSE",
                "activity timeout; last attempt: WarehouseUnavailable: 503 busy",
            ),
        ),
        (
            activity_error(activity_timeout(TimeoutType.START_TO_CLOSE)),
            ("Timeout.START_TO_CLOSE", "activity timeout"),
        ),
        (activity_timeout(TimeoutType.HEARTBEAT), ("Timeout.HEARTBEAT", "activity timeout")),
        (activity_timeout(None), ("Timeout.UNKNOWN", "activity timeout")),
        (CancelledError(), ("CancelledError", "Cancelled")),
        (activity_error(CancelledError("by the server")), ("CancelledError", "by the server")),
        (asyncio.CancelledError(), ("CancelledError", "")),
        (RuntimeError("a bug in the activity"), ("RuntimeError", "a bug in the activity")),
    ],
)
def test_what_a_dead_letter_records_of_a_failure(
    failure: BaseException, described: tuple[str, str]
) -> None:
    assert describe_failure(failure) == described


def test_an_activity_error_without_a_cause_describes_itself() -> None:
    failure = activity_error(ApplicationError("x"))
    failure.__cause__ = None
    assert describe_failure(failure) == ("ActivityError", "activity failed")
