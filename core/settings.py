"""Every knob of the service, read from the environment (one place, UPPER_CASE names)."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The one task queue shared by the API, the worker and the tests.
DEFAULT_TASK_QUEUE = "orders"


def default_worker_processes() -> int:
    """Two thirds of the cores this process may use, 1 to 4."""
    # Affinity rather than cpu_count: a container or taskset limited to 2 cores gets 1 worker.
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # The host also runs what the workers feed: per order a worker spends 38 ms of CPU, the
    # Temporal server 16.6 ms and the API 4.3 ms (docs/capacity.md), so the workers' share is
    # about two thirds of the cores, and on 2 cores one worker leaves the other core to the rest.
    # At most 4: the stack this default is for (`make run`: one SQLite file, the dev server) has
    # one write lock that more writers only queue on.
    return max(1, min((usable or 1) * 2 // 3, 4))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=True)

    ORDERFLOW_ENV: Literal["dev", "test", "production"] = "dev"
    LOG_LEVEL: str = "INFO"
    # "auto": JSON lines when ORDERFLOW_ENV=production, readable text otherwise.
    LOG_FORMAT: Literal["auto", "json", "text"] = "auto"

    DATABASE_URL: str = "sqlite+aiosqlite:///./.data/orderflow.db"
    DATABASE_POOL_SIZE: int = Field(default=10, ge=1)
    DATABASE_MAX_OVERFLOW: int = Field(default=10, ge=0)
    DATABASE_POOL_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0)

    TEMPORAL_ADDRESS: str = "localhost:7233"
    TEMPORAL_NAMESPACE: str = "default"
    TEMPORAL_TASK_QUEUE: str = DEFAULT_TASK_QUEUE
    TEMPORAL_UI_URL: str = "http://127.0.0.1:8233"
    # The dev sinks' HTTP side (`python -m devsinks`): fault controls for `orderflow sinks`.
    SINKS_URL: str = "http://127.0.0.1:8025"

    SMTP_HOST: str = "127.0.0.1"
    SMTP_PORT: int = 1025
    SMTP_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0)
    RECEIPT_FROM: str = "orders@orderflow.localhost"

    WAREHOUSE_WEBHOOK_URL: str = "http://127.0.0.1:8025/webhooks/orders"
    WEBHOOK_SIGNING_SECRET: SecretStr | None = None
    WEBHOOK_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0)

    # Bearer tokens, comma-separated: API_KEYS for /orders, ADMIN_API_KEYS for the operator's
    # endpoints. Empty means open (dev only); the API refuses to start so in production.
    API_KEYS: Annotated[list[SecretStr], NoDecode] = []
    ADMIN_API_KEYS: Annotated[list[SecretStr], NoDecode] = []

    # Enough that the time budget (STEP_TOTAL_TIMEOUT_SECONDS) is what ends a step in a real
    # outage: 20 full-jitter waits under a 60 s cap average about 7 minutes, where 5 waited 15 s
    # at most and dead-lettered every order that met a receiver down for longer.
    RETRY_MAX_ATTEMPTS: int = Field(default=20, ge=1)
    RETRY_INITIAL_INTERVAL_SECONDS: float = Field(default=1.0, gt=0)
    RETRY_BACKOFF_COEFFICIENT: float = Field(default=2.0, ge=1.0)
    RETRY_MAX_INTERVAL_SECONDS: float = Field(default=60.0, gt=0)
    # "full" waits a random time in [0, capped exponential delay]; "none" waits the delay itself.
    RETRY_JITTER: Literal["full", "none"] = "full"
    # Seeds the jitter's random source so a test can predict the schedule.
    RETRY_JITTER_SEED: int | None = None
    # The whole budget of one step across all its attempts (schedule_to_close_timeout).
    STEP_TOTAL_TIMEOUT_SECONDS: float = Field(default=900.0, gt=0)
    STEP_ATTEMPT_TIMEOUT_SECONDS: float = Field(default=30.0, gt=0)
    # "local": each step's first attempt runs as a local activity inside the workflow's first
    # workflow task, and only a failed one goes on as an activity task (with the rest of the
    # attempts and the time budget); "activity": every attempt is an activity task.
    STEP_FIRST_ATTEMPT: Literal["local", "activity"] = "local"
    # How long a workflow with a dead-lettered step waits for an operator before it closes.
    PARK_TIMEOUT_SECONDS: float = Field(default=14 * 24 * 3600.0, gt=0)

    # A request holding an idempotency key longer than this is presumed dead; another may take over.
    IDEMPOTENCY_LEASE_SECONDS: float = Field(default=30.0, gt=0)
    # How long a key replays its first answer; a key seen again after this is a new request.
    IDEMPOTENCY_KEY_TTL_SECONDS: float = Field(default=24 * 3600.0, gt=0)
    # How long the request path waits for Temporal before leaving the start to the relay.
    WORKFLOW_START_TIMEOUT_SECONDS: float = Field(default=2.0, gt=0)
    # "outbox": answer after the commit and let the workers' outbox relay start the workflow
    # (the API never calls Temporal on the order path, so a loaded Temporal server never slows
    # a customer); "request": start the workflow before answering; "background": answer after
    # the commit and start it from the API right after.
    WORKFLOW_START_MODE: Literal["request", "background", "outbox"] = "outbox"
    # How often the relay looks for new outbox entries in "outbox" mode.
    OUTBOX_RELAY_INTERVAL_SECONDS: float = Field(default=0.05, gt=0)
    # The relay starts workflows only while the server holds fewer workflow tasks than this
    # waiting on the queue (0: no limit); the rest wait in the outbox, which costs nothing.
    OUTBOX_RELAY_MAX_BACKLOG: int = Field(default=16, ge=0)
    OUTBOX_GRACE_SECONDS: float = Field(default=5.0, ge=0)
    OUTBOX_SWEEP_INTERVAL_SECONDS: float = Field(default=2.0, gt=0)
    OUTBOX_SWEEP_BATCH: int = Field(default=100, ge=1)
    # Started outbox rows are kept this long (for diagnosis) before the cleanup deletes them.
    OUTBOX_RETENTION_SECONDS: float = Field(default=3600.0, ge=0)
    # The cleanup's Temporal Schedule: how often it runs, and how many rows one DELETE takes.
    RETENTION_INTERVAL_SECONDS: float = Field(default=600.0, gt=0)
    RETENTION_BATCH: int = Field(default=1000, ge=1)

    # Upper bounds of the worker's slots; within them it takes work only while its event loop
    # keeps up (core/admission.py): past WORKER_LOOP_LAG_TARGET_SECONDS of lag it takes no more
    # than two workflow tasks and one activity until the lag falls. 0 turns the gate off.
    WORKER_MAX_CONCURRENT_ACTIVITIES: int = Field(default=100, ge=1)
    WORKER_MAX_CONCURRENT_WORKFLOW_TASKS: int = Field(default=16, ge=1)
    WORKER_LOOP_LAG_TARGET_SECONDS: float = Field(default=0.05, ge=0)
    # Added to the worker process's niceness at start: on a host it shares with the API, the
    # customers' requests come first and the backlog waits (0 keeps the worker's priority).
    WORKER_NICENESS: int = Field(default=10, ge=0, le=19)
    WORKER_MAX_CACHED_WORKFLOWS: int = Field(default=1000, ge=0)
    WORKER_MAX_TASK_QUEUE_ACTIVITIES_PER_SECOND: float | None = Field(default=None, gt=0)
    WORKER_GRACEFUL_SHUTDOWN_SECONDS: float = Field(default=30.0, ge=0)
    # The worker's Prometheus endpoint (the SDK's metrics and ours); empty turns it off.
    WORKER_METRICS_ADDRESS: str = "127.0.0.1:9464"
    # How many worker processes `make run` starts and docker-compose.yml runs: one process works
    # on one core (the GIL), so a host with more takes more processes, not more slots.
    WORKER_PROCESSES: int = Field(default_factory=default_worker_processes, ge=1)

    # A fault point for the system suite (tests/system), inert unless set: the API process exits
    # at once (os._exit, no cleanup) right after it has committed an order and before it starts
    # the workflow, as a process killed at that moment would. Refused in production.
    FAULT_EXIT_AFTER_ORDER_COMMIT: bool = False

    @field_validator("API_KEYS", "ADMIN_API_KEYS", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str | SecretStr):
            raw = value.get_secret_value() if isinstance(value, SecretStr) else value
            return [key.strip() for key in raw.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _production_needs_secrets(self) -> Settings:
        secret = self.WEBHOOK_SIGNING_SECRET
        if self.ORDERFLOW_ENV == "production" and (secret is None or not secret.get_secret_value()):
            raise ValueError("WEBHOOK_SIGNING_SECRET is required when ORDERFLOW_ENV=production")
        if self.ORDERFLOW_ENV == "production" and self.FAULT_EXIT_AFTER_ORDER_COMMIT:
            raise ValueError("FAULT_EXIT_AFTER_ORDER_COMMIT is a test fault; never in production")
        return self

    @property
    def webhook_secret(self) -> bytes:
        if self.WEBHOOK_SIGNING_SECRET is None:
            raise RuntimeError("WEBHOOK_SIGNING_SECRET is not set; the webhook cannot be signed")
        return self.WEBHOOK_SIGNING_SECRET.get_secret_value().encode()


@lru_cache
def get_settings() -> Settings:
    return Settings()
