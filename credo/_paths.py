"""Refusing paths another local user could tamper with: one check for every socket
directory, data directory, key file and datastore file of both processes and the CLIs.

A root-run process that puts its admin socket or its data under a directory someone else
owns (or may write to) hands that user the directory's contents: they can rename a
subdirectory the process created and put their own socket or SQLite file in its place.
:func:`check_path_chain` therefore requires every component of a path, as given and with
symlinks resolved, to be owned by root or the running user, and every directory on the way
that others may write to to be sticky (like ``/tmp``, where nobody may rename another's
entry). :func:`check_private_dir` and :func:`check_private_file` add that the directory
or file itself is the running user's and not writable by others. Each raises
:class:`UnsafePath` (a :class:`PermissionError`) with a one-line reason naming the path
and its owner.

:func:`default_runtime_path` gives the default place of a socket: under ``/run`` when
running as root (``/run`` is root's, so nobody can create the directories first, as in
SPIRE's packages), else under ``/tmp``.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

__all__ = [
    "UnsafePath",
    "check_path_chain",
    "check_private_dir",
    "check_private_file",
    "default_runtime_path",
]


def default_runtime_path(component: str, relative: str, *, per_user: bool) -> Path:
    """``/run/<component>/<relative>`` for root; else ``/tmp/<component>/<relative>``, or
    ``/tmp/<component>-<uid>/<relative>`` with ``per_user`` (a private socket: two users'
    processes must not want the same directory).

    Under ``/tmp`` another user may create the directory first; :func:`check_path_chain`
    then refuses it (naming its owner) instead of using it.
    """
    euid = os.geteuid()
    if euid == 0:
        return Path("/run", component, relative)
    return Path("/tmp", f"{component}-{euid}" if per_user else component, relative)


class UnsafePath(PermissionError):
    """A path another local user could tamper with; the message says which and why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def check_path_chain(
    path: Path | str, what: str, *, skip_leaf_mode: bool = False, agent_uid: int | None = None
) -> None:
    """Refuse ``path`` if a component of it (as given, or resolved) that exists is owned by
    someone other than root or the running user, or is a directory others may write to
    that is not sticky.

    ``what`` names the path in the message (``"data directory"``). ``skip_leaf_mode``
    leaves out the write check for ``path`` itself (a directory the caller chmods next).
    ``agent_uid`` is one more owner to accept for ``path`` itself, not for the directories
    above it: a workload dialling the Workload API accepts the agent's socket directory.
    """
    euid = os.geteuid()
    trusted = {0, euid}
    whom = f"root or this user ({_owner(euid)})"
    given = os.path.abspath(path)
    for start in dict.fromkeys((given, os.path.realpath(given))):
        current = start
        while True:
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                st = None
            if st is not None:
                if st.st_uid not in trusted and not (
                    agent_uid is not None and current == start and st.st_uid == agent_uid
                ):
                    raise UnsafePath(
                        f"{what} {path}: {current} is owned by {_owner(st.st_uid)}, not by "
                        f"{whom}; remove it or choose another path"
                    )
                if (
                    not (skip_leaf_mode and current == start)
                    and stat.S_ISDIR(st.st_mode)
                    and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                    and not st.st_mode & stat.S_ISVTX
                ):
                    raise UnsafePath(
                        f"{what} {path}: {current} is writable by other users (mode "
                        f"{stat.S_IMODE(st.st_mode):o}) and not sticky"
                    )
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent


def check_private_dir(path: Path | str, what: str) -> None:
    """Refuse a directory that is not the running user's, is writable by others, or lies
    under a path others could tamper with (:func:`check_path_chain`)."""
    check_path_chain(path, what, skip_leaf_mode=True)
    st = os.stat(path)
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{what} {path} is not a directory")
    if st.st_uid != euid:
        raise UnsafePath(
            f"{what} {path} is owned by {_owner(st.st_uid)}, not by this user "
            f"({_owner(euid)}); remove it or choose another path"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePath(
            f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            "whatever is in it may have been replaced: remove it or choose another path"
        )


def check_private_file(path: Path | str, what: str) -> None:
    """Refuse an existing file that is a symlink, not the running user's, or writable by
    others. A missing file passes (it is created by the caller)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    euid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{what} {path} is a symbolic link; refusing to follow it")
    if st.st_uid != euid:
        raise UnsafePath(
            f"{what} {path} is owned by {_owner(st.st_uid)}, not by this user ({_owner(euid)})"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePath(
            f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
        )
