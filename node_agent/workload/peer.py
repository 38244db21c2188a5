"""Who is calling: the kernel's credentials for a Unix socket peer, pinned to one process.

The kernel records the pid, effective uid and gid of the process that called ``connect()``
on a Unix socket; :func:`peer_credentials` reads them with ``SO_PEERCRED``. A pid alone is a
weak name: the process can exit and the pid be reused, or it can hand the connected socket
to another process and exit. :class:`PeerProcess` therefore pins the pid when the
connection is accepted:

* a **pidfd** (``os.pidfd_open``) — it keeps referring to *that* process, never to a later
  one with the same pid, and becomes readable when the process exits;
* the process **start time** (``/proc/<pid>/stat`` field 22, clock ticks since boot);
* the **effective uid and gid** reported by ``SO_PEERCRED``;
* the identity (``st_dev``, ``st_ino``) of its **executable** when the agent may stat it.

Where the kernel offers it (Linux >= 6.5) the pidfd comes from ``SO_PEERPIDFD``: it names
the process that called ``connect()`` even if that pid has since been reused; elsewhere it
is opened from the pid at accept time and the start time rules out a reused pid.

After attestation, :meth:`PeerProcess.ensure_same_process` re-checks all of them and raises
:class:`~node_agent.workload.errors.PeerChanged` if the process exited, the pid now names a
different process, the process switched uid or gid (setuid/setgid exec), or it exec'd
another binary.
Selectors gathered for a pid are only trusted if that check passes afterwards — the
same defence SPIRE's peertracker applies.

None of this notices a process that connected, forked a child that keeps the socket and
then exec'd a trusted binary before the agent accepted (the exec race): the pid then names
the trusted binary, and the child speaks. :meth:`PeerProcess.ensure_sole_holder` closes that
on the first call of a connection: it asks the kernel (``sock_diag``) for the inode of the
client's end of the connection and requires that the pinned process holds it and that no
other process does (a scan of ``/proc/*/fd``). docs/security.md says what window remains.

Why the Workload API needs a proxy for this (see :mod:`node_agent.workload.tracker`):
``grpc.aio`` gives a handler only ``context.peer()`` — for a Unix socket ``"unix:"`` plus
the *client's bound path* — and no file descriptor, so ``SO_PEERCRED`` cannot be read
inside a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Final

from node_agent.workload import holders as _holders
from node_agent.workload.errors import PeerChanged, PeerUnknown
from node_agent.workload.holders import scan_socket_holders
from node_agent.workload.pinning import (
    PinRefused,
    exe_identity,
    exited,
    peer_credentials_raw,
    peer_pidfd,
    pin,
    read_effective_ids,
    read_start_time,
)

__all__ = [
    "HolderScans",
    "PeerCredentials",
    "PeerProcess",
    "peer_credentials",
    "peer_pidfd",
    "read_start_time",
    "scan_socket_holders",
    "socket_holders",
    "unix_peer_inode",
]

log = logging.getLogger(__name__)

# sock_diag (linux/sock_diag.h, linux/unix_diag.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2
_NLMSGHDR = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG_SIZE = 16
_NO_COOKIE = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The credentials the kernel recorded when the peer called ``connect()``."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Read ``SO_PEERCRED`` from a connected Unix socket (Linux only)."""
    return PeerCredentials(*peer_credentials_raw(sock))


def unix_peer_inode(inode: int) -> int | None:
    """The inode of the other end of the Unix socket with ``inode``, from ``sock_diag``.

    None if the kernel cannot say (no ``sock_diag`` support, or the peer closed).
    """
    request = _UNIX_DIAG_REQ.pack(
        socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, _UDIAG_SHOW_PEER, _NO_COOKIE, _NO_COOKIE
    )
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0
    )
    try:
        with socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
        ) as nl:
            nl.send(header + request)
            data = nl.recv(8192)
    except OSError:
        return None
    if len(data) < _NLMSGHDR.size:
        return None
    length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    if kind != _SOCK_DIAG_BY_FAMILY:
        return None
    offset = _NLMSGHDR.size + _UNIX_DIAG_MSG_SIZE
    end = min(length, len(data))
    while offset + 4 <= end:
        attr_len, attr_type = struct.unpack_from("=HH", data, offset)
        if attr_len < 4:
            return None
        if attr_type == _UNIX_DIAG_PEER and attr_len >= 8:
            peer = int(struct.unpack_from("=I", data, offset + 4)[0])
            return peer or None
        offset += (attr_len + 3) & ~3
    return None


def socket_holders(inode: int, proc_root: str = "/proc") -> set[int]:
    """The pids of every process with a file descriptor on socket ``inode`` (that we may see)."""
    return scan_socket_holders((inode,), proc_root)[inode]


_SCANNER_CODE = (
    "import sys; sys.path.append(sys.argv[1]); "
    "from node_agent.workload.holders import main; main(sys.argv[2:])"
)
_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""Where the ``node_agent`` package lives, for the scan process's ``sys.path`` (after the
standard library, as for the accept process)."""


class ScanProcess:
    """The holder scan process (:mod:`node_agent.workload.holders`) and the agent's end of
    its channel. One request at a time (:class:`HolderScans` sends one batch per scan)."""

    TIMEOUT: Final = 10.0
    """Seconds a scan may take before the process is taken for hung and killed."""

    def __init__(self, proc_root: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # -I -S: nothing from the environment, the working directory or site-packages.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _SCANNER_CODE, _CODE_ROOT,
                 str(theirs.fileno()), proc_root],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.channel = ours

    async def scan(self, inodes: list[int]) -> dict[int, set[int]]:
        """Holders of each inode, from a scan the process begins after this call.

        Raises :class:`OSError` (or :class:`TimeoutError`) when the process is gone, hung
        or answers nonsense; it is then of no further use (:meth:`close` it).
        """
        loop = asyncio.get_running_loop()
        found: dict[int, set[int]] = {}
        async with asyncio.timeout(self.TIMEOUT):
            for i in range(0, len(inodes), _holders.MAX_INODES):
                part = inodes[i : i + _holders.MAX_INODES]
                await loop.sock_sendall(
                    self.channel, b"Q" + b"".join(map(_holders.INODE.pack, part))
                )
                got: dict[int, tuple[int, set[int]]] = {}
                while True:
                    data = await loop.sock_recv(self.channel, _holders.MESSAGE_MAX)
                    if not data:
                        raise ConnectionError("the holder scan process exited")
                    try:
                        if _holders.decode_reply(data, got):
                            break
                    except (ValueError, struct.error) as err:
                        raise ConnectionError(str(err)) from None
                for inode in part:
                    count, pids = got.get(inode, (0, set()))
                    if count > len(pids):
                        # More holders than listed: the socket is refused either way (the
                        # pinned pid is missing, or others are listed); say so.
                        pids = pids | {-1}
                    found[inode] = pids
        return found

    def close(self) -> None:
        """Close the channel (the process exits when it sees that) and reap it."""
        self.channel.close()
        try:
            self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                self.process.kill()
            self.process.wait()


class HolderScans:
    """Shares ``/proc`` scans among concurrent holder checks on one event loop.

    :meth:`holders` is answered by a scan that *starts after* it was asked (never by one
    already running), so a shared answer is as fresh as a scan of its own; requests that
    arrive while a scan runs wait for the next one, which answers all of them at once. Under
    load this turns one full scan per new connection into a few per burst; a scan also waits
    a few event loop turns for the handlers already runnable (:meth:`_gather`) to ask.

    With ``process`` (the default) the scans run in a process of their own
    (:class:`ScanProcess`, started at the first scan), on another core and without the
    agent's GIL; a batch whose process failed is scanned in a thread instead, and the next
    batch starts a new process. Without it they run in a thread. Call :meth:`close` at the
    end.
    """

    GATHER_TURNS: Final = 8
    """Event loop turns a scan may wait for more requests to join it (while they come)."""

    def __init__(self, proc_root: str = "/proc", *, process: bool = True) -> None:
        self._proc_root = proc_root
        self._use_process = process
        self._process: ScanProcess | None = None
        self._pending: dict[int, list[asyncio.Future[set[int]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.scans = 0  # scans run so far (for tests and benchmarks)

    async def _gather(self) -> None:
        """Let the handlers already runnable ask before the scan begins: one loop turn at a
        time, while each turn brings more requests (at most :attr:`GATHER_TURNS`). Under a
        burst of new connections this is fewer scans; each still begins after every
        request it answers."""
        waiting = sum(map(len, self._pending.values()))
        for _ in range(self.GATHER_TURNS):
            await asyncio.sleep(0)
            now = sum(map(len, self._pending.values()))
            if now == waiting:
                return
            waiting = now

    async def holders(self, inode: int) -> set[int]:
        """The pids holding socket ``inode``, from a scan begun after this call.

        A pid of -1 in the answer stands for holders beyond the ones listed (only when
        more than :data:`~node_agent.workload.holders.MAX_PIDS_LISTED` hold it).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[set[int]] = loop.create_future()
        self._pending.setdefault(inode, []).append(future)
        if self._task is None:
            self._task = loop.create_task(self._run())
        return set(await future)

    async def _scan(self, inodes: list[int]) -> dict[int, set[int]]:
        """One scan of ``inodes``, begun now: in the scan process, else in a thread."""
        if self._use_process:
            try:
                if self._process is None:
                    self._process = ScanProcess(self._proc_root)
                return await self._process.scan(inodes)
            except (OSError, TimeoutError) as err:
                log.error(
                    "the holder scan process failed; scanning in a thread this time",
                    extra={"error": str(err) or type(err).__name__},
                )
                self._close_process()
        return await asyncio.to_thread(scan_socket_holders, inodes, self._proc_root)

    async def _run(self) -> None:
        try:
            while self._pending:
                batch: dict[int, list[asyncio.Future[set[int]]]] = {}
                try:
                    await self._gather()
                    batch, self._pending = self._pending, {}
                    self.scans += 1
                    found = await self._scan(list(batch))
                except Exception as err:
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(err)
                    continue
                except BaseException:  # cancelled: nobody will scan for the waiting ones
                    for futures in (*batch.values(), *self._pending.values()):
                        for future in futures:
                            future.cancel()
                    self._pending = {}
                    raise
                for inode, futures in batch.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(found[inode])
        finally:
            self._task = None

    def _close_process(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.close()

    def close(self) -> None:
        """Stop the scan process (a later scan would start another). Idempotent."""
        if self._task is not None:
            self._task.cancel()
        self._close_process()


def read_effective_uid(pid: int) -> int:
    """The effective uid from ``/proc/<pid>/status`` (second number of ``Uid:``)."""
    return read_effective_ids(pid)[0]


_exe_identity = exe_identity
_exited = exited


class PeerProcess:
    """A connected caller, pinned to one process by pidfd, start time, uid and executable.

    Create with :meth:`capture` as soon as the connection is accepted; call :meth:`close`
    when the connection ends (it releases the pidfd).
    """

    def __init__(
        self,
        credentials: PeerCredentials,
        pidfd: int,
        start_time: int,
        exe: tuple[int, int] | None,
        server_inode: int | None = None,
    ) -> None:
        self.credentials = credentials
        self._pidfd = pidfd
        self._start_time = start_time
        self._exe = exe
        self._server_inode = server_inode
        self._sole_holder = False

    @property
    def pid(self) -> int:
        """The caller's pid."""
        return self.credentials.pid

    @classmethod
    def capture(
        cls,
        credentials: PeerCredentials,
        *,
        pidfd: int | None = None,
        server_inode: int | None = None,
    ) -> PeerProcess:
        """Pin ``credentials.pid``; raise :class:`PeerUnknown` or :class:`PeerChanged`.

        ``pidfd`` (from :func:`peer_pidfd`; this object takes it over) names the process
        that connected; without it one is opened from the pid. ``server_inode`` is the inode
        of the accepted socket, for :meth:`ensure_sole_holder`. Pid 0 means the kernel could
        not say who connected (e.g. the peer is in a pid namespace the agent cannot see)
        and is refused.
        """
        pid = credentials.pid
        try:
            pidfd, start_time, exe = pin(pid, credentials.uid, credentials.gid, pidfd)
        except PinRefused as err:
            raise (PeerUnknown if err.unknown else PeerChanged)(err.reason, pid=pid) from None
        return cls(credentials, pidfd, start_time, exe, server_inode)

    def ensure_same_process(self) -> None:
        """Raise :class:`PeerChanged` unless the pid still names the process that connected.

        Call it *after* attestation: it proves the selectors were read from the caller. The
        effective uid/gid and the executable are read from ``/proc/<pid>`` and *then* the
        pidfd is polled: a pid is not reused before its process has exited and been reaped,
        so a pidfd that has not exited after the reads proves they were the pinned
        process's (the start time need not be read again; it was recorded at the pin only
        to name that same process).
        """
        pid = self.pid
        if self._pidfd < 0:
            raise PeerChanged("connection closed", pid=pid)
        if _exited(self._pidfd):
            raise PeerChanged("process exited", pid=pid)
        try:
            uid, gid = read_effective_ids(pid)
            exe = _exe_identity(pid) if self._exe is not None else None
        except (FileNotFoundError, ProcessLookupError):
            raise PeerChanged("process exited", pid=pid) from None
        except PinRefused as err:
            raise PeerChanged(err.reason, pid=pid) from None
        if _exited(self._pidfd):
            # the reads may have come from a later process that reused the pid
            raise PeerChanged("process exited", pid=pid)
        if uid != self.credentials.uid:
            raise PeerChanged(
                f"effective uid changed from {self.credentials.uid} to {uid}", pid=pid
            )
        if gid != self.credentials.gid:
            raise PeerChanged(
                f"effective gid changed from {self.credentials.gid} to {gid}", pid=pid
            )
        if self._exe is not None and exe != self._exe:
            raise PeerChanged("process now runs a different executable", pid=pid)

    def _holder_check_inode(self) -> int | None:
        """The client socket's inode for the holder check, or None if it is not needed.

        None when the connection already passed, when the kernel cannot name the client's
        socket (no ``sock_diag``) or when the caller's descriptors cannot be seen; the last
        two are logged and mark the connection checked, as before.
        """
        if self._sole_holder or self._server_inode is None:
            return None
        pid = self.pid
        client = unix_peer_inode(self._server_inode)
        if client is None:
            if self._pidfd < 0 or _exited(self._pidfd):
                raise PeerChanged("process exited", pid=pid)
            log.debug("cannot name the client socket; holder check skipped", extra={"pid": pid})
            self._sole_holder = True
            return None
        try:  # opening is what listing would be refused at; the scan lists it
            os.close(os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except PermissionError:
            # Without CAP_SYS_PTRACE over the caller (an agent not running as root, or a
            # container without it) its descriptors cannot be seen: refusing would refuse
            # every such caller, so the check is skipped (docs/security.md).
            log.debug(
                "cannot read the caller's descriptors; holder check skipped", extra={"pid": pid}
            )
            self._sole_holder = True
            return None
        except FileNotFoundError:
            raise PeerChanged("process exited", pid=pid) from None
        return client

    def _judge_holders(self, holders: set[int]) -> None:
        """Refuse unless ``holders`` is exactly the pinned pid (-1: more holders unlisted)."""
        pid = self.pid
        more = " and more" if -1 in holders else ""
        listed = sorted(holders - {-1})
        if pid not in holders:
            raise PeerChanged(
                "the process that connected no longer holds the connection "
                f"(held by pids {listed}{more})",
                pid=pid,
            )
        if others := [p for p in listed if p != pid]:
            raise PeerChanged(
                f"the connection is shared with other processes (pids {others}{more})", pid=pid
            )
        self._sole_holder = True

    def ensure_sole_holder(self) -> None:
        """Raise :class:`PeerChanged` unless only the pinned process holds the connection.

        Defeats the exec race: a process that connects, forks a child keeping the socket
        and execs a trusted binary is pinned as that binary, but the child is the one
        talking. Checked once per connection (a scan of ``/proc/*/fd``); skipped when the
        kernel cannot name the client's socket (no ``sock_diag``). Blocking; on an event
        loop use :meth:`ensure_sole_holder_shared`.
        """
        client = self._holder_check_inode()
        if client is not None:
            self._judge_holders(socket_holders(client))

    async def ensure_sole_holder_shared(self, scans: HolderScans) -> None:
        """:meth:`ensure_sole_holder` with the ``/proc`` scan shared through ``scans``.

        The same check: the scan that answers starts after this call (see
        :class:`HolderScans`), so it sees every process holding the connection by then.
        """
        client = self._holder_check_inode()
        if client is not None:
            self._judge_holders(await scans.holders(client))

    def close(self) -> None:
        """Release the pidfd; later :meth:`ensure_same_process` calls fail. Idempotent."""
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def __repr__(self) -> str:
        c = self.credentials
        return f"PeerProcess(pid={c.pid}, uid={c.uid}, gid={c.gid})"
