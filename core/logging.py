"""Structured logs: one event per line (JSON in production, readable text in dev), carrying the
order, workflow, step and attempt it concerns, with e-mail addresses, card tokens and secrets
masked before anything is written."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from temporalio import activity, workflow

from core.contracts import STEPS
from core.names import ORDER_WORKFLOW
from core.settings import Settings

# The fields an operator filters on, lifted to the top level of every event that has them.
CONTEXT_FIELDS = ("order_id", "workflow_id", "run_id", "step", "attempt", "dead_letter_id")
# Attributes every LogRecord carries; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_SDK_CONTEXT_KEYS = ("temporal_activity", "temporal_workflow")
# Extra keys whose values are secret whatever they look like.
_SECRET_KEY = re.compile(r"secret|password|passwd|token|authorization|api_key|signature", re.I)
_MASK = "***"

_EMAIL = re.compile(r"(?<![\w.%+-])([\w%+-])[\w.%+-]*@((?:[\w-]+\.)+[A-Za-z]{2,})")
_CARD_TOKEN = re.compile(r"\btok_[A-Za-z0-9_]+")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
_HMAC = re.compile(r"\b(v1=)[0-9a-fA-F]{16,}")

LogFormat = Literal["json", "text"]


def redact(text: str) -> str:
    """Masks e-mail local parts (a***@example.com), card tokens, bearer tokens and signatures."""
    text = _EMAIL.sub(r"\1***@\2", text)
    text = _CARD_TOKEN.sub("tok_" + _MASK, text)
    text = _BEARER.sub(r"\1 " + _MASK, text)
    return _HMAC.sub(r"\1" + _MASK, text)


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key) and value is not None:
        return _MASK
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, item) for item in value]
    return value


class RedactingFilter(logging.Filter):
    """Rewrites each record in place before any formatter sees it, so no handler writes a
    customer's address or a token, however the message was built."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            # Exception messages quote what failed (an SMTP refusal names the recipient).
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRIBUTES:
                setattr(record, key, _redact_value(key, value))
        return True


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's context: what the caller passed in `extra`, plus the order, workflow, step
    and attempt that Temporal's activity and workflow loggers attach."""
    fields: dict[str, Any] = {}
    activity_info = getattr(record, "temporal_activity", None)
    if isinstance(activity_info, Mapping):
        _lift_temporal(fields, activity_info)
        activity_type = activity_info.get("activity_type")
        if activity_type in STEPS:
            fields["step"] = activity_type
        fields["attempt"] = activity_info.get("attempt")
        fields["activity"] = activity_type
    workflow_info = getattr(record, "temporal_workflow", None)
    if isinstance(workflow_info, Mapping):
        _lift_temporal(fields, workflow_info)
        if "update_name" in workflow_info:
            fields["update"] = workflow_info["update_name"]
    for key, value in vars(record).items():
        # Underscored keys are the SDK's private markers (`__temporal_error_identifier`).
        if key not in _RECORD_ATTRIBUTES and key not in _SDK_CONTEXT_KEYS and key[0] != "_":
            fields[key] = value
    return {key: value for key, value in fields.items() if value is not None}


def _lift_temporal(fields: dict[str, Any], info: Mapping[str, Any]) -> None:
    workflow_id = info.get("workflow_id")
    fields["workflow_id"] = workflow_id
    fields["run_id"] = info.get("run_id") or info.get("workflow_run_id")
    # The order workflow's ID is the order ID, by contract.
    if info.get("workflow_type") == ORDER_WORKFLOW:
        fields["order_id"] = workflow_id


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the event's context."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in event_fields(record).items():
            event.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            event["exception"] = record.exc_text
        return json.dumps(event, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Readable in a terminal: the usual line, then the context as key=value pairs."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = event_fields(record)
        ordered = [key for key in CONTEXT_FIELDS if key in fields]
        ordered += sorted(key for key in fields if key not in CONTEXT_FIELDS)
        context = " ".join(f"{key}={fields[key]}" for key in ordered)
        if not context:
            return line
        head, newline, rest = line.partition("\n")
        return f"{head} [{context}]{newline}{rest}"


def log_format(settings: Settings, explicit: str | None = None) -> LogFormat:
    choice = (explicit or settings.LOG_FORMAT).lower()
    if choice in ("json", "text"):
        return choice  # type: ignore[return-value]
    return "json" if settings.ORDERFLOW_ENV == "production" else "text"


class _OrderflowHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module owns, so configuring twice replaces it and leaves other
    handlers (a test runner's capture, an embedding application's) alone."""


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    fmt = log_format(settings)
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h, _OrderflowHandler)]:
        root.removeHandler(existing)
    handler = _OrderflowHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(settings.LOG_LEVEL.upper())
    # uvicorn installs handlers of its own; its events go through ours so they are JSON too.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # The SDK appends its context to the message as a dict; the JSON event already has it.
    activity.logger.activity_info_on_message = fmt != "json"
    workflow.logger.workflow_info_on_message = fmt != "json"
    return handler
