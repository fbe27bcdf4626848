"""The durable peer: orderflow's flow on DBOS Transact, a durable-workflow library that keeps its
state in the application's own database instead of a workflow server.

One process does everything (`uvicorn bench.dbos_peer.api:app`): the API charges through the same
SandboxGateway, writes the order row and starts one DBOS workflow per order, with the order ID as
its workflow ID; the workflow runs in the same process, on the same event loop, and sends the
receipt and the signed webhook concurrently as two DBOS steps, each retried with exponential
backoff (DBOS's own, without jitter) up to RETRY_MAX_ATTEMPTS attempts, a permanent refusal not
retried. A step that gives up fails its workflow, which DBOS keeps as an ERROR workflow (its
dead letter, with the inputs and every step's outcome). DBOS checkpoints the workflow's start and
each step's outcome in its system database: a SQLite file beside the order database, or the
order database itself on PostgreSQL (schema `dbos`); a process that restarts with the same
executor ID re-runs its PENDING workflows from their last checkpoint at launch."""
