"""The bench's receivers in a process of their own: the project's SMTP sink and warehouse
receiver, in memory only, each with a fixed latency per call and the fault controls over HTTP.

    python -m bench.sinks --smtp-port P --http-port Q --smtp-latency-ms 200 --http-latency-ms 300
"""

from __future__ import annotations

import argparse
import asyncio
import os

import uvicorn
from aiosmtpd.controller import Controller

from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver, create_app


class CountingMailSink(MailSink):
    """Keeps no message bodies: at thousands of orders the sink must not be what grows."""

    def __init__(self) -> None:
        super().__init__(maildir=None)
        self.accepted = 0

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        answer = await super().handle_DATA(server, session, envelope)
        if answer.startswith("250"):
            self.accepted += 1
            self.messages.clear()
        return answer


async def serve(smtp_port: int, http_port: int, smtp_latency: int, http_latency: int) -> None:
    secret = os.environ.get("WEBHOOK_SIGNING_SECRET", "bench-secret").encode()
    receiver = WarehouseReceiver(secret)
    receiver.faults.configure(latency_ms=http_latency)
    mail = CountingMailSink()
    mail.faults.configure(latency_ms=smtp_latency)
    smtp = Controller(mail, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    app = create_app(receiver)
    app.include_router(mail.router())

    @app.get("/bench/counts")
    async def counts() -> dict[str, int]:
        """What the receivers accepted, for the harness to cross-check a drain."""
        return {"mail": mail.accepted, "webhooks": len(receiver.accepted)}

    config = uvicorn.Config(
        app, host="127.0.0.1", port=http_port, log_level="warning", access_log=False
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        smtp.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--smtp-latency-ms", type=int, default=0)
    parser.add_argument("--http-latency-ms", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.smtp_port, args.http_port, args.smtp_latency_ms, args.http_latency_ms))


if __name__ == "__main__":
    main()
