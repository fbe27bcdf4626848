"""A TCP proxy the test controls, to cut a link between two real processes (the API and
PostgreSQL, a worker and Temporal) without stopping either: `cut()` drops every open connection
and refuses new ones, `cut(refuse=False)` accepts new ones and resets them at once (so the test
can count the attempts), `restore()` brings the link back on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._resetting = False
        # When each connection attempt arrived while the link was cut in "reset" mode.
        self.reset_attempts: list[float] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def cut(self, *, refuse: bool = True) -> None:
        """Drops every open connection; new ones are refused (`refuse`) or accepted and reset."""
        if refuse and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._resetting = not refuse
        for writer in list(self._writers):
            writer.transport.abort()
        if self._links:
            await asyncio.wait(self._links, timeout=5)

    async def restore(self) -> None:
        self._resetting = False
        if self._server is None:
            await self.start()

    async def aclose(self) -> None:
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._resetting:
            self.reset_attempts.append(time.monotonic())
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        self._writers.update((writer, upstream_writer))
        pipes = {
            asyncio.create_task(_pipe(reader, upstream_writer)),
            asyncio.create_task(_pipe(upstream_reader, writer)),
        }
        try:
            # Either side closing ends the link; a proxy keeps no half-open connection around.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            for end in (writer, upstream_writer):
                self._writers.discard(end)
                end.transport.abort()
            self._links.discard(task)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while chunk := await source.read(CHUNK):
            sink.write(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()


@asynccontextmanager
async def tcp_proxy(upstream_host: str, upstream_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(upstream_host, upstream_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.aclose()
