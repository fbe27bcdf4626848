"""Headless Debian Chromium for the browser tests, driven by Playwright."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright, expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# Playwright drives Debian's Chromium; it never downloads a browser of its own. CI must run
# these, so there a missing Chromium fails the run (tests/conftest.py).
BROWSER_TEST = [
    pytest.mark.browser,
    pytest.mark.ci_must_run,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="needs Debian chromium: apt-get install chromium"
    ),
]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium; Playwright gives each launch a fresh, empty profile."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # Pages poll servers on a machine shared with other work: assertions wait up to 30 s.
        expect.set_options(timeout=30_000)
        yield launched
        expect.set_options(timeout=None)
        await launched.close()
