"""Atomic file writes, the one way Credo puts keys, SVIDs and state on disk."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["TEMP_PREFIX", "fsync_directory", "write_atomically"]

#: Name prefix of the temporary files :func:`write_atomically` creates beside the target.
TEMP_PREFIX = ".tmp-"


def fsync_directory(directory: Path | str) -> None:
    """Flush a directory entry change (a rename) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    The temporary file is created with ``mode`` from the start (never readable by others
    for an instant, whatever the umask), written and fsynced, renamed over ``path``, and
    the directory is fsynced. On any failure the temporary file is removed.
    """
    target = Path(path)
    tmp = target.with_name(f"{TEMP_PREFIX}{target.name}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; fchmod is not
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(target.parent)
