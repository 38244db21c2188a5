"""The audit trail: one append-only, hash-chained record of every security decision.

How other code writes a record: inside a datastore transaction (so the record commits
or rolls back with the change it describes)::

    from server import audit

    with self._transaction(write=True) as tx:
        ...  # the change
        audit.record(tx, "x509_svid.revoke", subject=spiffe_id, target=serial,
                     details={"reason": reason})

or, for a decision that changes nothing else (an issuance, a refusal), with
``datastore.append_audit_records([audit.pending(...)])``. The actor and request id come
from :func:`acting_as`, set at the API edge. The datastore numbers and chains records
when the transaction commits (:mod:`server.audit.records`). See ``docs/audit.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from server.audit.context import CallContext, acting_as, current, identify, set_server_actor
from server.audit.errors import AuditError, ChainBroken, InvalidAuditRecord
from server.audit.records import (
    ALLOWED,
    GENESIS,
    REFUSED,
    Actor,
    AuditRecord,
    Outcome,
    PendingRecord,
    VerifyResult,
    chain_record,
    check_no_secret,
    verify_chain,
    verify_trail,
)

__all__ = [
    "ALLOWED",
    "GENESIS",
    "REFUSED",
    "Actor",
    "AuditError",
    "AuditRecord",
    "AuditSink",
    "CallContext",
    "ChainBroken",
    "InvalidAuditRecord",
    "Outcome",
    "PendingRecord",
    "VerifyResult",
    "acting_as",
    "chain_record",
    "check_no_secret",
    "current",
    "identify",
    "pending",
    "record",
    "set_server_actor",
    "verify_chain",
    "verify_trail",
]


class AuditSink(Protocol):
    """What :func:`record` writes into: an open datastore transaction."""

    @property
    def audit(self) -> list[PendingRecord]: ...


def pending(
    action: str,
    *,
    subject: str = "",
    target: str = "",
    owner: str = "",
    outcome: Outcome = ALLOWED,
    reason: str = "",
    details: Mapping[str, Any] | None = None,
    actor: Actor | None = None,
) -> PendingRecord:
    """A record of ``action`` by the current actor (or ``actor``), checked for secrets."""
    ctx = current()
    made = PendingRecord(
        action=action,
        actor=actor or ctx.actor,
        subject=subject,
        target=target,
        owner=owner,
        outcome=outcome,
        reason=reason,
        request_id=ctx.request_id,
        details=dict(details or {}),
    )
    check_no_secret(made)
    return made


def record(
    tx: AuditSink,
    action: str,
    *,
    subject: str = "",
    target: str = "",
    owner: str = "",
    outcome: Outcome = ALLOWED,
    reason: str = "",
    details: Mapping[str, Any] | None = None,
    actor: Actor | None = None,
) -> None:
    """Add a record to the transaction ``tx``; it is chained and written at commit."""
    tx.audit.append(
        pending(
            action,
            subject=subject,
            target=target,
            owner=owner,
            outcome=outcome,
            reason=reason,
            details=details,
            actor=actor,
        )
    )
