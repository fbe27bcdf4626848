"""RetentionWorkflow: one run of the retention cleanup, started by its Temporal Schedule."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.retention import RetentionActivities
    from core.retention import RETENTION_WORKFLOW, Purged, RetentionInput

# Batches are short transactions; a run of MAX_BATCHES_PER_RUN of them fits well within this.
PURGE_TIMEOUT = timedelta(minutes=5)
# A database outage outlasts a few retries; the next scheduled run simply tries again.
PURGE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=5,
)
# One scheduled run deletes up to this many activities' worth of batches (with the defaults,
# 100 x 100 x 1,000 rows per table); what is left, the next scheduled run takes.
MAX_PURGES_PER_RUN = 100


@workflow.defn(name=RETENTION_WORKFLOW)
class RetentionWorkflow:
    @workflow.run
    async def run(self, input: RetentionInput) -> Purged:
        purged = await self._purge(input)
        # A shop that expires more rows per interval than one activity's batches delete would
        # grow without bound if the rest waited for the next scheduled run, so the run goes on
        # until the tables are clean, bounded so that its history stays small.
        if not workflow.patched("purge-until-clean"):
            return purged
        for _ in range(MAX_PURGES_PER_RUN - 1):
            if not purged.more:
                break
            more = await self._purge(input)
            purged = Purged(
                purged.idempotency_keys + more.idempotency_keys,
                purged.outbox_rows + more.outbox_rows,
                more.more,
            )
        return purged

    async def _purge(self, input: RetentionInput) -> Purged:
        return await workflow.execute_activity_method(
            RetentionActivities.purge_expired,
            input,
            start_to_close_timeout=PURGE_TIMEOUT,
            retry_policy=PURGE_RETRY,
        )
