"""Peer tracking for a ``grpc.aio`` server: a Unix-socket relay that knows who connected.

``grpc.aio`` does not expose a connection's file descriptor to handlers, only
``context.peer()``, so ``SO_PEERCRED`` cannot be read there. :class:`PeerTrackingProxy`
therefore owns the public socket itself:

1. it accepts a workload's connection, reads ``SO_PEERCRED`` from the accepted socket and
   pins the process (:class:`~node_agent.workload.peer.PeerProcess`: pidfd, start time, uid);
2. it opens a connection to the gRPC server's *internal* socket from a client socket
   **bound to a unique path** ``<private dir>/c-<n>``. The gRPC server reports that bound
   path as the peer (``context.peer() == "unix:<private dir>/c-<n>"``, checked against
   grpcio 1.85), so the handler finds the pinned process with :meth:`lookup`;
3. it relays bytes both ways (asyncio protocols, with back-pressure) and, when either side
   closes, closes the other and forgets the mapping.

The private directory is created 0700, so only the agent's uid can reach the internal
socket or bind a name in it: nobody can pose as another connection. The bound path is
unlinked right after ``connect()``; the kernel keeps reporting the name. Connections that
reach the internal socket without going through the relay are unknown to :meth:`lookup`
and are refused by the handler.

Alternatives rejected: an abstract-namespace client name (any local process could squat on
it), a fork of grpc or a C extension (fragile), TLS auth contexts (the Workload API has no
client authentication). The relay costs one extra local hop per message; measured with a
unary call on a 2-core VM it adds about 0.1 ms; benchmarks/workload_api.py compares the
agent with a bare gRPC echo server at 100 concurrent callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import tempfile

from node_agent.workload.errors import WorkloadError
from node_agent.workload.peer import PeerProcess, peer_credentials

__all__ = ["PeerTrackingProxy"]

log = logging.getLogger(__name__)


class _Half(asyncio.Protocol):
    """One side of a relayed connection; forwards what it reads to its partner."""

    def __init__(self, conn: _Relay) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.partner: _Half | None = None
        self.got_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        partner = self.partner
        if partner is not None and partner.transport is not None:
            partner.transport.write(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        partner = self.partner
        if partner is not None and partner.transport is not None:
            if partner.transport.can_write_eof():
                partner.transport.write_eof()
            if partner.got_eof:
                self.conn.close()
        return True  # keep our write side open until the partner is done too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.conn.close()

    def pause_writing(self) -> None:
        partner = self.partner
        if partner is not None and partner.transport is not None:
            partner.transport.pause_reading()

    def resume_writing(self) -> None:
        partner = self.partner
        if partner is not None and partner.transport is not None:
            partner.transport.resume_reading()


class _Relay:
    """One workload connection: the accepted (down) side, the internal (up) side, the peer."""

    def __init__(self, proxy: PeerTrackingProxy) -> None:
        self.proxy = proxy
        self.down = _Downstream(self)
        self.up = _Half(self)
        self.down.partner = self.up
        self.up.partner = self.down
        self.peer: PeerProcess | None = None
        self.key: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def start(self, transport: asyncio.Transport) -> None:
        """Identify the caller and connect upstream; reading waits until that is done."""
        sock = transport.get_extra_info("socket")
        try:
            creds = peer_credentials(sock)
            self.peer = PeerProcess.capture(creds)
        except (WorkloadError, OSError) as err:
            log.warning("workload connection refused", extra={"reason": str(err)})
            transport.abort()
            return
        uid = self.peer.credentials.uid
        if self.proxy.open_by_uid.get(uid, 0) >= self.proxy.max_connections_per_uid:
            log.warning(
                "workload connection refused: too many open connections for this uid",
                extra={"uid": uid, "limit": self.proxy.max_connections_per_uid},
            )
            self.peer.close()
            self.peer = None
            transport.abort()
            return
        self.proxy.open_by_uid[uid] = self.proxy.open_by_uid.get(uid, 0) + 1
        transport.pause_reading()
        self.proxy.connections.add(self)
        self.task = asyncio.get_running_loop().create_task(self._connect_upstream(transport))

    async def _connect_upstream(self, down: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        path = os.path.join(self.proxy.private_dir, f"c-{next(self.proxy.counter)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind(path)
            try:
                self.key = "unix:" + path
                assert self.peer is not None
                self.proxy.peers[self.key] = self.peer
                await loop.sock_connect(sock, self.proxy.internal_path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            await loop.create_unix_connection(lambda: self.up, sock=sock)
        except (OSError, asyncio.CancelledError) as err:
            sock.close()
            if not isinstance(err, asyncio.CancelledError):
                log.error(
                    "cannot reach the internal Workload API socket", extra={"error": str(err)}
                )
            self.close()
            return
        if not self.closed:
            down.resume_reading()

    def close(self) -> None:
        """Close both sides (flushing what is buffered) and forget the peer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for half in (self.down, self.up):
            if half.transport is not None:
                half.transport.close()
        if self.key is not None:
            self.proxy.peers.pop(self.key, None)
        if self.peer is not None:
            self.peer.close()
        if self in self.proxy.connections:
            self.proxy.connections.discard(self)
            if self.peer is not None:
                left = self.proxy.open_by_uid.get(self.peer.credentials.uid, 1) - 1
                if left > 0:
                    self.proxy.open_by_uid[self.peer.credentials.uid] = left
                else:
                    self.proxy.open_by_uid.pop(self.peer.credentials.uid, None)


class _Downstream(_Half):
    """The accepted workload side; identifies the caller when the connection is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        self.conn.start(transport)


class PeerTrackingProxy:
    """Relay from a public Unix socket to a gRPC server's internal socket, tracking callers.

    ``public_path`` is where workloads connect (created 0777, any local process may call);
    the gRPC server must listen on :attr:`internal_address`. :meth:`lookup` maps a
    handler's ``context.peer()`` to the pinned caller.
    """

    def __init__(
        self,
        public_path: str,
        private_dir: str | None = None,
        *,
        max_connections_per_uid: int = 1024,
    ) -> None:
        self.public_path = public_path
        # Each relayed connection holds a few file descriptors; one user must not be able
        # to use up the agent's and so lock every other workload out.
        self.max_connections_per_uid = max_connections_per_uid
        self.open_by_uid: dict[int, int] = {}
        self._own_dir = private_dir is None
        self.private_dir = private_dir or tempfile.mkdtemp(prefix="credo-wl-")
        st = os.lstat(self.private_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            # Whoever owns it could bind names in it and pose as another connection.
            raise PermissionError(
                f"private directory {self.private_dir} must be a directory owned by the agent"
            )
        os.chmod(self.private_dir, 0o700)
        self.internal_path = os.path.join(self.private_dir, "api.sock")
        self.peers: dict[str, PeerProcess] = {}
        self.connections: set[_Relay] = set()
        self.counter = itertools.count()
        self._server: asyncio.Server | None = None

    @property
    def internal_address(self) -> str:
        """The gRPC address the server must listen on, ``unix:<private dir>/api.sock``."""
        return "unix:" + self.internal_path

    def lookup(self, peer: str) -> PeerProcess | None:
        """The caller behind a handler's ``context.peer()``, or None if not relayed by us."""
        return self.peers.get(peer)

    async def start(self) -> None:
        """Listen on the public socket (mode 0777), replacing a stale socket file."""
        try:
            mode = os.lstat(self.public_path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise FileExistsError(f"{self.public_path} exists and is not a socket")
            os.unlink(self.public_path)  # stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.public_path)
            os.chmod(self.public_path, 0o777)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Relay(self).down, sock=sock)
        log.info("workload API listening", extra={"socket": self.public_path})

    def stop_accepting(self) -> None:
        """Stop taking new connections; existing ones keep flowing."""
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.public_path)

    async def stop(self) -> None:
        """Stop accepting, close every relayed connection, remove the private directory."""
        self.stop_accepting()
        for relay in list(self.connections):
            relay.close()
        await asyncio.sleep(0)
        if self._own_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.internal_path)
            with contextlib.suppress(OSError):
                os.rmdir(self.private_dir)
