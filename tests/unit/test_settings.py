"""Settings read from the environment: API keys comma separated and kept out of repr, and the
webhook secret that production requires."""

from __future__ import annotations

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
