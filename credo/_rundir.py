"""A process's private directory for its internal Unix sockets, under its data directory.

Both processes relay connections to an in-process gRPC server over Unix sockets that only
they may reach (the agent's Workload API relay, the server's TLS front end). Those sockets
live in ``<data-dir>/run/<name>/`` (0700), not under ``/tmp``: tmp cleaners do not remove
them under a running process, and nothing is left behind in ``/tmp`` after a crash.

:meth:`RuntimeDir.create` makes a fresh ``<name>`` and holds an exclusive ``flock`` on
``<data-dir>/run/<name>.lock`` for as long as the process lives. Before that it sweeps
``run/`` (under ``run/.sweep.lock``, so that sweeps and creations never interleave): a
directory whose lock nobody holds belongs to a process that is gone (a SIGKILL, a power
cut) and is removed, so the next start cleans up after a crash, while a second process
sharing the data dir keeps its own directory. :meth:`RuntimeDir.close`
removes the directory and its lock on a clean exit.

Unix socket paths are limited to 107 bytes: a data dir too deep for its sockets is
refused at start with a :class:`~credo.errors.ConfigError` naming the setting.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from credo.errors import ConfigError

__all__ = ["MAX_SOCKET_PATH", "RuntimeDir"]

MAX_SOCKET_PATH = 107
"""Longest path a Unix socket may be bound to (``sun_path`` less its NUL)."""

_RUN = "run"
_LOCK_SUFFIX = ".lock"
_SWEEP_LOCK = ".sweep.lock"


class RuntimeDir:
    """``<parent>/run/<name>/``, private to this process; see the module docstring."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd

    @classmethod
    def create(cls, parent: Path, *, setting: str, longest_name: int = 16) -> RuntimeDir:
        """Sweep stale directories under ``parent/run`` and make a fresh one for this process.

        ``longest_name`` is the longest socket file name the caller will bind in it;
        ``setting`` names the config key of ``parent`` for the error when the socket paths
        would be too long.
        """
        run = Path(os.path.abspath(parent)) / _RUN
        name = secrets.token_hex(4)
        longest = len(os.fsencode(run / name)) + 1 + longest_name
        if longest > MAX_SOCKET_PATH:
            raise ConfigError(
                f"{setting}: {parent} is too deep for the internal Unix sockets kept under "
                f"it ({longest} bytes; a socket path may have at most {MAX_SOCKET_PATH}); "
                "choose a shorter path"
            )
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(run, 0o700)
        # One process at a time sweeps and creates, so a sweep never sees a half-made entry.
        with _exclusive(run / _SWEEP_LOCK, blocking=True):
            _sweep(run)
            lock_fd = os.open(
                run / f"{name}{_LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                (run / name).mkdir(mode=0o700)
            except BaseException:
                os.close(lock_fd)
                raise
        return cls(run / name, lock_fd)

    def close(self) -> None:
        """Remove the directory and its lock (idempotent)."""
        if self._lock_fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path.with_name(self.path.name + _LOCK_SUFFIX))
        os.close(self._lock_fd)
        self._lock_fd = None


@contextlib.contextmanager
def _exclusive(path: Path, *, blocking: bool) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` (created if missing); yields False if it is taken
    and ``blocking`` is off."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _sweep(run: Path) -> None:
    """Remove what processes that are gone left in ``run``: entries whose lock is free."""
    names = {entry.name for entry in os.scandir(run)} - {_SWEEP_LOCK}
    for lock in sorted(n for n in names if n.endswith(_LOCK_SUFFIX)):
        with _exclusive(run / lock, blocking=False) as free:
            if free:  # its process is gone
                shutil.rmtree(run / lock.removesuffix(_LOCK_SUFFIX), ignore_errors=True)
                os.unlink(run / lock)
    for name in names:
        if not name.endswith(_LOCK_SUFFIX) and f"{name}{_LOCK_SUFFIX}" not in names:
            shutil.rmtree(run / name, ignore_errors=True)  # no lock: nobody owns it
