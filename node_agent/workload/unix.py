"""The ``unix`` workload attestor: uid, gid, groups, executable path and its SHA-256.

Selectors (the same names and values as SPIRE's ``unix`` plugin)::

    unix:uid:<n>                  effective uid        unix:user:<name>
    unix:gid:<n>                  effective gid        unix:group:<name>
    unix:supplementary_gid:<n>    each supplementary   unix:supplementary_group:<name>
    unix:path:<exe>               readlink /proc/<pid>/exe
    unix:sha256:<hex>             digest of the executable

The uid and gid are the **effective** ids (second field of ``Uid:``/``Gid:`` in
``/proc/<pid>/status``), as SPIRE does: they are what the kernel checks for access, what
``SO_PEERCRED`` reports, and a setuid binary acts with them. Names come from pwd/grp and
are left out when the id has no name.

The digest is read through ``/proc/<pid>/exe``, so it is that of the very file the
process runs, even from another mount namespace. The path is the link's text, which reads
as the path *in the caller's mount namespace*; ``unix:path`` is therefore emitted only when
the caller shares the agent's mount namespace and the file at that path, as the agent
sees it, is the one the caller runs (same device and inode) — otherwise a user could
bind-mount any file over a trusted path in a namespace of their own. If the agent may
not read the link (no ``CAP_SYS_PTRACE`` for another user's process) they are left
out: missing selectors only ever match fewer entries. Digests are cached by the file's
(device, inode, size, mtime, ctime), and files larger than ``workload_size_limit`` are
not hashed (0 = no limit, negative = never hash), like SPIRE's ``workload_size_limit``.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import logging
import os
import pwd
import threading
from collections import OrderedDict
from dataclasses import dataclass

from credo.errors import ConfigError
from credo.selector import Selector
from node_agent.workload.errors import AttestationFailed
from node_agent.workload.pinning import PinRefused, effective_ids, read_status, status_field

__all__ = ["DEFAULT_WORKLOAD_SIZE_LIMIT", "UnixAttestor", "UnixAttestorConfig"]

log = logging.getLogger(__name__)

DEFAULT_WORKLOAD_SIZE_LIMIT = 64 * 1024 * 1024
_CACHE_SIZE = 1024
_CHUNK = 1024 * 1024

_FileKey = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class UnixAttestorConfig:
    """Settings for :class:`UnixAttestor`.

    ``discover_workload_path`` adds ``unix:path`` and ``unix:sha256``;
    ``workload_size_limit`` caps the size of a binary that is hashed (bytes; 0 = no limit,
    negative = never hash); ``proc_root`` is where procfs is mounted (``HOST_PROC``).
    """

    discover_workload_path: bool = True
    workload_size_limit: int = DEFAULT_WORKLOAD_SIZE_LIMIT
    proc_root: str = "/proc"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field of the TOML table."""
        if not os.path.isabs(self.proc_root):
            raise ConfigError(f"proc_root: must be an absolute path, got {self.proc_root!r}")


class UnixAttestor:
    """Attests a local process from procfs; see the module docstring for the selectors."""

    def __init__(self, config: UnixAttestorConfig | None = None) -> None:
        self.config = config or UnixAttestorConfig()
        self._digests: OrderedDict[_FileKey, str] = OrderedDict()
        self._lock = threading.Lock()
        self.hash_count = 0  # digests actually computed (not served from cache); for tests

    async def attest(self, pid: int) -> list[Selector]:
        """Selectors for ``pid``; raise :class:`AttestationFailed` if procfs cannot say."""
        return await asyncio.to_thread(self._attest, pid)

    def _attest(self, pid: int) -> list[Selector]:
        proc = os.path.join(self.config.proc_root, str(pid))
        try:
            status = read_status(os.path.join(proc, "status"))
        except FileNotFoundError:
            raise AttestationFailed("process not found", pid=pid) from None
        except OSError as err:
            raise AttestationFailed(f"cannot read process status: {err}", pid=pid) from None
        try:
            uid, gid = effective_ids(status)
            groups = [int(g) for g in status_field(status, b"Groups") or ()]
        except (PinRefused, ValueError):
            raise AttestationFailed("process status lacks Uid/Gid lines", pid=pid) from None

        out = [Selector("unix", f"uid:{uid}")]
        if (user := _user_name(uid)) is not None:
            out.append(Selector("unix", f"user:{user}"))
        out.append(Selector("unix", f"gid:{gid}"))
        if (group := _group_name(gid)) is not None:
            out.append(Selector("unix", f"group:{group}"))
        for sgid in groups:
            out.append(Selector("unix", f"supplementary_gid:{sgid}"))
            if (name := _group_name(sgid)) is not None:
                out.append(Selector("unix", f"supplementary_group:{name}"))
        if self.config.discover_workload_path:
            out.extend(self._path_selectors(pid, os.path.join(proc, "exe")))
        return out

    def _path_selectors(self, pid: int, exe_link: str) -> list[Selector]:
        try:
            path = os.readlink(exe_link)
        except FileNotFoundError:
            raise AttestationFailed("process not found", pid=pid) from None
        except PermissionError:
            log.info("cannot read workload executable; no path selectors", extra={"pid": pid})
            return []
        out = []
        if (why := _path_mismatch(pid, exe_link, path)) is None:
            out.append(Selector("unix", f"path:{path}"))
        else:
            log.debug(
                "workload executable path not trusted; no path selector",
                extra={"pid": pid, "path": path, "path_withheld": why},
            )
        limit = self.config.workload_size_limit
        if limit < 0:
            return out
        try:
            digest = self._digest(exe_link, limit, pid, path)
        except FileNotFoundError:
            raise AttestationFailed("process not found", pid=pid) from None
        except OSError as err:
            log.warning(
                "cannot hash workload executable",
                extra={"pid": pid, "path": path, "error": str(err)},
            )
            return out
        if digest is not None:
            out.append(Selector("unix", f"sha256:{digest}"))
        return out

    def _digest(self, exe_link: str, limit: int, pid: int, path: str) -> str | None:
        """SHA-256 of the executable (cached), or None if it is over the size limit."""
        with open(exe_link, "rb") as f:
            st = os.fstat(f.fileno())
            key: _FileKey = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._lock:
                cached = self._digests.get(key)
                if cached is not None:
                    self._digests.move_to_end(key)
                    return cached
            if limit > 0 and st.st_size > limit:
                log.warning(
                    "workload executable too large to hash; no sha256 selector",
                    extra={"pid": pid, "path": path, "size": st.st_size, "limit": limit},
                )
                return None
            h = hashlib.sha256()
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self.hash_count += 1
            self._digests[key] = digest
            while len(self._digests) > _CACHE_SIZE:
                self._digests.popitem(last=False)
        return digest


def _mount_namespace(ns_link: str) -> str | None:
    try:
        return os.readlink(ns_link)
    except OSError:
        return None


def _path_mismatch(pid: int, exe_link: str, path: str) -> str | None:
    """Why ``path`` (``/proc/<pid>/exe`` as the caller sees it) does not name the caller's
    executable in the agent's own mount namespace; None when it does.

    The link reads as the path inside the *caller's* mount namespace: an unprivileged user
    can ``unshare -Urm``, bind-mount any file over ``/usr/bin/sleep`` and run it as that.
    """
    ns = os.path.join(os.path.dirname(exe_link), "ns", "mnt")
    theirs, ours = _mount_namespace(ns), _mount_namespace("/proc/self/ns/mnt")
    if theirs is None or ours is None:
        return "cannot compare mount namespaces"
    if theirs != ours:
        return "caller is outside the agent's mount namespace"
    try:
        running = os.stat(exe_link)
        here = os.stat(path)
    except OSError:
        return "no such file in the agent's mount namespace"
    if (running.st_dev, running.st_ino) != (here.st_dev, here.st_ino):
        return "the file at that path is not the one the caller runs"
    return None


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None
