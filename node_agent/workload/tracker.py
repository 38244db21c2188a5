"""Peer tracking for a ``grpc.aio`` server: a Unix-socket relay that knows who connected.

``grpc.aio`` does not expose a connection's file descriptor to handlers, only
``context.peer()``, so ``SO_PEERCRED`` cannot be read there. :class:`PeerTrackingProxy`
therefore owns the public socket itself:

1. a process of its own (:mod:`node_agent.workload.acceptor`) accepts a workload's
   connection, reads ``SO_PEERCRED`` (and ``SO_PEERPIDFD``) from the accepted socket and
   pins the process at once (pidfd, start time, uid, executable), or sheds it when its uid
   has too many open connections or connects too fast; it passes the connection and the
   pidfd to the agent (``SCM_RIGHTS``), which wraps them in a
   :class:`~node_agent.workload.peer.PeerProcess`;
2. it opens a connection to the gRPC server's *internal* socket from a client socket
   **bound to a unique path** ``<private dir>/c-<n>``. The gRPC server reports that bound
   path as the peer (``context.peer() == "unix:<private dir>/c-<n>"``, checked against
   grpcio 1.85), so the handler finds the pinned process with :meth:`lookup`;
3. it relays bytes both ways (asyncio protocols, with back-pressure) and, when either side
   closes, closes the other and forgets the mapping. The internal connection is opened
   when the workload sends its first bytes, so one that connects and closes without
   speaking (a connection flood) costs the gRPC server nothing.

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

import array
import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time

from node_agent.workload.acceptor import CONNECTION, MESSAGE_MAX, RELEASE
from node_agent.workload.peer import PeerCredentials, PeerProcess

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
        elif self is self.conn.down:
            self.conn.first_bytes(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        partner = self.partner
        if self is self.conn.down and self.conn.early is None:
            self.conn.close()  # it sent nothing: there is nothing to relay
            return False
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
        self.early: bytearray | None = None  # read from the caller before upstream was up
        self.closed = False

    async def run(self, conn: socket.socket) -> None:
        """Wrap the accepted socket; its first bytes open the upstream connection.

        A caller that connects and closes without sending anything (a gRPC client always
        speaks first: the HTTP/2 preface) never costs the gRPC server a connection.
        """
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

    def first_bytes(self, data: bytes) -> None:
        """The caller's first bytes: hold them (and further reads) until upstream is up."""
        if self.early is not None:
            self.early += data  # read before pause_reading took effect
            return
        self.early = bytearray(data)
        down = self.down.transport
        assert down is not None
        down.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._connect_upstream(down))

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
            up, _ = await loop.create_unix_connection(lambda: self.up, sock=sock)
        except (OSError, asyncio.CancelledError) as err:
            sock.close()
            if not isinstance(err, asyncio.CancelledError):
                log.error(
                    "cannot reach the internal Workload API socket", extra={"error": str(err)}
                )
            self.close()
            return
        if self.closed:
            return
        if self.early:
            up.write(bytes(self.early))
        self.early = bytearray()
        if self.down.got_eof and up.can_write_eof():
            up.write_eof()
        else:
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


_ACCEPTOR_CODE = (
    "import sys; sys.path.append(sys.argv[1]); "
    "from node_agent.workload.acceptor import main; main(sys.argv[2:])"
)
_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""Where the ``node_agent`` package lives, for the accept process's ``sys.path`` (after the
standard library: when installed, this is site-packages, and nothing there may shadow a
standard module)."""
_FDS_SIZE = socket.CMSG_SPACE(2 * array.array("i").itemsize)


class _AcceptProcess:
    """The accept process (:mod:`node_agent.workload.acceptor`) and the agent's end of its
    channel: pinned connections in, releases out."""

    def __init__(self, proxy: PeerTrackingProxy, listener: socket.socket) -> None:
        self.proxy = proxy
        config = json.dumps(
            {
                "max_open": proxy.max_connections_per_uid,
                "rate": proxy.connections_per_second,
                "burst": proxy.connection_burst,
                "log_interval": proxy.refusal_log_interval,
                "heartbeat": proxy.acceptor_heartbeat,
                # A process replacing one that exited counts the relays still open: their
                # releases will come to it.
                "open": {str(uid): n for uid, n in proxy.open_by_uid.items()},
            }
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # -I -S: nothing from the environment, the working directory or site-packages
            # reaches the interpreter; it needs only the standard library and this package.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _ACCEPTOR_CODE, _CODE_ROOT,
                 str(listener.fileno()), str(theirs.fileno()), config],
                stdin=subprocess.DEVNULL,
                pass_fds=(listener.fileno(), theirs.fileno()),
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.channel = ours
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(ours.fileno(), self._readable)
        self._closed = False
        self._last_heard = time.monotonic()
        self._watchdog = self._loop.call_later(proxy.acceptor_timeout, self._check_alive)

    def _readable(self) -> None:
        while not self._closed:
            try:
                data, ancdata, flags, _ = self.channel.recvmsg(
                    MESSAGE_MAX, _FDS_SIZE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError:
                data, ancdata, flags = b"", [], 0
            self._last_heard = time.monotonic()
            if not self._message(data, ancdata, flags, adopt=True):
                self._close()
                self.proxy._acceptor_exited(self)
                return

    def _check_alive(self) -> None:
        """Replace the accept process when nothing came from it for ``acceptor_timeout``.

        It sends a heartbeat every ``acceptor_heartbeat`` seconds; any message counts. What
        is waiting in the channel is read first, so a stall of the agent's own loop does not
        look like a hung accept process.
        """
        if self._closed:
            return
        self._readable()
        if self._closed:
            return
        timeout = self.proxy.acceptor_timeout
        silent = time.monotonic() - self._last_heard
        if silent < timeout:
            self._watchdog = self._loop.call_later(timeout - silent, self._check_alive)
            return
        log.error(
            "the workload API accept process stopped answering; killing it",
            extra={"pid": self.process.pid, "silent_s": round(silent, 1)},
        )
        with contextlib.suppress(OSError):
            self.process.kill()
        self._close()
        self.proxy._acceptor_exited(self)

    def _message(
        self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int, *, adopt: bool
    ) -> bool:
        """Handle one message from the accept process; False at its end (EOF)."""
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        if flags & socket.MSG_TRUNC:
            data = b"?"  # never sent that big: ignore it (closing what came with it)
        tag = data[:1]
        if tag == b"C" and len(data) == 1 + CONNECTION.size:
            pid, uid, gid, start_time, dev, ino, has_exe = CONNECTION.unpack_from(data, 1)
            if len(fds) != 2 or flags & socket.MSG_CTRUNC:
                # The accept process counted this connection open: free its slot.
                for fd in fds:
                    os.close(fd)
                log.warning(
                    "workload connection dropped in the handoff",
                    extra={"uid": uid, "descriptors": len(fds)},
                )
                self.release(uid)
                return True
            conn_fd, pidfd = fds
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, conn_fd)
            if not adopt:
                conn.close()
                os.close(pidfd)
                self.release(uid)
                return True
            try:
                inode = os.fstat(conn_fd).st_ino
            except OSError:
                inode = None
            peer = PeerProcess(
                PeerCredentials(pid, uid, gid),
                pidfd,
                start_time,
                (dev, ino) if has_exe else None,
                inode,
            )
            self.proxy._adopt(conn, peer)
            return True
        for fd in fds:
            os.close(fd)
        if tag == b"L":
            try:
                counts = [(str(r), int(u), int(n)) for r, u, n in json.loads(data[1:])]
            except (ValueError, TypeError):
                log.warning("malformed refusal summary from the accept process")
                return True
            for reason, uid, count in counts:
                log.warning(
                    "workload connections refused",
                    extra={
                        "reason": reason,
                        "uid": uid,
                        "count": count,
                        "interval_s": self.proxy.refusal_log_interval,
                    },
                )
        return True

    def release(self, uid: int) -> None:
        """Tell the accept process that a connection of ``uid`` closed."""
        if self._closed:
            return
        message = b"R" + RELEASE.pack(uid)
        if self._pending:
            self._pending.append(message)
            return
        try:
            self.channel.send(message)
        except BlockingIOError:
            self._pending.append(message)
            self._loop.add_writer(self.channel.fileno(), self._writable)
        except OSError:
            pass  # it is gone: _readable sees the end

    def _writable(self) -> None:
        while self._pending and not self._closed:
            try:
                self.channel.send(self._pending[0])
            except BlockingIOError:
                return
            except OSError:
                self._pending.clear()
                break
            self._pending.pop(0)
        if not self._closed:
            self._loop.remove_writer(self.channel.fileno())

    def _close(self) -> None:
        """Close the channel (the accept process exits when it sees that) and reap it later,
        without blocking the event loop."""
        if self._closed:
            return
        self._closed = True
        self._watchdog.cancel()
        self._loop.remove_reader(self.channel.fileno())
        if self._pending:
            self._loop.remove_writer(self.channel.fileno())
        self.channel.close()
        self._reap(time.monotonic() + 5)

    def _reap(self, kill_at: float) -> None:
        if self.process.poll() is not None:
            return
        if time.monotonic() >= kill_at:
            with contextlib.suppress(OSError):
                self.process.kill()
        with contextlib.suppress(RuntimeError):  # the loop is closing: Popen reaps it
            self._loop.call_later(0.05, self._reap, kill_at)

    def stop(self) -> None:
        """Ask the accept process to stop, log its last refusal counts, wait for it."""
        if self._closed:
            return
        self._watchdog.cancel()
        self._loop.remove_reader(self.channel.fileno())
        try:
            self.channel.setblocking(True)
            self.channel.settimeout(5)
            self.channel.send(b"S")
            while True:
                data, ancdata, flags, _ = self.channel.recvmsg(
                    MESSAGE_MAX, _FDS_SIZE, socket.MSG_CMSG_CLOEXEC
                )
                if not self._message(data, ancdata, flags, adopt=False):
                    break
        except (OSError, ValueError, TypeError):
            pass  # gone, timed out, or sent something malformed: it is killed below
        self._closed = True
        if self._pending:
            self._loop.remove_writer(self.channel.fileno())
        self.channel.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class PeerTrackingProxy:
    """Relay from a public Unix socket to a gRPC server's internal socket, tracking callers.

    ``public_path`` is where workloads connect (created 0777, any local process may call);
    the gRPC server must listen on :attr:`internal_address`. :meth:`lookup` maps a
    handler's ``context.peer()`` to the pinned caller.

    Connections are accepted and their callers pinned by a process of its own
    (:mod:`node_agent.workload.acceptor`), which does nothing else: neither the agent's
    work (the event loop, the gRPC server, the GIL they hold) nor another caller's
    connections can stretch the time between a workload's ``connect()`` and its being
    pinned. Per uid, at most ``max_connections_per_uid`` may be open and new ones are
    accepted at ``connections_per_second`` (bursts of ``connection_burst``); the excess is
    closed at once by that process, before any other work, and counted in one log line per
    ``refusal_log_interval`` seconds. Pinned connections reach the agent with their pidfd
    over a socket pair (``SCM_RIGHTS``). The process sends a heartbeat every
    ``acceptor_heartbeat`` seconds; when nothing comes from it for ``acceptor_timeout``
    seconds, or it exits, it is replaced a second later by one that starts from the
    agent's :attr:`open_by_uid`.
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
        acceptor_heartbeat: float = 1.0,
        acceptor_timeout: float = 10.0,
    ) -> None:
        self.public_path = public_path
        # Each relayed connection holds a few file descriptors; one user must not be able
        # to use up the agent's and so lock every other workload out.
        self.max_connections_per_uid = max_connections_per_uid
        self.connections_per_second = connections_per_second
        self.connection_burst = connection_burst
        self.refusal_log_interval = refusal_log_interval
        # The accept process sends a heartbeat this often; silent for acceptor_timeout, it
        # is killed and replaced (it may hang in stat() on a hung network or FUSE mount).
        self.acceptor_heartbeat = acceptor_heartbeat
        self.acceptor_timeout = acceptor_timeout
        self.open_by_uid: dict[int, int] = {}
        """Relayed connections open, by uid (the accept process keeps the same count)."""
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
        self._acceptor: _AcceptProcess | None = None
        self._restart: asyncio.TimerHandle | None = None
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
        self._listener = sock
        self._accepting = True
        try:
            self._acceptor = _AcceptProcess(self, sock)
        except BaseException:
            self._listener = None
            self._accepting = False
            sock.close()
            raise
        log.info("workload API listening", extra={"socket": self.public_path})

    # -- the event loop ---------------------------------------------------------------

    def _adopt(self, conn: socket.socket, peer: PeerProcess) -> None:
        """Start relaying a pinned connection (on the event loop)."""
        uid = peer.credentials.uid
        self.open_by_uid[uid] = self.open_by_uid.get(uid, 0) + 1
        relay = _Relay(self, peer)
        self.connections.add(relay)
        if not self._accepting:
            conn.close()
            relay.close()
            return
        relay.task = asyncio.get_running_loop().create_task(relay.run(conn))

    def release(self, uid: int) -> None:
        """A relayed connection of ``uid`` closed: the accept process may take another."""
        left = self.open_by_uid.get(uid, 1) - 1
        if left > 0:
            self.open_by_uid[uid] = left
        else:
            self.open_by_uid.pop(uid, None)
        if self._acceptor is not None:
            self._acceptor.release(uid)

    def _acceptor_exited(self, acceptor: _AcceptProcess) -> None:
        """The accept process died (not stopped by us): start another after a second."""
        if self._acceptor is not acceptor or not self._accepting:
            return
        self._acceptor = None
        log.error(
            "the workload API accept process exited; starting a new one",
            extra={"exit_code": acceptor.process.poll()},
        )

        def restart() -> None:
            self._restart = None
            if self._accepting and self._listener is not None:
                try:
                    self._acceptor = _AcceptProcess(self, self._listener)
                except OSError as err:
                    log.error(
                        "cannot start the workload API accept process",
                        extra={"error": str(err)},
                    )
                    self._restart = asyncio.get_running_loop().call_later(1.0, restart)

        self._restart = asyncio.get_running_loop().call_later(1.0, restart)

    def stop_accepting(self) -> None:
        """Stop taking new connections; existing ones keep flowing."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._accepting = False
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.stop()
        listener.close()
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
