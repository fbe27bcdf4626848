"""The README's click path through the Temporal Web UI, clicked: headless Debian Chromium against
the UI that the session's dev server serves, with the real worker, warehouse receiver and database.
Two orders are parked by a warehouse that refuses them; one is retried and one discarded, each with
the UI's Send an Update. With ORDERFLOW_SCREENSHOTS=1 every step is saved to docs/screenshots/
(the README's tour shows them); otherwise to test-output/, so a test run leaves the tree clean."""

from __future__ import annotations

import os
from urllib.parse import quote

import httpx
from playwright.async_api import Browser, Page, ViewportSize, expect
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from core.contracts import ORDER_STATUS_ATTRIBUTE
from core.models import DeadLetter, DeadLetterStatus
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import ROOT
from tests.e2e.browser.conftest import BROWSER_TEST
from tests.support import Parker, letter_where, wait_for_order_status, wait_for_workflow_closed

UPDATE_ACCEPTED = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
NEEDS_ATTENTION = f'{ORDER_STATUS_ATTRIBUTE.name}="needs_attention"'
DESKTOP = ViewportSize(width=1280, height=900)
# The UI polls the server and the machine is shared: actions and assertions wait this long.
UI_TIMEOUT_MS = 30_000
SCREENSHOTS = ROOT / (
    "docs/screenshots" if os.environ.get("ORDERFLOW_SCREENSHOTS") else "test-output"
)

pytestmark = BROWSER_TEST


async def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"webui-{name}.png"))


async def open_current_details(page: Page, letter: DeadLetter) -> None:
    """From the filtered list to the order's Current Details, which name the parked step."""
    await page.get_by_role("link", name=letter.order_id, exact=True).click()
    await expect(page.get_by_role("heading", level=1)).to_contain_text(letter.order_id)
    await page.get_by_role("tab", name="User Metadata").click()
    await expect(page.get_by_role("heading", name="Current Details")).to_be_visible()
    details = page.get_by_title("output").content_frame
    await expect(details.get_by_role("heading")).to_have_text(
        f"notify_warehouse is parked (dead letter {letter.id})"
    )
    await expect(details.locator("body")).to_contain_text("WarehouseRejected")
    await expect(details.locator("body")).to_contain_text('{"step": "notify_warehouse"}')


async def fill_update(page: Page, name: str, data: str) -> None:
    """More Actions → Send an Update → the update's name from the list → its JSON input."""
    await page.get_by_role("button", name="More Actions").click()
    await page.get_by_role("menuitem", name="Send an Update").click()
    dialog = page.get_by_role("dialog", name="Send an Update")
    await dialog.get_by_role("button", name="Select an Update").click()
    # The names come from the worker's workflow metadata: both of the workflow's updates.
    await expect(dialog.get_by_role("option")).to_have_text(
        ["discard_step", "retry_step", "Custom"]
    )
    await dialog.get_by_role("option", name=name, exact=True).click()
    editor = dialog.get_by_role("textbox", name="Data")
    await editor.fill(data)
    # Leaving the editor reformats a longer input over more lines, which moves Submit down: leave
    # it before clicking Submit, or the click lands where the button was.
    await editor.blur()


async def submit_update(page: Page, step_status: str) -> None:
    """Submit, and see the workflow complete with the step in `step_status` in its result."""
    dialog = page.get_by_role("dialog", name="Send an Update")
    await dialog.get_by_role("button", name="Submit").click()
    # What the UI announces to a screen reader; its visible toast fades after a few seconds.
    await expect(page.get_by_test_id("toast-live-region-polite")).to_contain_text(
        "Update successful"
    )
    await expect(dialog).to_be_hidden()
    await page.get_by_role("tab", name="Timeline").click()
    # The workflow page refreshes by itself; the badge turns once the workflow has closed.
    await expect(page.get_by_role("main").get_by_role("status").first).to_have_text("Completed")
    result = page.get_by_role("textbox", name="Result")
    await expect(result).to_contain_text('"status": "completed"')
    await expect(result).to_contain_text(f'"status": "{step_status}"')


async def test_filter_read_details_retry_and_discard_in_the_web_ui(
    browser: Browser,
    temporal_ui_port: int,
    env: WorkflowEnvironment,
    api: httpx.AsyncClient,
    parker: Parker,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # A 400 is permanent: each order is parked after one delivery, no retries to wait for.
    warehouse.faults.configure(fail_rate=1.0, status=400)
    retried = await parker.park(api)
    discarded = await parker.park(api)
    ui = f"http://127.0.0.1:{temporal_ui_port}"
    page = await browser.new_page(viewport=DESKTOP)
    page.set_default_timeout(UI_TIMEOUT_MS)

    await page.goto(f"{ui}/namespaces/default/workflows")
    await page.get_by_test_id("toggle-manual-query").click()
    await page.get_by_role("searchbox", name="Enter a query").fill(NEEDS_ATTENTION)
    await page.get_by_role("button", name="Search").click()
    await expect(page).to_have_url(
        f"{ui}/namespaces/default/workflows?query={quote(NEEDS_ATTENTION)}"
    )
    listed = page.get_by_role("table", name="Workflows")
    # Listed by the search attribute, which the workflow upserts after the dead letter is written.
    for letter in (retried, discarded):
        await expect(listed.get_by_role("link", name=letter.order_id, exact=True)).to_be_visible()
    await shoot(page, "1-filter")

    await open_current_details(page, retried)
    await shoot(page, "2-current-details")
    await page.get_by_role("button", name="More Actions").click()
    await expect(page.get_by_role("menuitem", name="Send an Update")).to_be_visible()
    await shoot(page, "3-more-actions")
    await page.keyboard.press("Escape")

    # The validator refuses a step that is not parked, and the dialog says why.
    await fill_update(page, "retry_step", '{"step": "send_receipt"}')
    dialog = page.get_by_role("dialog", name="Send an Update")
    await dialog.get_by_role("button", name="Submit").click()
    await expect(
        dialog.get_by_text("step 'send_receipt' is succeeded, not dead_lettered")
    ).to_be_visible()
    await shoot(page, "4-refused")
    await dialog.get_by_role("button", name="Cancel").last.click()

    warehouse.faults.reset()
    await fill_update(page, "retry_step", '{"step": "notify_warehouse"}')
    await shoot(page, "5-retry-step")
    await submit_update(page, "succeeded")
    await shoot(page, "6-retried")

    await wait_for_workflow_closed(env.client, retried.order_id)
    described = await env.client.get_workflow_handle(retried.order_id).describe()
    assert described.status == WorkflowExecutionStatus.COMPLETED
    assert described.typed_search_attributes.get(ORDER_STATUS_ATTRIBUTE) == "completed"
    order = await wait_for_order_status(api, retried.order_id, "completed")
    assert {s["step"]: s["status"] for s in order["steps"]}["notify_warehouse"] == "succeeded"
    resolved = await letter_where(sessions, retried.order_id, DeadLetterStatus.RESOLVED)
    assert resolved is not None and resolved.id == retried.id
    # Only the retry is in the history: a refused update leaves no trace there.
    history = env.client.get_workflow_handle(retried.order_id).fetch_history_events()
    accepted = [e async for e in history if e.event_type == UPDATE_ACCEPTED]
    assert len(accepted) == 1
    # The refused delivery, then the retried one, accepted once.
    assert [d.answered for d in warehouse.deliveries_for(retried.order_id)] == [400, 202]

    await page.goto(f"{ui}/namespaces/default/workflows?query={quote(NEEDS_ATTENTION)}")
    listed = page.get_by_role("table", name="Workflows")
    await expect(listed.get_by_role("link", name=discarded.order_id, exact=True)).to_be_visible()
    await expect(listed.get_by_role("link", name=retried.order_id, exact=True)).to_have_count(0)
    await open_current_details(page, discarded)
    reason = "the warehouse took this order by phone"
    await fill_update(page, "discard_step", f'{{"step": "notify_warehouse", "reason": "{reason}"}}')
    await shoot(page, "7-discard-step")
    await submit_update(page, "discarded")
    await shoot(page, "8-discarded")

    await wait_for_workflow_closed(env.client, discarded.order_id)
    order = await wait_for_order_status(api, discarded.order_id, "completed")
    assert {s["step"]: s["status"] for s in order["steps"]}["notify_warehouse"] == "discarded"
    gone = await letter_where(sessions, discarded.order_id, DeadLetterStatus.DISCARDED)
    assert gone is not None and gone.id == discarded.id
    assert gone.discard_reason == reason and gone.discarded_by == "operator"
    # A discard sends nothing: the warehouse still has only the refused delivery.
    assert [d.answered for d in warehouse.deliveries_for(discarded.order_id)] == [400]
    await page.close()
