"""Signed checkpoints: the chain head, signed by a server, kept in the chain itself.

A checkpoint is an audit record with action :data:`CHECKPOINT_ACTION` whose details
hold the ``seq`` and ``hash`` of an earlier record (the head when it was made), a
signature over :func:`checkpoint_message` by the server's own X509-SVID key
(``spiffe://<td>/credo/server``), and that SVID's chain (DER, base64, leaf first).

A checkpoint verifies when the record it names has that hash, the signature verifies
with the leaf's key, and (given a trust bundle) the chain is a valid server SVID of the
trust domain at the checkpoint's time. So an export can be checked offline against the
bundle: a forger who rewrites the chain cannot sign for the trust domain's server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from credo.bundle import X509Bundle
from credo.errors import BundleError, CredoError, X509SvidError
from credo.keys import PrivateKey
from credo.x509svid import leaf_spiffe_id, verify_x509_svid
from server.audit.context import current
from server.audit.errors import ChainBroken
from server.audit.records import AuditRecord, PendingRecord, check_no_secret

__all__ = [
    "CHECKPOINT_ACTION",
    "SERVER_PATH",
    "Checkpointer",
    "checkpoint_details",
    "checkpoint_message",
    "checkpoint_verifier",
    "sign_message",
]

log = logging.getLogger(__name__)

CHECKPOINT_ACTION: Final = "audit.checkpoint"
SERVER_PATH: Final = "/credo/server"


def checkpoint_message(seq: int, record_hash: str) -> bytes:
    """The bytes a checkpoint signs: the format, the head's seq and hash."""
    return f"credo-audit-checkpoint-v1\n{seq}\n{record_hash}\n".encode()


def sign_message(key: PrivateKey, message: bytes) -> bytes:
    """ECDSA (SHA-256) or RSA PKCS#1 v1.5 (SHA-256) over ``message``."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    raise TypeError(f"cannot sign checkpoints with a {type(key).__name__}")


def checkpoint_details(
    seq: int, record_hash: str, signature: bytes, chain: list[bytes]
) -> dict[str, object]:
    return {
        "seq": seq,
        "hash": record_hash,
        "signature": base64.b64encode(signature).decode(),
        "chain": [base64.b64encode(c).decode() for c in chain],
    }


def _verify_signature(leaf: x509.Certificate, signature: bytes, message: bytes) -> None:
    key = leaf.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise InvalidSignature(f"unsupported key {type(key).__name__}")


def checkpoint_verifier(
    roots_pem: bytes | None,
) -> Callable[[AuditRecord, Mapping[int, str]], int]:
    """A check for :func:`~server.audit.records.verify_chain`'s ``on_checkpoint``.

    It returns the seq the checkpoint covers, or raises :class:`ChainBroken` at the
    checkpoint record. With ``roots_pem`` (the trust domain's X.509 authorities, PEM) the
    signer must be the trust domain's server, with a chain valid at the checkpoint's time.
    """

    def check(rec: AuditRecord, hashes_by_seq: Mapping[int, str]) -> int:
        details = rec.details_dict()
        try:
            seq = int(details["seq"])
            head = str(details["hash"])
            signature = base64.b64decode(str(details["signature"]), validate=True)
            chain = [
                x509.load_der_x509_certificate(base64.b64decode(str(c), validate=True))
                for c in details["chain"]
            ]
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise ChainBroken(rec.seq, "checkpoint is malformed") from None
        if not chain:
            raise ChainBroken(rec.seq, "checkpoint has no certificate")
        pruned = seq not in hashes_by_seq and bool(hashes_by_seq) and seq < min(hashes_by_seq)
        if seq not in hashes_by_seq and not pruned:
            raise ChainBroken(rec.seq, f"checkpoint names record {seq}, which is not before it")
        if not pruned and hashes_by_seq[seq] != head:
            raise ChainBroken(
                rec.seq,
                f"checkpoint signed record {seq} with a different hash: records up to "
                f"{seq} were rewritten after it was signed",
            )
        try:
            _verify_signature(chain[0], signature, checkpoint_message(seq, head))
        except InvalidSignature:
            raise ChainBroken(rec.seq, "checkpoint signature does not verify") from None
        if roots_pem is not None:
            at = datetime.fromtimestamp(rec.time_ms / 1000, UTC)
            try:
                bundle = X509Bundle.parse_pem(leaf_spiffe_id(chain[0]).trust_domain, roots_pem)
                signer = verify_x509_svid(chain, bundle, now=at)
            except (X509SvidError, BundleError) as err:
                raise ChainBroken(
                    rec.seq, f"checkpoint is not signed by a server of this trust domain: {err}"
                ) from None
            if signer.path != SERVER_PATH:
                raise ChainBroken(
                    rec.seq, f"checkpoint is signed by {signer}, not by the trust domain's server"
                )
        return 0 if pruned else seq  # a pruned record's hash cannot be compared

    return check


class CheckpointSigner(Protocol):
    """Signs checkpoint messages: the server's identity (its SVID key and chain)."""

    def sign_checkpoint(self, message: bytes) -> tuple[bytes, list[bytes]]: ...


class CheckpointStore(Protocol):
    """Where the chain lives (the datastore)."""

    def fetch_audit_head(self) -> AuditRecord | None: ...
    def append_audit_records(self, pending: Sequence[PendingRecord]) -> list[AuditRecord]: ...


def pending(action: str, *, target: str, details: Mapping[str, object]) -> PendingRecord:
    """A record by the current actor (``server.audit.pending`` without the import cycle)."""
    ctx = current()
    made = PendingRecord(
        action=action,
        actor=ctx.actor,
        target=target,
        request_id=ctx.request_id,
        details=dict(details),
    )
    check_no_secret(made)
    return made


class Checkpointer:
    """Signs the chain head into the chain: every ``interval`` seconds, and on request."""

    def __init__(self, store: CheckpointStore, signer: CheckpointSigner, interval: float) -> None:
        self._store = store
        self._signer = signer
        self._interval = interval

    def checkpoint(self) -> AuditRecord | None:
        """Append a checkpoint of the current head; ``None`` if the head is one already."""
        head = self._store.fetch_audit_head()
        if head is None or head.action == CHECKPOINT_ACTION:
            return head
        signature, chain = self._signer.sign_checkpoint(checkpoint_message(head.seq, head.hash))
        record = pending(
            CHECKPOINT_ACTION,
            target=str(head.seq),
            details=checkpoint_details(head.seq, head.hash, signature, chain),
        )
        return self._store.append_audit_records([record])[0]

    async def run(self, stop: asyncio.Event) -> None:
        """Checkpoint every ``interval`` seconds until ``stop``; errors are logged."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
            if stop.is_set():
                return
            try:
                made = await asyncio.to_thread(self.checkpoint)
            except CredoError as err:
                log.error("audit checkpoint failed", extra={"error": str(err)})
                continue
            if made is not None and made.action == CHECKPOINT_ACTION:
                log.debug("audit checkpoint", extra={"seq": made.seq, "covers": made.target})
