"""Pinning a Unix-socket peer to one process: the kernel facts, standard library only.

:mod:`node_agent.workload.peer` builds :class:`~node_agent.workload.peer.PeerProcess` on
these, and the accept process (:mod:`node_agent.workload.acceptor`) pins every caller with
:func:`pin` the moment it accepts the connection. That process imports nothing but this
module and the standard library, so it starts fast and stays small.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct

__all__ = [
    "SO_PEERPIDFD",
    "PinRefused",
    "effective_ids",
    "exe_identity",
    "exited",
    "peer_credentials_raw",
    "peer_pidfd",
    "pin",
    "read_effective_ids",
    "read_start_time",
    "read_status",
    "status_field",
]

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
"""``getsockopt`` option returning a pidfd of the peer (Linux >= 6.5)."""


class PinRefused(Exception):
    """The peer cannot be pinned: ``unknown`` (pid 0) or it changed/exited (``reason``)."""

    def __init__(self, reason: str, *, unknown: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unknown = unknown


def peer_credentials_raw(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` from ``SO_PEERCRED`` of a connected Unix socket (Linux only)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd for the process that called ``connect()`` (``SO_PEERPIDFD``), or None.

    None only where the kernel does not know the option (``ENOPROTOOPT``: before Linux 6.5);
    the caller then opens a pidfd from the pid. Raises :class:`PinRefused` when the kernel
    knows the option but cannot name the process: on Linux 6.5 to 6.14 ``EINVAL`` /
    ``ESRCH`` (and ``ENODATA``) mean the peer has exited, and its pid may already belong to
    another process, so opening one from the pid could pin the wrong process.
    """
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError as err:
        if err.errno == errno.ENOPROTOOPT:
            return None
        if err.errno in (errno.EINVAL, errno.ESRCH, errno.ENODATA):
            raise PinRefused("process exited before it could be tracked") from None
        raise


def read_start_time(pid: int) -> int:
    """The process start time (``/proc/<pid>/stat`` field 22, clock ticks after boot).

    Raises :class:`FileNotFoundError` / :class:`ProcessLookupError` if the process is gone.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # Field 2 (comm) is in parentheses and may itself contain spaces or ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[22 - 3])


def read_status(path: str) -> bytes:
    """The whole of a ``/proc/<pid>/status`` file, read with bare system calls."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 16384)
        while chunk := os.read(fd, 16384):  # a status larger than that: unusual
            data += chunk
    finally:
        os.close(fd)
    return data


def status_field(status: bytes, name: bytes) -> list[bytes] | None:
    """The values of line ``name:`` of a status file (split on whitespace), or None.

    The first such line counts. Only the first line (``Name:``, the command name) holds
    text the process chose, and the kernel escapes newlines in it, so no process can
    plant a line of its own.
    """
    if status.startswith(name + b":"):
        start = len(name) + 1
    else:
        at = status.find(b"\n" + name + b":")
        if at < 0:
            return None
        start = at + len(name) + 2
    end = status.find(b"\n", start)
    return status[start : end if end >= 0 else len(status)].split()


def effective_ids(status: bytes) -> tuple[int, int]:
    """Effective uid and gid (second of ``Uid:``, ``Gid:``) from a status file's text.

    Raises :class:`PinRefused` if it has no such lines.
    """
    uid = status_field(status, b"Uid")
    gid = status_field(status, b"Gid")
    if not uid or not gid:
        raise PinRefused("process status has no Uid/Gid line")
    try:
        return int(uid[1] if len(uid) > 1 else uid[0]), int(gid[1] if len(gid) > 1 else gid[0])
    except ValueError:
        raise PinRefused("process status has a malformed Uid/Gid line") from None


def read_effective_ids(pid: int) -> tuple[int, int]:
    """Effective uid and gid from ``/proc/<pid>/status`` (second of ``Uid:``, ``Gid:``).

    Raises :class:`PinRefused` if the file has no such lines.
    """
    return effective_ids(read_status(f"/proc/{pid}/status"))


def exe_identity(pid: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the process's executable, or None if the agent may not see it."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except (PermissionError, FileNotFoundError, ProcessLookupError):
        return None
    return (st.st_dev, st.st_ino)


def exited(pidfd: int) -> bool:
    """True when the process behind ``pidfd`` has exited (the pidfd polls readable)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def pin(pid: int, uid: int, gid: int, pidfd: int | None) -> tuple[int, int, tuple[int, int] | None]:
    """Pin the process that connected as ``pid``/``uid``/``gid``: ``(pidfd, start time, exe)``.

    ``pidfd`` (from :func:`peer_pidfd`; taken over, closed on failure) names the process that
    connected; without it one is opened from the pid. Raises :class:`PinRefused` if the pid is
    0 (the kernel could not say who connected, e.g. another pid namespace), the process exited,
    or its effective uid or gid is not the one the kernel recorded at ``connect()`` (it exec'd
    a setuid/setgid binary since).
    """
    if pid <= 0:
        if pidfd is not None:
            os.close(pidfd)
        raise PinRefused("kernel reported pid 0 for the connection", unknown=True)
    if pidfd is None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise PinRefused("process exited before it could be tracked") from None
    try:
        start_time = read_start_time(pid)
        euid, egid = read_effective_ids(pid)
        exe = exe_identity(pid)
        if exited(pidfd):
            raise PinRefused("process exited before it could be tracked")
        if euid != uid:
            raise PinRefused(f"effective uid is {euid}, but the connection was opened as uid {uid}")
        if egid != gid:
            # e.g. it exec'd a setgid binary between connect() and accept()
            raise PinRefused(f"effective gid is {egid}, but the connection was opened as gid {gid}")
    except (FileNotFoundError, ProcessLookupError):
        os.close(pidfd)
        raise PinRefused("process exited before it could be tracked") from None
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd, start_time, exe
