"""Errors raised while identifying a Workload API caller.

::

    CredoError
    ├── WorkloadError                      identifying the caller failed
    │   ├── PeerUnknown                    the kernel gave no usable credentials (pid 0, ...)
    │   ├── PeerChanged                    the pid no longer names the process that connected
    │   ├── AttestationFailed              an attestor could not read the process's facts
    │   └── AttestationRefused             the facts contradict each other, or the source of
    │                                      truth does not know the process: refuse the caller
    └── CgroupError (also ValueError)      a /proc/<pid>/cgroup file that does not place the
                                           process in one pod and container

The Workload API handler maps these to gRPC status codes; nothing else here does.
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = [
    "AttestationFailed",
    "AttestationRefused",
    "CgroupError",
    "PeerChanged",
    "PeerUnknown",
    "WorkloadError",
]


class WorkloadError(CredoError):
    """Identifying a Workload API caller failed; ``reason`` says why."""

    _subject = "workload error"

    def __init__(self, reason: str, *, pid: int | None = None) -> None:
        self.reason = reason
        self.pid = pid
        who = f" (pid {pid})" if pid is not None else ""
        super().__init__(f"{self._subject}{who}: {reason}")


class PeerUnknown(WorkloadError):
    """The caller's credentials are unknown (pid 0, or the connection was not tracked)."""

    _subject = "caller credentials unknown"


class PeerChanged(WorkloadError):
    """The pid no longer names the process that opened the connection (exited, reused, exec'd)."""

    _subject = "caller process changed"


class AttestationFailed(WorkloadError):
    """A workload attestor could not gather the process's selectors."""

    _subject = "workload attestation failed"


class AttestationRefused(WorkloadError):
    """The caller may not be identified: its facts contradict each other (two pods in one
    cgroup file) or the source of truth does not know it (its pod is not on the kubelet's
    list). The Workload API answers PermissionDenied with the reason."""

    _subject = "workload attestation refused"


class CgroupError(CredoError, ValueError):
    """A cgroup file that cannot be read as one process's place (malformed, or naming two
    different pods or containers); ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
