"""Errors of the audit trail.

::

    CredoError
    └── AuditError
        ├── ChainBroken        a record does not follow from the one before it
        └── InvalidAuditRecord (also ValueError)
                               a record would carry something it must not (a secret)
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = ["AuditError", "ChainBroken", "InvalidAuditRecord"]


class AuditError(CredoError):
    """Root of every error the audit trail raises on purpose."""


class ChainBroken(AuditError):
    """The chain does not verify at record ``seq``: ``problem`` says how."""

    def __init__(self, seq: int, problem: str, *, checked: int = 0) -> None:
        self.seq = seq
        self.problem = problem
        self.checked = checked
        super().__init__(f"audit record {seq}: {problem}")


class InvalidAuditRecord(AuditError, ValueError):
    """A record was refused before it was written (it looked like it held a secret)."""
