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

After attestation, :meth:`PeerProcess.ensure_same_process` re-checks all of them and raises
:class:`~node_agent.workload.errors.PeerChanged` if the process exited, the pid now names a
different process, the process switched uid or gid (setuid/setgid exec), or it exec'd
another binary.
Selectors gathered for a pid are only trusted if that check passes afterwards — the
same defence SPIRE's peertracker applies.

Why the Workload API needs a proxy for this (see :mod:`node_agent.workload.tracker`):
``grpc.aio`` gives a handler only ``context.peer()`` — for a Unix socket ``"unix:"`` plus
the *client's bound path* — and no file descriptor, so ``SO_PEERCRED`` cannot be read
inside a handler.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from dataclasses import dataclass

from node_agent.workload.errors import PeerChanged, PeerUnknown

__all__ = ["PeerCredentials", "PeerProcess", "peer_credentials", "read_start_time"]

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The credentials the kernel recorded when the peer called ``connect()``."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Read ``SO_PEERCRED`` from a connected Unix socket (Linux only)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def read_start_time(pid: int) -> int:
    """The process start time (``/proc/<pid>/stat`` field 22, clock ticks after boot).

    Raises :class:`FileNotFoundError` / :class:`ProcessLookupError` if the process is gone.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # Field 2 (comm) is in parentheses and may itself contain spaces or ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[22 - 3])


def read_effective_uid(pid: int) -> int:
    """The effective uid from ``/proc/<pid>/status`` (second number of ``Uid:``)."""
    return read_effective_ids(pid)[0]


def read_effective_ids(pid: int) -> tuple[int, int]:
    """Effective uid and gid from ``/proc/<pid>/status`` (second of ``Uid:``, ``Gid:``)."""
    uid: int | None = None
    gid: int | None = None
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Uid:"):
                uid = int(line.split()[2])
            elif line.startswith(b"Gid:"):
                gid = int(line.split()[2])
    if uid is None or gid is None:
        raise PeerChanged("process status has no Uid/Gid line", pid=pid)
    return uid, gid


def _exe_identity(pid: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the process's executable, or None if the agent may not see it."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except (PermissionError, FileNotFoundError, ProcessLookupError):
        return None
    return (st.st_dev, st.st_ino)


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
    ) -> None:
        self.credentials = credentials
        self._pidfd = pidfd
        self._start_time = start_time
        self._exe = exe

    @property
    def pid(self) -> int:
        """The caller's pid."""
        return self.credentials.pid

    @classmethod
    def capture(cls, credentials: PeerCredentials) -> PeerProcess:
        """Pin ``credentials.pid``; raise :class:`PeerUnknown` or :class:`PeerChanged`.

        Pid 0 means the kernel could not say who connected (e.g. the peer is in a pid
        namespace the agent cannot see) and is refused.
        """
        pid = credentials.pid
        if pid <= 0:
            raise PeerUnknown("kernel reported pid 0 for the connection", pid=pid)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise PeerChanged("process exited before it could be tracked", pid=pid) from None
        try:
            start_time = read_start_time(pid)
            uid, gid = read_effective_ids(pid)
            exe = _exe_identity(pid)
            if _exited(pidfd):
                raise PeerChanged("process exited before it could be tracked", pid=pid)
            if uid != credentials.uid:
                raise PeerChanged(
                    f"effective uid is {uid}, but the connection was opened as uid "
                    f"{credentials.uid}",
                    pid=pid,
                )
            if gid != credentials.gid:
                # e.g. it exec'd a setgid binary between connect() and accept()
                raise PeerChanged(
                    f"effective gid is {gid}, but the connection was opened as gid "
                    f"{credentials.gid}",
                    pid=pid,
                )
        except (FileNotFoundError, ProcessLookupError):
            os.close(pidfd)
            raise PeerChanged("process exited before it could be tracked", pid=pid) from None
        except BaseException:
            os.close(pidfd)
            raise
        return cls(credentials, pidfd, start_time, exe)

    def ensure_same_process(self) -> None:
        """Raise :class:`PeerChanged` unless the pid still names the process that connected.

        Call it *after* attestation: it proves the selectors were read from the caller.
        """
        pid = self.pid
        if self._pidfd < 0:
            raise PeerChanged("connection closed", pid=pid)
        if _exited(self._pidfd):
            raise PeerChanged("process exited", pid=pid)
        try:
            if read_start_time(pid) != self._start_time:
                raise PeerChanged("pid now names a different process", pid=pid)
            uid, gid = read_effective_ids(pid)
        except (FileNotFoundError, ProcessLookupError):
            raise PeerChanged("process exited", pid=pid) from None
        if uid != self.credentials.uid:
            raise PeerChanged(
                f"effective uid changed from {self.credentials.uid} to {uid}", pid=pid
            )
        if gid != self.credentials.gid:
            raise PeerChanged(
                f"effective gid changed from {self.credentials.gid} to {gid}", pid=pid
            )
        if self._exe is not None and _exe_identity(pid) != self._exe:
            raise PeerChanged("process now runs a different executable", pid=pid)

    def close(self) -> None:
        """Release the pidfd; later :meth:`ensure_same_process` calls fail. Idempotent."""
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def __repr__(self) -> str:
        c = self.credentials
        return f"PeerProcess(pid={c.pid}, uid={c.uid}, gid={c.gid})"


def _exited(pidfd: int) -> bool:
    """True when the process behind ``pidfd`` has exited (the pidfd polls readable)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
