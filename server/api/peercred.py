"""Who is calling the admin endpoint, as the kernel says: ``SO_PEERCRED`` on its Unix socket.

``grpc.aio`` gives a handler only ``context.peer()`` (``unix:`` for a client that did not
bind its socket), never the connection's file descriptor, so the server cannot read the
caller's credentials there; and whatever the CLI puts in the call's metadata is only what
it declares. :class:`AdminSocketRelay` therefore owns the admin socket itself, as the TLS
front end owns the agent port (:mod:`server.api.tls`):

1. it accepts a connection on the admin socket and reads ``SO_PEERCRED`` (pid, uid, gid of
   the process that connected) from the accepted socket;
2. it connects to the admin gRPC server's internal socket in the server's private (0700)
   runtime directory from a client socket bound to a unique path there, and registers
   that path with the credentials before gRPC can see a call on it;
3. it relays bytes both ways and forgets the mapping when the connection ends.

:meth:`AdminSocketRelay.lookup` maps a handler's ``context.peer()`` back to the
credentials. Only the server's uid can reach the private directory, so a connection that
did not come through the relay has no credentials and is named ``uid=? pid=?``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from server.api.relay import CHUNK, ConnectionRelay, pump

__all__ = ["AdminSocketRelay", "PeerCredentials"]

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class PeerCredentials:
    """The process that connected, as ``SO_PEERCRED`` reported it when it connected."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """``SO_PEERCRED`` of a connected Unix socket (Linux)."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return PeerCredentials(pid, uid, gid)


class AdminSocketRelay(ConnectionRelay):
    """Accept on ``public_path``; relay each connection to gRPC on ``upstream``."""

    _NAME = "admin connection"

    def __init__(self, public_path: Path, *, upstream: Path, relay_dir: Path) -> None:
        super().__init__()
        self.public_path = public_path
        self.upstream = upstream
        self._relay_dir = relay_dir
        self._peers: dict[str, PeerCredentials] = {}
        self._ids = itertools.count(1)

    def lookup(self, grpc_peer: str) -> PeerCredentials | None:
        """The credentials behind ``context.peer()``, or None if not relayed by us."""
        return self._peers.get(grpc_peer)

    async def start(self) -> None:
        """Listen on the admin socket (the caller sets its mode)."""
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.public_path))

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        creds = peer_credentials(writer.get_extra_info("socket"))
        path = self._relay_dir / f"a{next(self._ids)}"
        key = f"unix:{path}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.setblocking(False)
            self._peers[key] = creds  # before gRPC can see a call on this connection
            await asyncio.get_running_loop().sock_connect(sock, str(self.upstream))
            up_reader, up_writer = await asyncio.open_unix_connection(sock=sock, limit=CHUNK)
        except BaseException:
            self._peers.pop(key, None)
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        with contextlib.suppress(OSError):
            path.unlink()  # the name stays attached to the connected socket
        self._writers.add(up_writer)
        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            self._peers.pop(key, None)
            up_writer.transport.abort()
