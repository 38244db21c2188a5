"""What the server's two byte relays in front of gRPC share: the TLS front end on the agent
port (:mod:`server.api.tls`) and the admin socket (:mod:`server.api.peercred`).

Each accepted connection is relayed by one task; :class:`ConnectionRelay` keeps the tasks
and both ends' writers, so :meth:`~ConnectionRelay.close` can drop every connection at once
and wait (briefly) for the tasks to end. A subclass listens (``self._server``) and relays
one connection in :meth:`~ConnectionRelay._relay`, adding the upstream writer it opens to
``self._writers`` while it is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

__all__ = ["CHUNK", "ConnectionRelay", "pump"]

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
"""Bytes read at a time, and the upstream stream's buffer limit."""


class ConnectionRelay:
    """Accepted connections, each relayed by a task of its own until it ends or is dropped."""

    _ENDED: tuple[type[BaseException], ...] = (OSError, asyncio.IncompleteReadError)
    """Errors that only mean the connection ended (logged at debug level)."""
    _NAME = "connection"
    """What the debug log line calls a connection (``"<name> ended"``)."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting and drop every open connection."""
        self.stop_accepting()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=2)
            for task in pending:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._relay(reader, writer)
        except self._ENDED as err:
            log.debug(f"{self._NAME} ended", extra={"error": str(err)})
        except asyncio.CancelledError:
            # Swallowed on purpose: asyncio's stream server logs a cancelled handler task
            # as an error (Python 3.11), and a cancelled relay has nothing left to do.
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy ``src`` to ``dst`` until EOF, then pass the EOF on (or close ``dst``)."""
    try:
        while True:
            data = await src.read(CHUNK)
            if not data:
                break
            dst.write(data)
            await dst.drain()
    finally:
        if dst.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                dst.write_eof()
        else:
            dst.close()
