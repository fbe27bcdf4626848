"""The review page in a real browser: headless Debian Chromium driven by Playwright, against the API
served by uvicorn on loopback with the real worker, Temporal dev server and warehouse receiver.
Screenshots at laptop and phone widths land in test-output/."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.async_api import (
    Browser,
    Error,
    Page,
    ViewportSize,
    expect,
)
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.main import create_app
from core.models import DeadLetterStatus
from core.settings import Settings
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import ROOT, free_port
from tests.e2e.browser.conftest import BROWSER_TEST
from tests.support import Parker, letter_where, order_body, unique_email, wait_until

LAPTOP = ViewportSize(width=1280, height=800)
PHONE = ViewportSize(width=390, height=844)
OUTPUT = ROOT / "test-output"
FITS = """() => document.documentElement.scrollWidth <= window.innerWidth
    && [...document.querySelectorAll('.table-wrap')].every(w => w.scrollWidth <= w.clientWidth)"""

pytestmark = BROWSER_TEST


async def serve(settings: Settings) -> AsyncIterator[str]:
    """The API under a real uvicorn server on a free loopback port, for the browser to reach."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or serving.done(), within=30, message="API serving")
    assert not serving.done(), "uvicorn stopped during startup"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[str]:
    async for url in serve(settings):
        yield url


async def shoot(page: Page, name: str) -> Path:
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def test_park_see_heal_retry_resolve_in_chromium(
    browser: Browser,
    live: str,
    parker: Parker,
    warehouse: WarehouseReceiver,
    mail: MailSink,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    rejected = unique_email()
    mail.faults.configure(reject_recipients=[rejected])
    warehouse.faults.configure(fail_rate=1.0, status=500)
    async with httpx.AsyncClient(base_url=live) as http:
        letter, second, permanent = await asyncio.gather(
            parker.park(http),
            parker.park(http),
            parker.park(http, order_body(rejected)),
        )

    laptop = await browser.new_page(viewport=LAPTOP)
    await laptop.goto(f"{live}/admin")
    row = laptop.locator(f'tr[data-dead-letter="{letter.id}"]')
    await expect(row).to_be_visible()
    await expect(row).to_contain_text(letter.order_id)
    await expect(row).to_contain_text("warehouse answered 500")
    group = laptop.locator('section[data-step="notify_warehouse"]').filter(
        has=laptop.locator(f'tr[data-dead-letter="{letter.id}"]')
    )
    await expect(group.get_by_role("heading")).to_contain_text("WarehouseUnavailable")
    receipt_group = laptop.locator('section[data-step="send_receipt"]').filter(
        has=laptop.locator(f'tr[data-order="{permanent.order_id}"]')
    )
    await expect(receipt_group).to_contain_text("550")
    # The SMTP error quotes the recipient; the page shows it masked.
    await expect(receipt_group).not_to_contain_text(rejected)
    await expect(receipt_group).to_contain_text(f"{rejected[0]}***@example.com")
    # At laptop width every table fits its card: nothing to scroll sideways.
    assert await laptop.evaluate(FITS)
    await shoot(laptop, "admin-laptop")

    phone = await browser.new_page(viewport=PHONE, device_scale_factor=2, is_mobile=True)
    await phone.goto(f"{live}/admin")
    card = phone.locator(f'tr[data-dead-letter="{letter.id}"]')
    await expect(card.get_by_role("button", name="Retry")).to_be_visible()
    # Rows stack as cards: the whole card fits the phone's width, no sideways scrolling.
    box = await card.bounding_box()
    assert box is not None and box["width"] <= PHONE["width"]
    assert await phone.evaluate(FITS)
    await shoot(phone, "admin-phone")

    warehouse.faults.reset()
    await row.get_by_role("button", name="Retry").click()
    await laptop.wait_for_url(f"{live}/admin")
    await expect(laptop.locator(".flash-ok")).to_contain_text(
        f"Retrying notify_warehouse of order {letter.order_id}"
    )
    await wait_until(
        lambda: letter_where(sessions, letter.order_id, DeadLetterStatus.RESOLVED),
        within=30,
        message="dead letter resolved after the retry",
    )
    await laptop.reload()
    await expect(laptop.locator(f'tr[data-dead-letter="{letter.id}"]')).to_have_count(0)
    await expect(laptop.locator(f'tr[data-dead-letter="{second.id}"]')).to_have_count(1)

    await laptop.get_by_role("searchbox").fill(letter.order_id)
    await laptop.get_by_role("button", name="Find").click()
    await laptop.wait_for_url(f"{live}/admin/orders/{letter.order_id}")
    await expect(laptop.get_by_test_id("order-status")).to_contain_text("completed")
    resolved = laptop.locator(f'tr[data-dead-letter="{letter.id}"]')
    await expect(resolved).to_have_attribute("data-status", "resolved")
    await expect(resolved.get_by_role("button")).to_have_count(0)
    await expect(laptop.locator(".timeline")).to_contain_text("resolved by its retry")
    await shoot(laptop, "admin-order-laptop")
    await phone.goto(f"{live}/admin/orders/{letter.order_id}")
    await shoot(phone, "admin-order-phone")
    await laptop.close()
    await phone.close()


async def test_discard_with_a_reason_on_a_phone(
    browser: Browser,
    live: str,
    parker: Parker,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=500)
    async with httpx.AsyncClient(base_url=live) as http:
        letter = await parker.park(http)

    phone = await browser.new_page(viewport=PHONE, is_mobile=True)
    await phone.goto(f"{live}/admin/orders/{letter.order_id}")
    row = phone.locator(f'tr[data-dead-letter="{letter.id}"]')
    reason = row.get_by_role("textbox")
    await row.get_by_role("button", name="Discard").click()
    # The browser itself holds back a discard without a reason.
    assert await reason.evaluate("input => input.validity.valueMissing")
    assert phone.url == f"{live}/admin/orders/{letter.order_id}"
    assert await letter_where(sessions, letter.order_id, DeadLetterStatus.OPEN) is not None

    await reason.fill("warehouse already shipped it by hand")
    await row.get_by_role("button", name="Discard").click()
    await expect(phone.locator(".flash-ok")).to_contain_text("Discarded notify_warehouse")
    await expect(row).to_have_attribute("data-status", "discarded")
    await expect(row).to_contain_text("“warehouse already shipped it by hand” — admin page")
    await expect(phone.get_by_test_id("order-status")).to_contain_text("completed")
    discarded = await letter_where(sessions, letter.order_id, DeadLetterStatus.DISCARDED)
    assert (
        discarded is not None and discarded.discard_reason == "warehouse already shipped it by hand"
    )
    await shoot(phone, "admin-discarded-phone")
    await phone.close()


async def test_admin_keys_prompt_and_cross_site_posts_refused(
    browser: Browser, settings: Settings
) -> None:
    guarded = settings.model_copy(update={"ADMIN_API_KEYS": [SecretStr("browser-admin-key")]})
    async for live in serve(guarded):
        anonymous = await browser.new_page()
        # Headless Chromium cannot show the login prompt, so it abandons the navigation; the
        # challenge it got is what makes a desktop browser ask for the key.
        async with anonymous.expect_response(f"{live}/admin") as challenged:
            with pytest.raises(Error, match="AUTH"):
                await anonymous.goto(f"{live}/admin")
        answer = await challenged.value
        assert answer.status == 401
        assert "Basic" in (await answer.header_value("www-authenticate") or "")
        await anonymous.close()

        context = await browser.new_context(
            http_credentials={"username": "ops", "password": "browser-admin-key"}
        )
        page = await context.new_page()
        response = await page.goto(f"{live}/admin")
        assert response is not None and response.status == 200
        await expect(page.get_by_role("heading", level=1)).to_have_text("Parked orders")

        # Another site's page, in the same browser that now holds the credentials, posts a form.
        await page.goto("about:blank")
        await page.set_content(
            f'<form method="post" action="{live}/admin/dead-letters/1/retry">'
            '<button id="go">go</button></form>'
        )
        async with page.expect_response(f"{live}/admin/dead-letters/1/retry") as posted:
            await page.click("#go")
        assert (await posted.value).status == 403

        # The JSON API has no origin check, so it must not take the browser's Basic login at all.
        await page.goto("about:blank")
        await page.set_content(
            f'<form method="post" action="{live}/dead-letters/1/retry">'
            '<button id="go">go</button></form>'
        )
        async with page.expect_response(f"{live}/dead-letters/1/retry") as posted:
            await page.click("#go")
        assert (await posted.value).status == 401
        await context.close()
