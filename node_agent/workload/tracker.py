"""Peer tracking for a ``grpc.aio`` server: a Unix-socket relay that knows who connected.

``grpc.aio`` does not expose a connection's file descriptor to handlers, only
``context.peer()``, so ``SO_PEERCRED`` cannot be read there. :class:`PeerTrackingProxy`
therefore owns the public socket itself:

1. a thread of its own accepts a workload's connection, reads ``SO_PEERCRED`` (and
   ``SO_PEERPIDFD``) from the accepted socket and pins the process at once
   (:class:`~node_agent.workload.peer.PeerProcess`: pidfd, start time, uid, executable),
   or sheds it when its uid has too many open connections or connects too fast;
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
import errno
import itertools
import logging
import os
import socket
import stat
import tempfile
import threading
import time

from node_agent.workload.errors import WorkloadError
from node_agent.workload.peer import PeerProcess, peer_credentials, peer_pidfd

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

    def __init__(self, proxy: PeerTrackingProxy, peer: PeerProcess) -> None:
        self.proxy = proxy
        self.down = _Half(self)
        self.up = _Half(self)
        self.down.partner = self.up
        self.up.partner = self.down
        self.peer = peer
        self.key: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    async def run(self, conn: socket.socket) -> None:
        """Wrap the accepted socket, then connect upstream; reading waits until that is done."""
        loop = asyncio.get_running_loop()
        try:
            conn.setblocking(False)
            down, _ = await loop.connect_accepted_socket(lambda: self.down, sock=conn)
        except (OSError, asyncio.CancelledError):
            conn.close()
            self.close()
            return
        assert isinstance(down, asyncio.Transport)
        if self.closed:
            down.close()
            return
        down.pause_reading()
        await self._connect_upstream(down)

    async def _connect_upstream(self, down: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        path = os.path.join(self.proxy.private_dir, f"c-{next(self.proxy.counter)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind(path)
            try:
                self.key = "unix:" + path
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
        self.peer.close()
        if self in self.proxy.connections:
            self.proxy.connections.discard(self)
            self.proxy.release(self.peer.credentials.uid)


ACCEPT_NICE = -10
"""Nice value of the accept thread where the agent may raise it (root): a user churning
connections from many processes must not out-run the agent's accepting them."""


def _raise_priority() -> None:
    # Not permitted (not root): the thread keeps the process's priority.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ACCEPT_NICE)


class _Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def take(self, rate: float, burst: float, now: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _RefusalLog:
    """Counts refused connections and logs one summary line per interval, not one per refusal.

    A user who opens connections as fast as they can must not be able to fill the disk
    with the agent's log.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -interval
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def refused(self, reason: str, uid: int) -> None:
        now = time.monotonic()
        with self._lock:
            key = (reason, uid)
            self._counts[key] = self._counts.get(key, 0) + 1
            if now - self._last < self.interval:
                return
            self._last = now
            counts, self._counts = self._counts, {}
        self._emit(counts)

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        self._emit(counts)

    def _emit(self, counts: dict[tuple[str, int], int]) -> None:
        for (reason, uid), count in sorted(counts.items()):
            log.warning(
                "workload connections refused",
                extra={"reason": reason, "uid": uid, "count": count, "interval_s": self.interval},
            )


class PeerTrackingProxy:
    """Relay from a public Unix socket to a gRPC server's internal socket, tracking callers.

    ``public_path`` is where workloads connect (created 0777, any local process may call);
    the gRPC server must listen on :attr:`internal_address`. :meth:`lookup` maps a
    handler's ``context.peer()`` to the pinned caller.

    Connections are accepted and their callers pinned on a thread of their own
    (:meth:`_accept_loop`), which does nothing else: neither the event loop's work nor
    another caller's connections can stretch the time between a workload's ``connect()``
    and the agent pinning it. Per uid, at most ``max_connections_per_uid`` may be open and
    new ones are accepted at ``connections_per_second`` (bursts of ``connection_burst``);
    the excess is closed at once, before any other work, and counted in one log line per
    ``refusal_log_interval`` seconds.
    """

    def __init__(
        self,
        public_path: str,
        private_dir: str | None = None,
        *,
        max_connections_per_uid: int = 1024,
        connections_per_second: float = 100.0,
        connection_burst: int = 200,
        refusal_log_interval: float = 10.0,
    ) -> None:
        self.public_path = public_path
        # Each relayed connection holds a few file descriptors; one user must not be able
        # to use up the agent's and so lock every other workload out.
        self.max_connections_per_uid = max_connections_per_uid
        self.connections_per_second = connections_per_second
        self.connection_burst = connection_burst
        self.open_by_uid: dict[int, int] = {}
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()
        self._refusals = _RefusalLog(refusal_log_interval)
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
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False

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
        except OSError:
            sock.close()
            raise
        self._loop = asyncio.get_running_loop()
        self._listener = sock
        self._accepting = True
        self._thread = threading.Thread(
            target=self._accept_loop, args=(sock,), name="workload-api-accept", daemon=True
        )
        self._thread.start()
        log.info("workload API listening", extra={"socket": self.public_path})

    # -- the accept thread ------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        """Accept, shed or pin, hand over to the event loop; nothing else runs here."""
        _raise_priority()
        while self._accepting:
            try:
                conn, _ = listener.accept()
            except OSError as err:
                if not self._accepting:
                    return
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._refusals.refused(f"cannot accept: {err.strerror}", -1)
                    time.sleep(0.01)  # out of descriptors: let some connections close
                continue
            peer = self._pin(conn)
            if peer is None:
                conn.close()
                continue
            loop = self._loop
            try:
                assert loop is not None
                loop.call_soon_threadsafe(self._adopt, conn, peer)
            except RuntimeError:  # the loop is closed: we are shutting down
                conn.close()
                peer.close()
                self.release(peer.credentials.uid)
                return

    def _pin(self, conn: socket.socket) -> PeerProcess | None:
        """Who connected, pinned; None (after counting the refusal) to shed the connection."""
        try:
            creds = peer_credentials(conn)
        except OSError as err:
            self._refusals.refused(f"no peer credentials: {err.strerror}", -1)
            return None
        uid = creds.uid
        with self._lock:
            now = time.monotonic()
            bucket = self._buckets.get(uid)
            if bucket is None:
                if len(self._buckets) > 4096:  # forget full (idle) buckets
                    self._buckets = {
                        u: b
                        for u, b in self._buckets.items()
                        if b.tokens + (now - b.stamp) * self.connections_per_second
                        < self.connection_burst
                    }
                bucket = self._buckets[uid] = _Bucket(self.connection_burst, now)
            if self.open_by_uid.get(uid, 0) >= self.max_connections_per_uid:
                reason = (
                    f"too many open connections for this uid (limit {self.max_connections_per_uid})"
                )
            elif not bucket.take(self.connections_per_second, self.connection_burst, now):
                reason = (
                    f"connecting too fast (limit {self.connections_per_second:g}/s, "
                    f"burst {self.connection_burst})"
                )
            else:
                reason = ""
                self.open_by_uid[uid] = self.open_by_uid.get(uid, 0) + 1
        if reason:
            self._refusals.refused(reason, uid)
            return None
        try:
            pidfd = peer_pidfd(conn)
            peer = PeerProcess.capture(
                creds, pidfd=pidfd, server_inode=os.fstat(conn.fileno()).st_ino
            )
        except (WorkloadError, OSError) as err:
            self.release(uid)
            reason = err.reason if isinstance(err, WorkloadError) else str(err)
            self._refusals.refused(reason, uid)
            return None
        return peer

    def release(self, uid: int) -> None:
        """A connection of ``uid`` closed (thread-safe)."""
        with self._lock:
            left = self.open_by_uid.get(uid, 1) - 1
            if left > 0:
                self.open_by_uid[uid] = left
            else:
                self.open_by_uid.pop(uid, None)

    # -- the event loop ---------------------------------------------------------------

    def _adopt(self, conn: socket.socket, peer: PeerProcess) -> None:
        """Start relaying a pinned connection (on the event loop)."""
        relay = _Relay(self, peer)
        self.connections.add(relay)
        if not self._accepting:
            conn.close()
            relay.close()
            return
        relay.task = asyncio.get_running_loop().create_task(relay.run(conn))

    def stop_accepting(self) -> None:
        """Stop taking new connections; existing ones keep flowing."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._accepting = False
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        listener.close()
        self._refusals.flush()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.public_path)

    async def stop(self) -> None:
        """Stop accepting, close every relayed connection, remove the private directory."""
        self.stop_accepting()
        await asyncio.sleep(0)  # run hand-overs already queued by the accept thread
        for relay in list(self.connections):
            relay.close()
        await asyncio.sleep(0)
        if self._own_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.internal_path)
            with contextlib.suppress(OSError):
                os.rmdir(self.private_dir)
