"""The peer: orderflow's flow on Celery with Redis, as a team would build it without Temporal.

The API (bench.celery_peer.api:app) charges through the same SandboxGateway, writes the order row
and enqueues the two follow-ups; the worker (`celery -A bench.celery_peer.tasks worker`) sends the
receipt and the webhook with acks_late, bounded retries with full-jitter backoff, and pushes a task
that gives up onto a Redis dead-letter list. It gives up what Temporal keeps: a durable history
per order, per-order state an operator can query, and a retry button (the dead-letter list is
JSON blobs a person must replay by hand)."""
