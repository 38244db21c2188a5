"""The audit record, its hash and chain verification: :mod:`credo._audit`, shared with
the node agent's local audit log."""

from __future__ import annotations

from credo._audit import (
    ALLOWED,
    CHECKPOINT,
    FORMAT,
    GENESIS,
    PRUNE,
    REFUSED,
    Actor,
    AuditRecord,
    CheckpointCheck,
    Outcome,
    PendingRecord,
    VerifyResult,
    canonical_details,
    chain_record,
    check_no_secret,
    record_hash,
    verify_chain,
    verify_trail,
)

__all__ = [
    "ALLOWED",
    "CHECKPOINT",
    "FORMAT",
    "GENESIS",
    "PRUNE",
    "REFUSED",
    "Actor",
    "AuditRecord",
    "CheckpointCheck",
    "Outcome",
    "PendingRecord",
    "VerifyResult",
    "canonical_details",
    "chain_record",
    "check_no_secret",
    "record_hash",
    "verify_chain",
    "verify_trail",
]
