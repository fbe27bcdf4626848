"""The peer's Celery app and its two follow-up tasks.

Configured from the environment: BENCH_REDIS_URL, SMTP_HOST/SMTP_PORT, WAREHOUSE_WEBHOOK_URL,
WEBHOOK_SIGNING_SECRET and the same RETRY_* settings as orderflow."""

from __future__ import annotations

import json
import os
import random
import smtplib
import threading
import time
from typing import Any

import httpx
import redis
from celery import Celery, Task

from activities.receipt import build_receipt
from core.ledger import effect_key
from core.models import Order
from core.settings import Settings
from core.signing import SIGNATURE_HEADER, sign

DEAD_LETTERS = "peer:dead_letters"
DONE = "peer:done"
LAST = "peer:last"

settings = Settings()
app = Celery("orderflow_peer", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:0/0"))
app.conf.update(
    # Acknowledge after the task ran, so a worker that dies mid-task leaves it on the queue.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_local = threading.local()
_redis: redis.Redis | None = None


class PermanentFailure(Exception):
    """The downstream refused the request itself: retrying cannot help."""


def store() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:0/0"))
    return _redis


def http() -> httpx.Client:
    # One client per worker thread or process child: connections are reused across tasks.
    client: httpx.Client | None = getattr(_local, "http", None)
    if client is None:
        client = httpx.Client(timeout=settings.WEBHOOK_TIMEOUT_SECONDS)
        _local.http = client
    return client


def full_jitter(retries: int) -> float:
    ceiling = min(
        settings.RETRY_MAX_INTERVAL_SECONDS,
        settings.RETRY_INITIAL_INTERVAL_SECONDS * settings.RETRY_BACKOFF_COEFFICIENT**retries,
    )
    return random.uniform(0, ceiling)


def _follow_up(task: Task, step: str, order: dict[str, Any], effect: Any) -> None:
    try:
        effect()
    except PermanentFailure as failure:
        _dead_letter(task, step, order, failure, permanent=True)
        return
    except Exception as failure:
        if task.request.retries + 1 >= settings.RETRY_MAX_ATTEMPTS:
            _dead_letter(task, step, order, failure, permanent=False)
            return
        raise task.retry(countdown=full_jitter(task.request.retries), exc=failure) from failure
    # The harness reads when the last follow-up finished, as orderflow's ledger records it.
    pipe = store().pipeline()
    pipe.incr(f"{DONE}:{step}")
    pipe.set(LAST, time.time())
    pipe.execute()


def _dead_letter(
    task: Task, step: str, order: dict[str, Any], failure: Exception, *, permanent: bool
) -> None:
    store().rpush(
        DEAD_LETTERS,
        json.dumps(
            {
                "order_id": order["id"],
                "step": step,
                "error": f"{type(failure).__name__}: {failure}",
                "attempts": task.request.retries + 1,
                "permanent": permanent,
                "at": time.time(),
                "order": order,
            }
        ),
    )


def _order(order: dict[str, Any]) -> Order:
    return Order(
        id=order["id"],
        customer_email=order["customer_email"],
        currency=order["currency"],
        amount_cents=order["amount_cents"],
        items=order["items"],
    )


@app.task(bind=True, name="peer.send_receipt", max_retries=None)  # type: ignore[untyped-decorator]
def send_receipt(self: Task, order: dict[str, Any]) -> None:
    def send() -> None:
        message = build_receipt(_order(order), settings.RECEIPT_FROM)
        with smtplib.SMTP(
            settings.SMTP_HOST, settings.SMTP_PORT, timeout=settings.SMTP_TIMEOUT_SECONDS
        ) as smtp:
            try:
                smtp.send_message(message)
            except smtplib.SMTPResponseException as response:
                if 500 <= response.smtp_code < 600:
                    raise PermanentFailure(str(response)) from response
                raise

    _follow_up(self, "send_receipt", order, send)


@app.task(bind=True, name="peer.notify_warehouse", max_retries=None)  # type: ignore[untyped-decorator]
def notify_warehouse(self: Task, order: dict[str, Any]) -> None:
    def post() -> None:
        body = json.dumps(
            {
                "event": "order.placed",
                "order_id": order["id"],
                "currency": order["currency"],
                "amount_cents": order["amount_cents"],
                "items": [{"sku": i["sku"], "quantity": i["quantity"]} for i in order["items"]],
                "placed_at": order["placed_at"],
            },
            separators=(",", ":"),
        ).encode()
        response = http().post(
            settings.WAREHOUSE_WEBHOOK_URL,
            content=body,
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": effect_key(order["id"], "notify_warehouse"),
                SIGNATURE_HEADER: sign(settings.webhook_secret, body),
            },
        )
        status = response.status_code
        if 400 <= status < 500 and status not in (408, 425, 429):
            raise PermanentFailure(f"warehouse answered {status}")
        response.raise_for_status()

    _follow_up(self, "notify_warehouse", order, post)
