"""OrderWorkflow: runs an order's follow-ups, parks a step that gives up as a dead letter, and
waits for an operator to retry or discard it. Its workflow ID is the order ID.

This module holds the workflow's decisions; how it retries (`workflows/order_policy.py`) and
what it shows people (`workflows/order_details.py`) are imported passed through the sandbox.

No `from __future__ import annotations` here: the sandbox imports this module afresh for every
workflow, and the SDK then reads its handlers' type hints, which costs more from strings."""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.dead_letters import DeadLetterActivities
    from activities.orders import OrderActivities
    from activities.policy import PolicyActivities
    from activities.receipt import ReceiptActivities
    from activities.warehouse import WarehouseActivities
    from core.cancellation import CANCELLABLE_STEPS
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
    from core.names import (
        CANCEL_SIGNAL,
        DISCARD_STEP_UPDATE,
        ORDER_WORKFLOW,
        RETRY_STEP_UPDATE,
        STATUS_QUERY,
    )
    from core.states import CancelOutcome, OrderStatus, Step, StepOutcome, StepStatus
    from workflows.order_details import current_details, describe_failure
    from workflows.order_policy import (
        BOOKKEEPING_RETRY,
        BOOKKEEPING_TIMEOUT,
        LOCAL_FIRST_ATTEMPT_RETRY,
        POLICY_LOAD_RETRY,
        POLICY_LOAD_TIMEOUT,
        RIDE_OUT_MIN_WAIT,
        STEP_FAILURES,
        cancelled,
        claim_held,
        database_down,
        permanent,
        retry_delay,
        step_retry_policy,
    )

STEP_ACTIVITIES: dict[str, Callable[[Any, StepInput], Awaitable[StepResult]]] = {
    Step.SEND_RECEIPT: ReceiptActivities.send_receipt,
    Step.NOTIFY_WAREHOUSE: WarehouseActivities.notify_warehouse,
}
# A run of a step's attempts that ended because our own database was down is not the step's
# failure: the workflow waits (at least RIDE_OUT_MIN_WAIT, as Temporal holds a retry) and runs it
# again. Patched: a history in which such a run was dead-lettered by an earlier worker replays as
# it ran.
RIDE_OUT_DATABASE_OUTAGES = "ride-out-database-outages"
# A step's dead letter is a local activity of the workflow task that gave up on it, so a refused
# order parks with no activity task: under a rush, dead letters written as activity tasks waited
# behind the new orders' workflow tasks and parked in one late burst. Patched: a history whose
# dead letter was an activity task replays as it ran.
DEAD_LETTER_IN_THE_WORKFLOW_TASK = "dead-letter-in-the-workflow-task"


@workflow.defn(name=ORDER_WORKFLOW)
class OrderWorkflow:
    def __init__(self) -> None:
        self._order_id = ""
        self._steps: dict[str, StepState] = {step: StepState(StepStatus.PENDING) for step in STEPS}
        self._commands: dict[str, OperatorCommand] = {}
        self._published_status: OrderStatus | None = None
        self._cancel_request: CancelRequest | None = None
        # What recording the cancel found; None until then.
        self._cancel_outcome: CancelOutcome | None = None
        self._steps_done = False
        self._park_expired: list[str] = []

    @workflow.run
    async def run(self, input: OrderWorkflowInput) -> OrderWorkflowStatus:
        self._order_id = input.order_id
        self._published_status = self._overall()
        policy = input.policy
        if policy is None:  # started before the starters passed it: loaded as it was then
            policy = await workflow.execute_local_activity_method(
                PolicyActivities.load_step_policy,
                LoadPolicyInput(input.order_id),
                start_to_close_timeout=POLICY_LOAD_TIMEOUT,
                retry_policy=POLICY_LOAD_RETRY,
            )
        canceller = asyncio.create_task(self._record_cancel())
        await asyncio.gather(*(self._run_step(step, policy) for step in STEPS))
        self._steps_done = True
        await canceller
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.status()

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> OrderWorkflowStatus:
        return OrderWorkflowStatus(
            order_id=self._order_id,
            status=self._overall(),
            steps=dict(self._steps),
        )

    @workflow.signal(name=CANCEL_SIGNAL)
    def cancel(self, input: CancelRequest) -> None:
        # The first cancel counts; a repeat (a retried request) changes nothing.
        if self._cancel_request is None:
            self._cancel_request = input

    @workflow.update(name=RETRY_STEP_UPDATE)
    def retry_step(self, input: RetryStepInput) -> StepCommandResult:
        self._commands[input.step] = OperatorCommand("retry")
        return StepCommandResult(input.step, self._steps[input.step].dead_letter_id)

    @retry_step.validator
    def _validate_retry_step(self, input: RetryStepInput) -> None:
        self._require_parked(input.step, input.dead_letter_id)

    @workflow.update(name=DISCARD_STEP_UPDATE)
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
                result = await self._attempts(step, StepInput(self._order_id, redrive_of), policy)
            except STEP_FAILURES as failure:
                dead_letter_id = await self._dead_letter(step, failure)
                if dead_letter_id is None:
                    # An attempt that outlived the budget performed and recorded the effect.
                    self._set(step, status=StepStatus.SUCCEEDED, dead_letter_id=None)
                    return
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
            if result.outcome == StepOutcome.SKIPPED:
                # The attempt found the order cancelled before it touched the warehouse.
                self._set(step, status=StepStatus.SKIPPED)
                return
            self._set(step, status=StepStatus.SUCCEEDED, dead_letter_id=None, last_error=None)
            return

    async def _attempts(self, step: str, input: StepInput, policy: StepPolicy) -> StepResult:
        """Runs the step under its whole attempt and time budget; raises the last failure when it
        gives up. A run that gave up because our own database was down (its last attempt, or
        the last before its time ran out, could not reach the ledger) is not a give-up: like a
        worker that is down, it is waited out, and a fresh run with the whole budget again goes
        on counting attempts from there, for as long as the database stays down. Temporal only
        reports a run's last failure, so the downstream's failures before it cannot be told
        apart; erring on the side of another run costs a repeat with the same key, never an
        effect twice."""
        run = self._first_run(step, input, policy)
        while True:
            try:
                return await run
            except STEP_FAILURES as failure:
                down = database_down(failure)
                ended = down or claim_held(failure)
                if ended is None or not workflow.patched(RIDE_OUT_DATABASE_OUTAGES):
                    raise
                attempt, wait = ended
            waiting_for = "the database" if down else "another attempt's claim"
            await workflow.sleep(
                max(wait, RIDE_OUT_MIN_WAIT),
                summary=f"{step} waits for {waiting_for} after attempt {attempt}",
            )
            run = self._activity_attempts(
                step,
                replace(input, attempt_offset=attempt),
                policy,
                attempts_made=attempt,
                fresh_budget=True,
            )

    async def _first_run(self, step: str, input: StepInput, policy: StepPolicy) -> StepResult:
        """Local-first, the first attempt runs as a local activity inside the workflow
        task, so an order whose steps succeed at once needs no activity task at all; only a step
        whose first attempt failed goes on as an activity task (visible in the Web UI as a pending
        activity with its attempts and last failure), after the wait that failure asked for, with
        the attempts and the time that remain."""
        if policy.first_attempt != "local":
            return await self._activity_attempts(step, input, policy, attempts_made=0)
        started = workflow.now()
        try:
            return await workflow.execute_local_activity_method(
                STEP_ACTIVITIES[step],
                input,
                start_to_close_timeout=timedelta(seconds=policy.attempt_timeout_seconds),
                retry_policy=LOCAL_FIRST_ATTEMPT_RETRY,
                summary=f"{step} for order {self._order_id}",
            )
        except STEP_FAILURES as failure:
            if permanent(failure) or policy.max_attempts == 1 or cancelled(failure):
                raise
            budget = timedelta(seconds=policy.total_timeout_seconds)
            wait = retry_delay(failure, policy)
            # As Temporal does: a retry that could not start within the budget is not made.
            if workflow.now() - started + wait >= budget:
                raise
            await workflow.sleep(wait, summary=f"{step} backoff before attempt 2")
            # The time the local attempt and the wait took come off the activity's budget.
            spent = workflow.now() - started
            if spent >= budget:
                raise
        return await self._activity_attempts(
            step, replace(input, attempt_offset=1), policy, attempts_made=1, spent=spent
        )

    async def _activity_attempts(
        self,
        step: str,
        input: StepInput,
        policy: StepPolicy,
        *,
        attempts_made: int,
        spent: timedelta = timedelta(0),
        fresh_budget: bool = False,
    ) -> StepResult:
        return await workflow.execute_activity_method(
            STEP_ACTIVITIES[step],
            input,
            start_to_close_timeout=timedelta(seconds=policy.attempt_timeout_seconds),
            schedule_to_close_timeout=timedelta(seconds=policy.total_timeout_seconds) - spent,
            retry_policy=step_retry_policy(policy, attempts_made, fresh_budget=fresh_budget),
            summary=f"{step} for order {self._order_id}",
        )

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
        if self._cancel_outcome != CancelOutcome.CANCELLED:
            return False
        self._set(step, status=StepStatus.SKIPPED)
        return True

    async def _dead_letter(self, step: str, failure: BaseException) -> int | None:
        """Parks the step; None when the ledger says it succeeded after all (no letter)."""
        error_type, message = describe_failure(failure)
        occurrence = self._steps[step].occurrences + 1
        info = workflow.info()
        letter = DeadLetterInput(
            order_id=self._order_id,
            step=step,
            occurrence=occurrence,
            error_type=error_type,
            error_message=message,
            permanent=permanent(failure),
            workflow_id=info.workflow_id,
            run_id=info.run_id,
        )
        summary = f"dead-letter {step} of order {self._order_id}"
        if workflow.patched(DEAD_LETTER_IN_THE_WORKFLOW_TASK):
            recorded = await workflow.execute_local_activity_method(
                DeadLetterActivities.record_dead_letter,
                letter,
                start_to_close_timeout=BOOKKEEPING_TIMEOUT,
                retry_policy=BOOKKEEPING_RETRY,
                summary=summary,
            )
        else:
            recorded = await workflow.execute_activity_method(
                DeadLetterActivities.record_dead_letter,
                letter,
                start_to_close_timeout=BOOKKEEPING_TIMEOUT,
                retry_policy=BOOKKEEPING_RETRY,
                summary=summary,
            )
        if recorded.step_succeeded:
            return None
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

    def _overall(self) -> OrderStatus:
        return overall_status(
            (s.status for s in self._steps.values()),
            cancelled=self._cancel_outcome == CancelOutcome.CANCELLED,
        )

    def _publish(self) -> None:
        status = self._overall()
        if status != self._published_status:
            workflow.upsert_search_attributes([ORDER_STATUS_ATTRIBUTE.value_set(status)])
            self._published_status = status
        workflow.set_current_details(self._details())

    def _details(self) -> str:
        return current_details(
            self._steps,
            cancelled=self._cancel_outcome == CancelOutcome.CANCELLED,
            park_expired=self._park_expired,
        )
