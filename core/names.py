"""The names Temporal knows the order's workflow and its handlers by, for the code that must say
them as strings: a client that does not import the workflow, metrics and log labels, the bench.
Code that can import the workflow or the activity class refers to the method instead. The step
activities are named after their steps (`core.states.Step`)."""

from __future__ import annotations

ORDER_WORKFLOW = "OrderWorkflow"
STATUS_QUERY = "status"
CANCEL_SIGNAL = "cancel"
RETRY_STEP_UPDATE = "retry_step"
DISCARD_STEP_UPDATE = "discard_step"
RECORD_DEAD_LETTER_ACTIVITY = "record_dead_letter"
