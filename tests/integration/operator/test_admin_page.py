"""The review page's HTML and its actions, over HTTP (the browser test drives the same page in
Chromium): real worker, Temporal dev server, warehouse receiver and database."""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment

from core import dead_letters
from core.models import DeadLetter, DeadLetterStatus
from core.settings import Settings
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, running_worker
from tests.integration.operator.conftest import OwnStack
from tests.support import Parker, letter_where, parking, wait_until

SAME_ORIGIN = {"Origin": "http://orderflow.test"}


def flash_of(page: str) -> str:
    found = re.search(r'<p class="flash flash-(\w+)"[^>]*>([^<]*)</p>', page)
    return f"{found.group(1)}: {found.group(2)}" if found else ""


async def test_page_lists_a_parked_order_and_retry_resolves_it(
    api: httpx.AsyncClient,
    parker: Parker,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=500)
    letter = await parker.park(api)

    page = await api.get("/admin")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    row = re.search(rf'<tr data-dead-letter="{letter.id}".*?</tr>', html, re.S)
    assert row, "the parked order has a row"
    assert f'href="http://orderflow.test/admin/orders/{letter.order_id}"' in row.group(0)
    assert f"/admin/dead-letters/{letter.id}/retry" in row.group(0)
    assert f"/admin/dead-letters/{letter.id}/discard" in row.group(0)
    assert re.search(r'<input[^>]*name="reason"[^>]*required', row.group(0))
    ui = f"{settings.TEMPORAL_UI_URL}/namespaces/default/workflows/{letter.order_id}"
    assert f'href="{ui}"' in row.group(0)
    assert f'data-step="notify_warehouse" data-error-type="{letter.error_type}"' in html
    assert letter.error_type == "WarehouseUnavailable"
    # Served by the app itself: no stylesheet, script or font from anywhere else.
    assert not re.search(r'<(link|script)[^>]+(href|src)="(https?:)?//(?!orderflow\.test)', html)

    warehouse.faults.reset()
    refused = await api.post(f"/admin/dead-letters/{letter.id}/retry", data={"back": "/admin"})
    assert refused.status_code == 403, "a POST without Origin or Referer is refused"
    assert (await letter_where(sessions, letter.order_id, DeadLetterStatus.OPEN)) is not None

    retried = await api.post(
        f"/admin/dead-letters/{letter.id}/retry", data={"back": "/admin"}, headers=SAME_ORIGIN
    )
    assert retried.status_code == 303
    assert retried.headers["location"] == "/admin"
    after = await api.get("/admin")
    assert flash_of(after.text).startswith(
        f"ok: Retrying notify_warehouse of order {letter.order_id}"
    )
    assert flash_of((await api.get("/admin")).text) == "", "a flash shows once"

    await wait_until(
        lambda: letter_where(sessions, letter.order_id, DeadLetterStatus.RESOLVED),
        within=30,
        message="dead letter resolved",
    )
    assert f'data-dead-letter="{letter.id}"' not in (await api.get("/admin")).text
    order_page = (await api.get(f"/admin/orders/{letter.order_id}")).text
    assert re.search(rf'data-dead-letter="{letter.id}" data-status="resolved"', order_page)
    assert re.search(r'data-step-row="notify_warehouse">.*?badge-succeeded', order_page, re.S)
    assert "notify_warehouse occurrence 1 resolved by its retry" in order_page
    assert "notify_warehouse succeeded" in order_page
    # The workflow's own answer to the `status` query is on the page too.
    assert re.search(r'data-testid="workflow">.*?badge-completed', order_page, re.S)


async def test_discard_needs_a_reason_and_records_it(
    api: httpx.AsyncClient,
    parker: Parker,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=500)
    letter = await parker.park(api)
    back = f"/admin/orders/{letter.order_id}"
    url = f"/admin/dead-letters/{letter.id}/discard"

    blank = await api.post(url, data={"reason": "  ", "back": back}, headers=SAME_ORIGIN)
    assert blank.status_code == 303 and blank.headers["location"] == back
    assert flash_of((await api.get(back)).text).startswith("error: Discard needs a reason")
    assert (await letter_where(sessions, letter.order_id, DeadLetterStatus.OPEN)) is not None

    done = await api.post(
        url,
        data={"reason": "customer refunded by phone", "back": back},
        headers={"Referer": f"http://orderflow.test{back}"},
        auth=("alice", "unused-without-keys"),
    )
    assert done.status_code == 303
    page = (await api.get(back)).text
    assert flash_of(page).startswith(f"ok: Discarded notify_warehouse of order {letter.order_id}")
    discarded = await letter_where(sessions, letter.order_id, DeadLetterStatus.DISCARDED)
    assert discarded is not None
    assert discarded.discard_reason == "customer refunded by phone"
    assert discarded.discarded_by == "admin page (alice)"
    assert "“customer refunded by phone” — admin page (alice)" in page
    assert "notify_warehouse discarded by admin page (alice)" in page


async def test_retry_all_for_a_step_and_error_redrives_the_group(
    env: WorkflowEnvironment, own_stack: OwnStack, warehouse: WarehouseReceiver
) -> None:
    # A database of its own: "retry all" matches every open letter of the group, and this test
    # must see only the ones it parked.
    api, sessions = own_stack.api, own_stack.sessions
    async with parking(sessions, env.client) as parker:
        warehouse.faults.configure(fail_rate=1.0, status=500)
        letters = [await parker.park(api) for _ in range(3)]
        html = (await api.get("/admin")).text
        assert re.search(
            r'data-step="notify_warehouse" data-error-type="WarehouseUnavailable"', html
        )
        assert "Retry all 3 for this step and error" in html

        warehouse.faults.reset()
        response = await api.post(
            "/admin/dead-letters/retry",
            data={"step": "notify_warehouse", "error_type": "WarehouseUnavailable"},
            headers=SAME_ORIGIN,
        )
        assert (response.status_code, response.headers["location"]) == (303, "/admin")
        assert flash_of((await api.get("/admin")).text) == (
            "ok: Retrying 3 dead letter(s) for notify_warehouse / WarehouseUnavailable "
            "at 5 per second; reload to follow."
        )
        for order_id in (letter.order_id for letter in letters):
            await wait_until(
                partial(letter_where, sessions, order_id, DeadLetterStatus.RESOLVED),
                within=30,
                message=f"{order_id} resolved by the bulk retry",
            )
        html = (await api.get("/admin")).text
        assert 'data-testid="empty"' in html


async def test_search_finds_an_order_by_id_or_a_unique_fragment(
    api: httpx.AsyncClient,
    parker: Parker,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    warehouse.faults.configure(fail_rate=1.0, status=500)
    letter = await parker.park(api)
    target = f"/admin/orders/{letter.order_id}"

    exact = await api.get("/admin/orders", params={"q": f"  {letter.order_id} "})
    assert (exact.status_code, exact.headers["location"]) == (303, target)
    fragment = await api.get("/admin/orders", params={"q": letter.order_id[-12:]})
    assert (fragment.status_code, fragment.headers["location"]) == (303, target)

    missing = await api.get("/admin/orders", params={"q": "ord_nope%_"})
    assert missing.headers["location"] == "/admin"
    assert "no order matches" in flash_of((await api.get("/admin")).text)
    assert (await api.get("/admin/orders/ord_does_not_exist")).status_code == 404


async def test_css_is_served_by_the_app(api: httpx.AsyncClient) -> None:
    css = await api.get("/admin/static/admin.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert "@media (max-width: 600px)" in css.text
    assert "url(" not in css.text and "@import" not in css.text


async def test_admin_keys_guard_the_page_with_basic_or_bearer(settings: Settings) -> None:
    guarded = settings.model_copy(update={"ADMIN_API_KEYS": [SecretStr("admin-key-1")]})
    async with api_client(guarded) as client:
        anonymous = await client.get("/admin")
        assert anonymous.status_code == 401
        assert any(
            value.startswith("Basic ") for value in anonymous.headers.get_list("www-authenticate")
        ), "a browser needs a Basic challenge to show its login prompt"
        assert (await client.get("/admin", auth=("ops", "wrong"))).status_code == 401
        assert (await client.get("/admin", auth=("ops", "admin-key-1"))).status_code == 200
        bearer = {"Authorization": "Bearer admin-key-1"}
        assert (await client.get("/admin", headers=bearer)).status_code == 200

        # Basic credentials are ambient, so a form posted from another site must not pass.
        cross = await client.post(
            "/admin/dead-letters/1/retry",
            auth=("ops", "admin-key-1"),
            headers={"Origin": "http://evil.example"},
        )
        assert cross.status_code == 403
        basic = base64.b64encode(b"ops:admin-key-1").decode()
        null_origin = await client.post(
            "/admin/dead-letters/1/retry",
            headers={"Authorization": f"Basic {basic}", "Origin": "null"},
        )
        assert null_origin.status_code == 403


async def park_with_no_worker_left(
    env: WorkflowEnvironment,
    api: httpx.AsyncClient,
    settings: Settings,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> DeadLetter:
    """A parked dead letter whose workflow no worker polls any more, with the operator's command
    timeout cut to 2 s, so a retry is left unconfirmed quickly."""
    monkeypatch.setattr(dead_letters, "COMMAND_TIMEOUT_SECONDS", 2.0)
    warehouse.faults.configure(fail_rate=1.0, status=500)
    async with running_worker(env.client, settings, sessions):
        letter = await Parker(sessions, env.client).park(api)
    warehouse.faults.reset()
    return letter


async def retry_until_resolved(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
    letter: DeadLetter,
    retry: Callable[[], Awaitable[None]],
) -> None:
    """With a worker back (the normal command timeout again), `retry` is asked again while the
    letter is open, until the step has run and resolved it. The new worker first has to take the
    workflow over from the stopped one's sticky queue, which takes seconds."""
    monkeypatch.setattr(dead_letters, "COMMAND_TIMEOUT_SECONDS", 30.0)

    async def resolved_after_retrying() -> bool:
        async with sessions() as session:
            current = await session.get(DeadLetter, letter.id, populate_existing=True)
        assert current is not None
        if current.status == DeadLetterStatus.OPEN:
            await retry()
        return current.status == DeadLetterStatus.RESOLVED

    async with running_worker(env.client, settings, sessions):
        await wait_until(
            resolved_after_retrying, within=30, message="the retry ran once a worker was back"
        )


async def test_retry_without_a_worker_answers_instead_of_hanging(
    env: WorkflowEnvironment,
    api: httpx.AsyncClient,
    settings: Settings,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    letter = await park_with_no_worker_left(env, api, settings, warehouse, sessions, monkeypatch)

    response = await api.post(
        f"/admin/dead-letters/{letter.id}/retry", data={"back": "/admin"}, headers=SAME_ORIGIN
    )
    assert response.status_code == 303
    flash = flash_of((await api.get("/admin")).text)
    assert flash.startswith(f"error: Retry of dead letter {letter.id} not confirmed within 2 s")

    # Once a worker is back, the operator retries again: accepted, or refused because the first
    # update did reach the workflow after all, or because the workflow has not yet caught up
    # with its own dead letter.
    async def retry_on_the_page() -> None:
        again = await api.post(
            f"/admin/dead-letters/{letter.id}/retry", data={"back": "/admin"}, headers=SAME_ORIGIN
        )
        assert again.status_code == 303
        flash = flash_of((await api.get("/admin")).text)
        assert flash.startswith(("ok: Retrying", "error: Retry refused")), flash

    await retry_until_resolved(env, settings, sessions, monkeypatch, letter, retry_on_the_page)


async def test_api_retry_without_a_worker_answers_504_instead_of_hanging(
    env: WorkflowEnvironment,
    api: httpx.AsyncClient,
    settings: Settings,
    warehouse: WarehouseReceiver,
    sessions: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The JSON API and the CLI share the operator's timeout with the review page.
    letter = await park_with_no_worker_left(env, api, settings, warehouse, sessions, monkeypatch)

    response = await api.post(f"/dead-letters/{letter.id}/retry")
    assert response.status_code == 504
    assert "not confirmed within 2 s: is a worker running?" in response.json()["detail"]

    # With a worker back, retrying again is accepted, or refused because the first update did
    # reach the workflow after all; either way the step runs and the letter resolves.
    # Until the workflow has caught up with its own dead letter, its validator refuses (409).
    async def retry_through_the_api() -> None:
        again = await api.post(f"/dead-letters/{letter.id}/retry")
        assert again.status_code in (202, 409), again.text

    await retry_until_resolved(env, settings, sessions, monkeypatch, letter, retry_through_the_api)
