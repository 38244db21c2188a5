"""The audit record format, shared by the server's trail and the agent's local log.

What one audit record holds, how it is hashed into the chain, and how a chain verifies.

Each :class:`AuditRecord` has a sequence number (1, 2, 3, ... with no gap), the time in
unix milliseconds, who acted (:class:`Actor`), the action (``entry.create``), the identity
concerned (``subject``, a SPIFFE ID), what was acted on (``target``: an entry id, a
serial, a ``jti``, an authority id), the accountable person of that identity
(``owner``, empty when unknown), the outcome (``allowed`` or ``refused``) and why
(``reason``), the request id, free-form ``details`` (a JSON object), the previous
record's hash and its own.

``hash = sha256(canonical JSON of [FORMAT, seq, time_ms, actor kind, actor id, action,
subject, target, owner, outcome, reason, request id, details, prev_hash])``, hex. The
first record's ``prev_hash`` is :data:`GENESIS`. Changing, deleting or reordering any
stored record therefore breaks the chain at that record (:func:`verify_chain`).

Records never hold a private key, a whole token or a join token: :func:`check_no_secret`
refuses values shaped like a JWT or a PEM block before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from credo.errors import CredoError

__all__ = [
    "ALLOWED",
    "FORMAT",
    "GENESIS",
    "REFUSED",
    "Actor",
    "AuditError",
    "AuditRecord",
    "ChainBroken",
    "InvalidAuditRecord",
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

FORMAT: Final = "credo-audit-v1"
GENESIS: Final = "0" * 64
ALLOWED: Final = "allowed"
REFUSED: Final = "refused"
Outcome = Literal["allowed", "refused"]


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


ActorKind = Literal["admin", "agent", "workload", "person", "server", "node"]

# A JWS compact serialisation (three base64url parts, the first a JSON header "{...").
_JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_PEM_SHAPE = re.compile(r"-----BEGIN [A-Z ]+-----")


@dataclass(frozen=True)
class Actor:
    """Who acted.

    ``kind`` is ``admin`` (a caller on the admin socket; ``id`` is ``uid=U pid=P``),
    ``agent`` (an agent SPIFFE ID), ``workload`` (a workload SPIFFE ID), ``person`` (a
    subject), ``node`` (a node not yet attested; ``id`` is its network address) or
    ``server`` (the server itself; ``id`` is its server id).
    """

    kind: ActorKind
    id: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}" if self.id else self.kind


@dataclass(frozen=True)
class PendingRecord:
    """A record waiting for its transaction to commit; the datastore chains it."""

    action: str
    actor: Actor
    subject: str = ""
    target: str = ""
    owner: str = ""
    outcome: Outcome = "allowed"
    reason: str = ""
    request_id: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    """One stored, chained record (see the module doc)."""

    seq: int
    time_ms: int
    actor: Actor
    action: str
    subject: str
    target: str
    owner: str
    outcome: str
    reason: str
    request_id: str
    details: str  # canonical JSON object text, exactly as hashed
    prev_hash: str
    hash: str

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.time_ms / 1000, UTC)

    def details_dict(self) -> dict[str, Any]:
        value = json.loads(self.details) if self.details else {}
        return value if isinstance(value, dict) else {}

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (``details`` as an object)."""
        return {
            "seq": self.seq,
            "time": self.time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "time_ms": self.time_ms,
            "actor_kind": self.actor.kind,
            "actor": self.actor.id,
            "action": self.action,
            "subject": self.subject,
            "target": self.target,
            "owner": self.owner,
            "outcome": self.outcome,
            "reason": self.reason,
            "request_id": self.request_id,
            "details": self.details_dict(),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


# What json.dumps builds on each call with these options; built once (no state is kept).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def canonical_details(details: Mapping[str, Any]) -> str:
    """``details`` as canonical JSON (sorted keys, no spaces): the bytes that are hashed."""
    return _CANONICAL.encode(dict(details))


def record_hash(
    *,
    seq: int,
    time_ms: int,
    actor_kind: str,
    actor_id: str,
    action: str,
    subject: str,
    target: str,
    owner: str,
    outcome: str,
    reason: str,
    request_id: str,
    details: str,
    prev_hash: str,
) -> str:
    """The record's hash over every field and the previous hash (see the module doc)."""
    blob = _COMPACT.encode(
        [
            FORMAT,
            seq,
            time_ms,
            actor_kind,
            actor_id,
            action,
            subject,
            target,
            owner,
            outcome,
            reason,
            request_id,
            details,
            prev_hash,
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def check_no_secret(pending: PendingRecord, details: str | None = None) -> None:
    """Raise :class:`InvalidAuditRecord` if any value looks like a JWT or a PEM block;
    ``details``: :func:`canonical_details` of ``pending.details``, if the caller has it."""
    values = [
        pending.actor.id,
        pending.subject,
        pending.target,
        pending.owner,
        pending.reason,
        canonical_details(pending.details) if details is None else details,
    ]
    for value in values:
        if _JWT_SHAPE.search(value) or _PEM_SHAPE.search(value):
            raise InvalidAuditRecord(
                f"audit record for {pending.action!r} holds a token or key; "
                "record its serial, jti or fingerprint instead"
            )


def chain_record(pending: PendingRecord, *, seq: int, time_ms: int, prev_hash: str) -> AuditRecord:
    """The stored form of ``pending`` as record ``seq`` after the record hashed ``prev_hash``."""
    details = canonical_details(pending.details)
    check_no_secret(pending, details)
    digest = record_hash(
        seq=seq,
        time_ms=time_ms,
        actor_kind=pending.actor.kind,
        actor_id=pending.actor.id,
        action=pending.action,
        subject=pending.subject,
        target=pending.target,
        owner=pending.owner,
        outcome=pending.outcome,
        reason=pending.reason,
        request_id=pending.request_id,
        details=details,
        prev_hash=prev_hash,
    )
    return AuditRecord(
        seq=seq,
        time_ms=time_ms,
        actor=pending.actor,
        action=pending.action,
        subject=pending.subject,
        target=pending.target,
        owner=pending.owner,
        outcome=pending.outcome,
        reason=pending.reason,
        request_id=pending.request_id,
        details=details,
        prev_hash=prev_hash,
        hash=digest,
    )


@dataclass(frozen=True)
class VerifyResult:
    """A chain that verified: how many records, the last one's seq and hash, how many
    signed checkpoints it holds and the newest record one of them covers (0: none)."""

    checked: int
    first_seq: int
    last_seq: int
    head_hash: str
    checkpoints: int = 0
    signed_through: int = 0


CheckpointCheck = Callable[["AuditRecord", Mapping[int, str]], int]
"""Checks a checkpoint record against the hashes seen so far; returns the seq it covers."""
CHECKPOINT: Final = "audit.checkpoint"
PRUNE: Final = "audit.prune"


def verify_chain(
    records: Iterable[AuditRecord],
    *,
    first_seq: int = 1,
    first_prev_hash: str = GENESIS,
    on_checkpoint: CheckpointCheck | None = None,
) -> VerifyResult:
    """Recompute the chain; raise :class:`ChainBroken` naming the first bad record.

    ``records`` must come in stored order (by ``seq``). The chain must start at
    ``first_seq`` whose ``prev_hash`` is ``first_prev_hash`` (record 1 and
    :data:`GENESIS` for a chain that was never pruned). ``on_checkpoint`` checks each
    checkpoint record (:mod:`server.audit.checkpoint`).
    """
    expected_seq = first_seq
    prev = first_prev_hash
    checked = 0
    last_hash = first_prev_hash
    seen: dict[int, str] = {first_seq - 1: first_prev_hash} if first_seq > 1 else {}
    checkpoints = 0
    signed_through = 0
    for rec in records:
        if rec.seq != expected_seq:
            if rec.seq > expected_seq:
                missing = (
                    f"{expected_seq}"
                    if rec.seq == expected_seq + 1
                    else f"{expected_seq}-{rec.seq - 1}"
                )
                problem = f"records {missing} are missing (deleted?)"
                if rec.seq == expected_seq + 1:
                    problem = f"record {missing} is missing (deleted?)"
                raise ChainBroken(expected_seq, problem, checked=checked)
            raise ChainBroken(
                rec.seq, f"out of order: found after record {expected_seq - 1}", checked=checked
            )
        recomputed = record_hash(
            seq=rec.seq,
            time_ms=rec.time_ms,
            actor_kind=rec.actor.kind,
            actor_id=rec.actor.id,
            action=rec.action,
            subject=rec.subject,
            target=rec.target,
            owner=rec.owner,
            outcome=rec.outcome,
            reason=rec.reason,
            request_id=rec.request_id,
            details=rec.details,
            prev_hash=rec.prev_hash,
        )
        if recomputed != rec.hash:
            raise ChainBroken(
                rec.seq,
                "its contents do not match its hash (modified after it was written)",
                checked=checked,
            )
        if rec.prev_hash != prev:
            raise ChainBroken(
                rec.seq,
                "it does not follow the record before it (previous hash differs: a record "
                "before it was changed, removed or swapped)",
                checked=checked,
            )
        if on_checkpoint is not None and rec.action == CHECKPOINT:
            try:
                signed_through = max(signed_through, on_checkpoint(rec, seen))
            except ChainBroken as broken:
                raise ChainBroken(broken.seq, broken.problem, checked=checked) from None
            checkpoints += 1
        if on_checkpoint is not None:
            seen[rec.seq] = rec.hash
        prev = rec.hash
        last_hash = rec.hash
        expected_seq += 1
        checked += 1
    return VerifyResult(
        checked, first_seq, expected_seq - 1, last_hash, checkpoints, signed_through
    )


def verify_trail(
    records: Iterable[AuditRecord], *, on_checkpoint: CheckpointCheck | None = None
) -> VerifyResult:
    """:func:`verify_chain` for a stored trail, which may have been pruned.

    A trail that starts after record 1 verifies only if an ``audit.prune`` record in it
    names its first record and that record's ``prev_hash``: records cut off the start
    without one are reported missing.
    """
    it = iter(records)
    first = next(it, None)
    if first is None:
        return VerifyResult(0, 1, 0, GENESIS)
    if first.seq == 1:
        return verify_chain(_prepend(first, it), on_checkpoint=on_checkpoint)
    anchors: list[tuple[int, str]] = []

    def watch(rest: Iterable[AuditRecord]) -> Iterable[AuditRecord]:
        for rec in rest:
            if rec.action == PRUNE:
                details = rec.details_dict()
                anchors.append(
                    (int(details.get("first_kept", 0)), str(details.get("first_kept_prev_hash")))
                )
            yield rec

    result = verify_chain(
        watch(_prepend(first, it)),
        first_seq=first.seq,
        first_prev_hash=first.prev_hash,
        on_checkpoint=on_checkpoint,
    )
    if (first.seq, first.prev_hash) not in anchors:
        missing = "record 1 is" if first.seq == 2 else f"records 1-{first.seq - 1} are"
        raise ChainBroken(
            1,
            f"{missing} missing and no audit.prune record accounts for them (deleted?)",
            checked=result.checked,
        )
    return result


def _prepend(first: AuditRecord, rest: Iterable[AuditRecord]) -> Iterable[AuditRecord]:
    yield first
    yield from rest
