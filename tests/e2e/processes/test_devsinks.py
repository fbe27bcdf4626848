"""The chaos controls of `make run`'s sinks, on the real `python -m devsinks` process: every fault
the warehouse receiver and the SMTP sink take, set and cleared over HTTP."""

from __future__ import annotations

import json
import time
from email.message import EmailMessage

import aiosmtplib
import httpx
import pytest

from core.signing import SIGNATURE_HEADER, sign
from tests.conftest import WEBHOOK_SECRET, DevSinksProcess
from tests.support import new_key


async def deliver(http: httpx.AsyncClient, sinks: DevSinksProcess) -> httpx.Response:
    body = json.dumps({"event": "order.placed", "order_id": new_key()}).encode()
    return await http.post(
        f"{sinks.http_url}/webhooks/orders",
        content=body,
        headers={
            "Content-Type": "application/json",
            "Idempotency-Key": new_key(),
            SIGNATURE_HEADER: sign(WEBHOOK_SECRET.encode(), body),
        },
    )


async def test_warehouse_faults_fail_next_status_rate_latency_and_retry_after(
    devsinks_process: DevSinksProcess,
) -> None:
    sinks = devsinks_process
    faults = f"{sinks.http_url}/webhooks/faults"
    async with httpx.AsyncClient(timeout=30) as http:
        set_next = await http.put(faults, json={"fail_next": 2, "status": 503})
        assert set_next.status_code == 200 and set_next.json()["fail_next"] == 2
        assert [(await deliver(http, sinks)).status_code for _ in range(3)] == [503, 503, 202]

        await http.put(faults, json={"status": 429, "retry_after": "7", "fail_next": 1})
        throttled = await deliver(http, sinks)
        assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "7")

        await http.delete(faults)
        await http.put(faults, json={"fail_rate": 0.5, "status": 500})
        answers = [(await deliver(http, sinks)).status_code for _ in range(100)]
        assert set(answers) == {500, 202}
        # Binomial(100, 0.5): outside [20, 80] has a probability below 1e-9.
        assert 20 <= answers.count(500) <= 80

        await http.put(faults, json={"fail_rate": 0.0, "latency_ms": 300})
        started = time.monotonic()
        assert (await deliver(http, sinks)).status_code == 202
        assert time.monotonic() - started >= 0.3

        assert (await http.put(faults, json={"fail_nxt": 1})).status_code == 422
        assert (await http.put(faults, json={"status": 200})).status_code == 422
        healed = await http.delete(faults)
        assert healed.json() == (await http.get(faults)).json()
        assert healed.json()["fail_next"] == 0 and healed.json()["latency_ms"] == 0
        assert (await deliver(http, sinks)).status_code == 202
        journal = (sinks.data_dir / "warehouse.jsonl").read_text().splitlines()
        assert len(journal) == 3 + 1 + 100 + 1 + 1


def receipt(to: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "orders@orderflow.localhost"
    message["To"] = to
    message["Subject"] = "test"
    message["Message-ID"] = f"<{new_key()}@orderflow.localhost>"
    message.set_content("hello")
    return message


async def test_smtp_faults_transient_permanent_rejected_rate_and_latency(
    devsinks_process: DevSinksProcess,
) -> None:
    sinks = devsinks_process
    faults = f"{sinks.http_url}/mail/faults"

    async def send(to: str = "ada@example.com") -> None:
        await aiosmtplib.send(receipt(to), hostname="127.0.0.1", port=sinks.smtp_port)

    async with httpx.AsyncClient(timeout=30) as http:
        # Without a status, a failure is a transient 451.
        assert (await http.put(faults, json={"fail_next": 1})).json()["status"] == 451
        with pytest.raises(aiosmtplib.SMTPResponseException) as transient:
            await send()
        assert transient.value.code == 451
        await send()

        await http.put(faults, json={"fail_next": 1, "status": 554})
        with pytest.raises(aiosmtplib.SMTPResponseException) as permanent:
            await send()
        assert permanent.value.code == 554

        await http.put(faults, json={"reject_recipients": ["gone@example.com"]})
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await send("gone@example.com")
        assert [r.code for r in refused.value.recipients] == [550]
        await send("ada@example.com")

        await http.put(faults, json={"fail_rate": 1.0, "status": 451})
        for _ in range(3):
            with pytest.raises(aiosmtplib.SMTPResponseException):
                await send()

        await http.put(faults, json={"fail_rate": 0.0, "latency_ms": 300})
        started = time.monotonic()
        await send()
        assert time.monotonic() - started >= 0.3

        assert (await http.put(faults, json={"retry_after": "5"})).status_code == 422
        await http.delete(faults)
        assert (await http.get(faults)).json()["reject_recipients"] == []
        await send("gone@example.com")
        accepted = (await http.get(f"{sinks.http_url}/mail")).json()
        assert [m["to"] for m in accepted] == [["ada@example.com"]] * 3 + [["gone@example.com"]]
        assert len(list((sinks.data_dir / "mail").glob("*.eml"))) == 4
