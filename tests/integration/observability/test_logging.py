"""Structured logs: JSON lines in production that carry the order, workflow, step and attempt of
a real activity's events, readable text in dev, and no e-mail address, card token or secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from temporalio import activity, workflow
from temporalio.worker import Worker

from core.logging import configure_logging, redact
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.support import new_key, order_body, wait_until


class Captured:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[str]:
        return [line for line in self.stream.getvalue().splitlines() if line]

    def events(self) -> list[dict[str, Any]]:
        # Every line is one JSON object: a line that is not fails the test here.
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def capture_logs() -> Iterator[Any]:
    """Installs our handler on a buffer for the test; puts the process back as it was after."""
    root = logging.getLogger()
    level = root.level
    installed: list[logging.Handler] = []

    def install(settings: Settings) -> Captured:
        captured = Captured()
        installed.append(configure_logging(settings, captured.stream))
        return captured

    yield install
    for handler in installed:
        root.removeHandler(handler)
    root.setLevel(level)
    activity.logger.activity_info_on_message = True
    workflow.logger.workflow_info_on_message = True


def _json(settings: Settings) -> Settings:
    return settings.model_copy(update={"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"})


async def test_activity_events_are_json_lines_with_order_step_and_attempt(
    api: httpx.AsyncClient,
    worker: Worker,
    settings: Settings,
    warehouse: WarehouseReceiver,
    capture_logs: Any,
) -> None:
    captured = capture_logs(_json(settings))
    warehouse.faults.configure(fail_next=1, status=503)
    body = order_body()
    response = await api.post("/orders", json=body, headers={"Idempotency-Key": new_key()})
    order_id = response.json()["order_id"]

    def attempt_events() -> list[dict[str, Any]]:
        events = [e for e in captured.events() if e.get("order_id") == order_id]
        succeeded = [e for e in events if e.get("outcome") == "succeeded"]
        return events if len(succeeded) == 2 else []

    events = await wait_until(attempt_events, within=30, message="both steps logged success")
    retried = [
        e for e in events if e.get("step") == "notify_warehouse" and e.get("outcome") == "retried"
    ]
    assert len(retried) == 1
    [event] = retried
    assert event["workflow_id"] == order_id
    assert event["attempt"] == 1
    assert event["level"] == "info"
    assert event["logger"] == "temporalio.activity"
    assert event["error_type"] == "WarehouseUnavailable"
    # The SDK's context dict is lifted into fields, not appended to the message.
    assert "activity_id" not in event["message"]
    [healed] = [
        e for e in events if e.get("step") == "notify_warehouse" and e.get("outcome") == "succeeded"
    ]
    assert healed["attempt"] == 2
    # The customer's address went through the receipt step and never into a log line.
    assert body["customer_email"] not in captured.stream.getvalue()


def test_redaction_masks_addresses_tokens_and_secrets(
    settings: Settings, capture_logs: Any
) -> None:
    captured = capture_logs(_json(settings))
    log = logging.getLogger("orderflow.test")
    log.warning(
        "charge for jane.doe@example.com with %s failed",
        "tok_visa_4242",
        extra={
            "order_id": "ord_1",
            "customer": {"email": "bob@shop.example.org"},
            "webhook_secret": "s3cr3t",
            "authorization": "Bearer abc.def.ghi",
        },
    )
    try:
        raise RuntimeError("550 mailbox unavailable for carol@example.net")
    except RuntimeError:
        log.exception("send failed", extra={"step": "send_receipt", "attempt": 2})

    first, second = captured.events()
    assert first["message"] == "charge for j***@example.com with tok_*** failed"
    assert first["order_id"] == "ord_1"
    assert first["customer"] == {"email": "b***@shop.example.org"}
    assert first["webhook_secret"] == "***"
    assert first["authorization"] == "***"
    assert second["step"] == "send_receipt" and second["attempt"] == 2
    assert "RuntimeError" in second["exception"]
    assert "c***@example.net" in second["exception"]
    text = captured.stream.getvalue()
    for secret in ("jane.doe@", "bob@", "carol@", "tok_visa", "s3cr3t", "abc.def"):
        assert secret not in text


def test_redact_keeps_what_is_not_personal() -> None:
    assert redact("order ord_123 step notify_warehouse") == "order ord_123 step notify_warehouse"
    assert redact("sig t=1,v1=" + "ab" * 32) == "sig t=1,v1=***"
    assert (
        redact("to: x@example.com, y.z@example.co.uk") == "to: x***@example.com, y***@example.co.uk"
    )


def test_dev_logs_are_readable_text_and_level_comes_from_settings(
    settings: Settings, capture_logs: Any
) -> None:
    dev = settings.model_copy(
        update={"ORDERFLOW_ENV": "dev", "LOG_FORMAT": "auto", "LOG_LEVEL": "WARNING"}
    )
    captured = capture_logs(dev)
    log = logging.getLogger("orderflow.test")
    log.info("not shown at WARNING")
    log.warning("parked", extra={"order_id": "ord_9", "step": "notify_warehouse"})
    [line] = captured.lines()
    assert "WARNING" in line and "orderflow.test parked" in line
    assert line.endswith("[order_id=ord_9 step=notify_warehouse]")


def test_production_defaults_to_json(settings: Settings, capture_logs: Any) -> None:
    production = settings.model_copy(update={"ORDERFLOW_ENV": "production", "LOG_FORMAT": "auto"})
    captured = capture_logs(production)
    logging.getLogger("orderflow.test").warning("hello")
    [event] = captured.events()
    assert event["message"] == "hello" and event["level"] == "warning"
