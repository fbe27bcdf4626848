"""A TCP proxy the system suite puts on every link between a process and PostgreSQL or Temporal,
so a test can cut one link (drop its connections, refuse new ones) and restore it, while the
machine's services keep running."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)
CHUNK = 64 * 1024


class Link:
    """Listens on 127.0.0.1:`port` and forwards every connection to 127.0.0.1:`upstream`."""

    def __init__(self, name: str, upstream: int, port: int) -> None:
        self.name = name
        self.upstream = upstream
        self.port = port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.cuts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    async def open(self) -> None:
        if self._server is None:
            # reuse_address (asyncio's default on Unix) lets a restored link take its port back
            # while the dropped connections sit in TIME_WAIT.
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Drops every open connection and refuses new ones until `open`."""
        self.cuts += 1
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            transport = writer.transport
            # A reset, not a polite close: the peer sees what a broken network shows it.
            with contextlib.suppress(OSError):
                transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def close(self) -> None:
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            for each in (writer, up_writer):
                each.transport.abort()
                self._writers.discard(each)
            self._pipes.difference_update(pipes)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
