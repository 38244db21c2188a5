"""Errors raised while identifying a Workload API caller.

::

    CredoError
    └── WorkloadError                      identifying the caller failed
        ├── PeerUnknown                    the kernel gave no usable credentials (pid 0, ...)
        ├── PeerChanged                    the pid no longer names the process that connected
        └── AttestationFailed              an attestor could not read the process's facts

The Workload API handler maps these to gRPC status codes; nothing else here does.
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = ["AttestationFailed", "PeerChanged", "PeerUnknown", "WorkloadError"]


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
