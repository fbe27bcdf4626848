"""Settings read from the environment: API keys comma separated and kept out of repr, the
webhook secret that production requires, and the worker processes' default and bounds."""

from __future__ import annotations

import os
import uuid

import pytest
from pydantic import ValidationError

from core.settings import Settings

ORDER_KEY = "order-key-" + uuid.uuid4().hex
ADMIN_KEY = "admin-key-" + uuid.uuid4().hex


def test_keys_are_read_comma_separated_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_KEYS", " first-key, second-key ,,")
    monkeypatch.setenv("ADMIN_API_KEYS", "admin-one")
    settings = Settings()
    assert [key.get_secret_value() for key in settings.API_KEYS] == ["first-key", "second-key"]
    assert [key.get_secret_value() for key in settings.ADMIN_API_KEYS] == ["admin-one"]
    assert "first-key" not in repr(settings) and "admin-one" not in repr(settings)


@pytest.mark.parametrize("secret", [None, ""])
def test_production_settings_require_the_webhook_secret(secret: str | None) -> None:
    with pytest.raises(ValidationError, match="WEBHOOK_SIGNING_SECRET is required"):
        Settings(
            ORDERFLOW_ENV="production",
            WEBHOOK_SIGNING_SECRET=secret,
            API_KEYS=ORDER_KEY,
            ADMIN_API_KEYS=ADMIN_KEY,
        )


@pytest.mark.parametrize(
    ("cores", "processes"), [(1, 1), (2, 1), (3, 2), (4, 2), (6, 4), (8, 4), (64, 4)]
)
def test_worker_processes_default_to_two_thirds_of_the_usable_cores_up_to_four(
    cores: int, processes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORKER_PROCESSES", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    settings = Settings()
    assert processes == settings.WORKER_PROCESSES


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "many", ""])
def test_worker_processes_below_one_or_not_a_whole_number_are_refused(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_PROCESSES", value)
    with pytest.raises(ValidationError, match="WORKER_PROCESSES"):
        Settings()
