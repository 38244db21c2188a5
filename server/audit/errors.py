"""Errors of the audit trail (defined with the record format in :mod:`credo._audit`).

::

    CredoError
    └── AuditError
        ├── ChainBroken        a record does not follow from the one before it
        └── InvalidAuditRecord (also ValueError)
                               a record would carry something it must not (a secret)
"""

from __future__ import annotations

from credo._audit import AuditError, ChainBroken, InvalidAuditRecord

__all__ = ["AuditError", "ChainBroken", "InvalidAuditRecord"]
