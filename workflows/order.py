"""OrderWorkflow: runs an order's follow-ups, parks a step that gives up as a dead letter, and
waits for an operator to retry or discard it. Its workflow ID is the order ID."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, RetryState
from temporalio.exceptions import TimeoutError as ActivityTimeoutError

with workflow.unsafe.imports_passed_through():
    from activities.dead_letters import DeadLetterActivities
    from activities.orders import CANCELLABLE_STEPS, CANCELLED, OrderActivities
    from activities.policy import PolicyActivities
    from activities.receipt import ReceiptActivities
    from activities.retry import PERMANENT_ERROR_TYPES
    from activities.warehouse import WarehouseActivities
    from core.contracts import (
        ORDER_STATUS_ATTRIBUTE,
        STEPS,
        CancelOrderInput,
        CancelRequest,
        DeadLetterInput,
        DiscardInput,
        DiscardStepInput,
        LoadPolicyInput,
        OperatorCommand,
        OrderWorkflowInput,
        OrderWorkflowStatus,
        RetryStepInput,
        StepCommandResult,
        StepInput,
        StepPolicy,
        StepResult,
        StepState,
        overall_status,
    )
    from core.models import StepStatus

STEP_ACTIVITIES: dict[str, Callable[[Any, StepInput], Awaitable[StepResult]]] = {
    "send_receipt": ReceiptActivities.send_receipt,
    "notify_warehouse": WarehouseActivities.notify_warehouse,
}
# Recording a dead letter is the last line of defence: it retries until the database takes it.
BOOKKEEPING_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=0,
)
BOOKKEEPING_TIMEOUT = timedelta(seconds=30)


@workflow.defn(name="OrderWorkflow")
class OrderWorkflow:
    def __init__(self) -> None:
        self._order_id = ""
        self._steps: dict[str, StepState] = {step: StepState(StepStatus.PENDING) for step in STEPS}
        self._commands: dict[str, OperatorCommand] = {}
        self._published_status = ""
        self._cancel_request: CancelRequest | None = None
        # What recording the cancel found: None until then, "cancelled" or "too_late".
        self._cancel_outcome: str | None = None
        self._steps_done = False
        self._park_expired: list[str] = []

    @workflow.run
    async def run(self, input: OrderWorkflowInput) -> OrderWorkflowStatus:
        self._order_id = input.order_id
        self._published_status = self._overall()
        policy = await workflow.execute_local_activity_method(
            PolicyActivities.load_step_policy,
            LoadPolicyInput(input.order_id),
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(maximum_attempts=0, maximum_interval=timedelta(seconds=10)),
        )
        canceller = asyncio.create_task(self._record_cancel())
        await asyncio.gather(*(self._run_step(step, policy) for step in STEPS))
        self._steps_done = True
        await canceller
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.status()

    @workflow.query(name="status")
    def status(self) -> OrderWorkflowStatus:
        return OrderWorkflowStatus(
            order_id=self._order_id,
            status=self._overall(),
            steps=dict(self._steps),
        )

    @workflow.signal(name="cancel")
    def cancel(self, input: CancelRequest) -> None:
        # The first cancel counts; a repeat (a retried request) changes nothing.
        if self._cancel_request is None:
            self._cancel_request = input

    @workflow.update(name="retry_step")
    def retry_step(self, input: RetryStepInput) -> StepCommandResult:
        self._commands[input.step] = OperatorCommand("retry")
        return StepCommandResult(input.step, self._steps[input.step].dead_letter_id)

    @retry_step.validator
    def _validate_retry_step(self, input: RetryStepInput) -> None:
        self._require_parked(input.step, input.dead_letter_id)

    @workflow.update(name="discard_step")
    async def discard_step(self, input: DiscardStepInput) -> StepCommandResult:
        dead_letter_id = self._steps[input.step].dead_letter_id
        self._commands[input.step] = OperatorCommand("discard", input.reason.strip(), input.actor)
        # Answer once the discard is on record, so the caller reads it back as discarded.
        await workflow.wait_condition(
            lambda: self._steps[input.step].status == StepStatus.DISCARDED
        )
        return StepCommandResult(input.step, dead_letter_id)

    @discard_step.validator
    def _validate_discard_step(self, input: DiscardStepInput) -> None:
        self._require_parked(input.step, input.dead_letter_id)
        if not input.reason.strip():
            raise ValueError("a discard needs a reason")

    def _require_parked(self, step: str, dead_letter_id: int | None) -> None:
        if step not in self._steps:
            raise ValueError(f"unknown step {step!r}; steps are {', '.join(STEPS)}")
        state = self._steps[step]
        if state.status != StepStatus.DEAD_LETTERED or step in self._park_expired:
            raise ValueError(f"step {step!r} is {state.status}, not dead_lettered")
        if step in self._commands:
            raise ValueError(f"step {step!r} already has a {self._commands[step].kind} pending")
        if dead_letter_id is not None and dead_letter_id != state.dead_letter_id:
            raise ValueError(
                f"dead letter {dead_letter_id} is not the parked occurrence of {step!r} "
                f"(that is {state.dead_letter_id})"
            )
        if self._cancel_request is not None and step in CANCELLABLE_STEPS:
            raise ValueError(f"order {self._order_id} is being cancelled; {step!r} will be skipped")

    async def _run_step(self, step: str, policy: StepPolicy) -> None:
        redrive_of: int | None = None
        while True:
            if await self._skipped_by_cancel(step):
                return
            try:
                result = await workflow.execute_activity_method(
                    STEP_ACTIVITIES[step],
                    StepInput(self._order_id, redrive_of),
                    start_to_close_timeout=timedelta(seconds=policy.attempt_timeout_seconds),
                    schedule_to_close_timeout=timedelta(seconds=policy.total_timeout_seconds),
                    retry_policy=_step_retry_policy(policy),
                    summary=f"{step} for order {self._order_id}",
                )
            except ActivityError as failure:
                dead_letter_id = await self._dead_letter(step, failure)
                command = await self._wait_for_operator(step, dead_letter_id, policy)
                if command is None:
                    if await self._skipped_by_cancel(step):
                        return
                    self._park_expired.append(step)
                    workflow.set_current_details(self._details())
                    return
                if command.kind == "discard":
                    await workflow.execute_activity_method(
                        DeadLetterActivities.discard_dead_letter,
                        DiscardInput(dead_letter_id, command.reason, command.actor),
                        start_to_close_timeout=BOOKKEEPING_TIMEOUT,
                        retry_policy=BOOKKEEPING_RETRY,
                        summary=f"discard {step} of order {self._order_id}",
                    )
                    self._set(step, status=StepStatus.DISCARDED)
                    return
                redrive_of = dead_letter_id
                self._set(step, status=StepStatus.PENDING)
                continue
            if result.outcome == "skipped":
                # The attempt found the order cancelled before it touched the warehouse.
                self._set(step, status=StepStatus.SKIPPED)
                return
            self._set(step, status=StepStatus.SUCCEEDED, dead_letter_id=None, last_error=None)
            return

    async def _record_cancel(self) -> None:
        """Records a cancel once it arrives, so its effect on the database happens in the order
        the workflow saw the events."""
        await workflow.wait_condition(lambda: self._cancel_request is not None or self._steps_done)
        request = self._cancel_request
        if request is None:
            return
        recorded = await workflow.execute_activity_method(
            OrderActivities.cancel_order,
            CancelOrderInput(self._order_id, request.reason, request.actor),
            start_to_close_timeout=BOOKKEEPING_TIMEOUT,
            retry_policy=BOOKKEEPING_RETRY,
            summary=f"cancel order {self._order_id}",
        )
        self._cancel_outcome = recorded.outcome
        self._publish()

    async def _skipped_by_cancel(self, step: str) -> bool:
        """True (and the step marked skipped) when a cancel took effect before this step ran."""
        if step not in CANCELLABLE_STEPS or self._cancel_request is None:
            return False
        await workflow.wait_condition(lambda: self._cancel_outcome is not None)
        if self._cancel_outcome != CANCELLED:
            return False
        self._set(step, status=StepStatus.SKIPPED)
        return True

    async def _dead_letter(self, step: str, failure: ActivityError) -> int:
        error_type, message = _describe(failure)
        occurrence = self._steps[step].occurrences + 1
        info = workflow.info()
        recorded = await workflow.execute_activity_method(
            DeadLetterActivities.record_dead_letter,
            DeadLetterInput(
                order_id=self._order_id,
                step=step,
                occurrence=occurrence,
                error_type=error_type,
                error_message=message,
                permanent=failure.retry_state == RetryState.NON_RETRYABLE_FAILURE,
                workflow_id=info.workflow_id,
                run_id=info.run_id,
            ),
            start_to_close_timeout=BOOKKEEPING_TIMEOUT,
            retry_policy=BOOKKEEPING_RETRY,
            summary=f"dead-letter {step} of order {self._order_id}",
        )
        self._set(
            step,
            status=StepStatus.DEAD_LETTERED,
            dead_letter_id=recorded.dead_letter_id,
            last_error=f"{error_type}: {message}",
            occurrences=occurrence,
        )
        return recorded.dead_letter_id

    async def _wait_for_operator(
        self, step: str, dead_letter_id: int, policy: StepPolicy
    ) -> OperatorCommand | None:
        try:
            await workflow.wait_condition(
                lambda: (
                    step in self._commands
                    or (step in CANCELLABLE_STEPS and self._cancel_request is not None)
                ),
                timeout=timedelta(seconds=policy.park_timeout_seconds),
                timeout_summary=f"{step} parked, waiting for an operator",
            )
        except TimeoutError:
            workflow.logger.warning(
                "step %s of order %s stayed parked past the park timeout; dead letter %s remains",
                step,
                self._order_id,
                dead_letter_id,
            )
            return None
        return self._commands.pop(step, None)

    def _set(self, step: str, **changes: object) -> None:
        self._steps[step] = replace(self._steps[step], **changes)  # type: ignore[arg-type]
        self._publish()

    def _overall(self) -> str:
        return overall_status(
            (s.status for s in self._steps.values()), cancelled=self._cancel_outcome == CANCELLED
        )

    def _publish(self) -> None:
        status = self._overall()
        if status != self._published_status:
            workflow.upsert_search_attributes([ORDER_STATUS_ATTRIBUTE.value_set(status)])
            self._published_status = status
        workflow.set_current_details(self._details())

    def _details(self) -> str:
        """Markdown for the Web UI's "Current Details": what is parked, why, and how to act."""
        lines: list[str] = []
        if self._cancel_outcome == CANCELLED:
            lines += ["Order cancelled: the warehouse notification is skipped.", ""]
        parked = [
            (name, s) for name, s in self._steps.items() if s.status == StepStatus.DEAD_LETTERED
        ]
        for name, state in parked:
            lines += [
                f"## {name} is parked (dead letter {state.dead_letter_id})",
                "",
                f"Why: {state.last_error}",
                "",
            ]
            if name in self._park_expired:
                lines += [
                    "The park timeout passed and the workflow stopped waiting; the dead letter "
                    f"stays open: discard it with `orderflow dlq discard {state.dead_letter_id} "
                    "--reason ...`.",
                    "",
                ]
                continue
            lines += [
                "Fix the cause, then retry: Workflow Actions → Send an Update → Update name "
                f'`retry_step`, input `{{"step": "{name}"}}`',
                f"(or `orderflow dlq retry {state.dead_letter_id}`, "
                f"or `POST /dead-letters/{state.dead_letter_id}/retry`).",
                f'To give up: update `discard_step` with `{{"step": "{name}", "reason": "..."}}`.',
                "",
            ]
        return "\n".join(lines)


def _step_retry_policy(policy: StepPolicy) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=policy.initial_interval_seconds),
        backoff_coefficient=policy.backoff_coefficient,
        maximum_interval=timedelta(seconds=policy.max_interval_seconds),
        maximum_attempts=policy.max_attempts,
        non_retryable_error_types=list(PERMANENT_ERROR_TYPES),
    )


def _describe(failure: ActivityError) -> tuple[str, str]:
    cause = failure.cause
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError", cause.message
    if isinstance(cause, ActivityTimeoutError):
        return f"Timeout.{cause.type.name if cause.type else 'UNKNOWN'}", str(cause)
    if cause is not None:
        return type(cause).__name__, str(cause)
    return type(failure).__name__, str(failure)
