"""Issuing workload SVIDs for agents: X509-SVID batches, JWT-SVIDs and WIT-SVID batches.

:meth:`Issuer.x509_svids` takes a batch of (entry id, CSR) requests and the entries the
agent is authorized for, and returns one result per request, in order:

* an entry that is not authorized (or has expired) fails its own item
  (:class:`~server.agents.errors.EntryNotAuthorized`); the others go on;
* each CSR is checked (signature, key type) and only its public key is used; the SVID gets
  the entry's SPIFFE ID, DNS names and TTL (the entry's, or the server's default);
* batches of at least :data:`~server.ca.pool.MIN_POOLED_BATCH` go to the signing worker
  processes (:mod:`server.ca.pool`) when they are ready, which check and sign in parallel;
  smaller batches, or any batch the pool cannot take (not started, a worker died, no active
  authority), are signed in this process, off the event loop. Both paths give the same
  certificates and the same per-item errors: a bad CSR is a ``ValueError``
  (``params[3].csr: ...``), a CA that cannot sign a :class:`~server.ca.errors.CaError`;
* metrics: in-process signing is counted by the CA itself; a pooled batch is counted once,
  with the mean time per SVID across the workers.

:meth:`Issuer.wit_svids` signs a batch of (entry id, workload public key) the same way: per
item authorization and key checks, one WIT-SVID per item with the server's ``wit_svid_ttl``
(signed in-process: one ECDSA signature per item, no certificate to build). Each WIT-SVID
is recorded by ``jti`` with the JWT-SVIDs (``issued_jwt_svids``): revoked by ``jwt revoke
--jti``, ``entry revoke`` and ``agent ban``, and listed with them for verifiers.

Authorization always happens here, in the main process, before anything is signed.
Every signed X509-SVID is recorded in the datastore (:mod:`server.revocation`) before it
is handed out; an entry revoked while its batch was being signed fails its items.

Every signed SVID and every refused item is recorded in the audit trail (serial or
``jti``, SPIFFE ID, entry, expiry; the actor is the calling agent) in one transaction
per batch, before the SVIDs are returned: if the record cannot be written, the call
fails and nothing signed leaves the server. For an X509-SVID batch that is the same
transaction as the signed SVIDs' records (each leaf is read once for both).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo.spiffe_id import SpiffeId
from credo.witsvid import WitSvid
from server import audit
from server.agents.errors import EntryNotAuthorized
from server.api.convert import parse_csr, parse_public_key
from server.ca.ca import CertificateAuthority
from server.ca.errors import CaError, PoolUnavailable
from server.ca.pool import ERROR_INVALID, SigningPool, SignItem
from server.ca.tbs import request_key_info
from server.datastore.models import IssuedJwtSvid, IssuedX509Svid, RegistrationEntry
from server.revocation import authority_id_of, jwt_record
from server.telemetry import KIND_X509, Metrics

__all__ = [
    "IssueFailed",
    "Issuer",
    "WitResult",
    "WitSvidIssued",
    "WitSvidRequest",
    "X509Result",
    "X509SvidIssued",
    "X509SvidRequest",
]

log = logging.getLogger(__name__)

_DER = serialization.Encoding.DER


@dataclass(frozen=True)
class X509SvidRequest:
    """One item of a batch: the entry to sign for, and the CSR (DER) with the public key.

    ``field`` names the CSR in error messages (``params[3].csr``).
    """

    entry_id: str
    csr: bytes
    field: str


@dataclass(frozen=True)
class X509SvidIssued:
    """A signed X509-SVID: its chain as DER, leaf first, and the leaf's NotAfter;
    ``authority_id``: the leaf's AuthorityKeyIdentifier (hex), when the signer knows it
    (:func:`~server.revocation.authority_id_of` reads it from the leaf otherwise)."""

    entry_id: str
    spiffe_id: str
    cert_chain: list[bytes]
    expires_at: int
    authority_id: str = ""


@dataclass(frozen=True)
class IssueFailed:
    """An item that was not signed; ``error`` says why (a domain error or ``ValueError``)."""

    entry_id: str
    error: Exception


@dataclass(frozen=True)
class WitSvidRequest:
    """One item of a WIT batch: the entry, and the workload's public key (DER SPKI)."""

    entry_id: str
    public_key: bytes
    field: str


@dataclass(frozen=True)
class WitSvidIssued:
    """A signed WIT-SVID and its lifetime (Unix seconds)."""

    entry_id: str
    spiffe_id: str
    token: str = dc_field(repr=False)
    issued_at: int
    expires_at: int


X509Result = X509SvidIssued | IssueFailed
WitResult = WitSvidIssued | IssueFailed


class IssuedSvidStore(Protocol):
    """Where signed X509-SVIDs are recorded (the datastore)."""

    def create_issued_x509_svids(
        self,
        svids: Sequence[IssuedX509Svid],
        *,
        audit: Callable[[frozenset[str]], Sequence[audit.PendingRecord]] | None = None,
    ) -> frozenset[str]: ...

    def create_issued_jwt_svid(self, svid: IssuedJwtSvid) -> bool: ...


_Work = list[tuple[int, RegistrationEntry, X509SvidRequest]]


class AuditWriter(Protocol):
    """Where issuance records go (the datastore)."""

    def append_audit_records(
        self, pending: Sequence[audit.PendingRecord]
    ) -> list[audit.AuditRecord]: ...


def entry_owner(entry: RegistrationEntry) -> str:
    """The entry's accountable person (``""`` if it names none)."""
    return entry.owner


def jwt_reference(token: str) -> tuple[str, dict[str, Any]]:
    """What names a JWT in a record without holding it: its ``jti`` if it has one, else
    the sha256 of the token (``token_sha256``); and the claims worth keeping."""
    claims: dict[str, Any] = {}
    try:
        part = token.split(".")[1]
        decoded = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        if isinstance(decoded, dict):
            claims = decoded
    except (IndexError, ValueError):
        pass
    kept: dict[str, Any] = {k: claims[k] for k in ("aud", "exp", "iat") if k in claims}
    jti = claims.get("jti")
    if isinstance(jti, str) and jti:
        return jti, kept
    kept["token_sha256"] = hashlib.sha256(token.encode()).hexdigest()
    return "", kept


def x509_issued_record(
    entry_id: str,
    spiffe_id: str,
    leaf_der: bytes,
    expires_at: int,
    owner: str = "",
    *,
    serial: str = "",
) -> audit.PendingRecord:
    """The audit record of one signed X509-SVID (serial as lower-case hex); ``serial``:
    the leaf's, if the caller has already read it from ``leaf_der``."""
    serial = serial or format(x509.load_der_x509_certificate(leaf_der).serial_number, "x")
    return audit.pending(
        "x509_svid.issue",
        subject=spiffe_id,
        target=serial,
        owner=owner,
        details={"entry_id": entry_id, "expires_at": expires_at},
    )


def _x509_audit(
    results: Sequence[X509Result],
    authorized: Mapping[str, RegistrationEntry],
    serials: Mapping[int, str] | None = None,
) -> list[audit.PendingRecord]:
    """One ``x509_svid.issue`` record per result: the SVID's serial (``serials[i]`` when
    already read from result ``i``'s leaf) and expiry, or the refusal."""
    records: list[audit.PendingRecord] = []
    for i, result in enumerate(results):
        entry = authorized.get(result.entry_id)
        owner = entry_owner(entry) if entry is not None else ""
        if isinstance(result, X509SvidIssued):
            records.append(
                x509_issued_record(
                    result.entry_id,
                    result.spiffe_id,
                    result.cert_chain[0],
                    result.expires_at,
                    owner,
                    serial=serials.get(i, "") if serials else "",
                )
            )
        else:
            records.append(_refusal_record("x509_svid.issue", result, entry, owner))
    return records


def _refusal_record(
    action: str, result: IssueFailed, entry: RegistrationEntry | None, owner: str
) -> audit.PendingRecord:
    """The ``refused`` audit record of one item of a signing batch."""
    return audit.pending(
        action,
        subject=entry.spiffe_id if entry is not None else "",
        owner=owner,
        outcome=audit.REFUSED,
        reason=str(result.error),
        details={"entry_id": result.entry_id},
    )


class Issuer:
    """Signs workload SVIDs for authorized entries, in worker processes or in-process."""

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        x509_svid_ttl: int = 3600,
        jwt_svid_ttl: int = 300,
        wit_svid_ttl: int = 3600,
        pool: SigningPool | None = None,
        metrics: Metrics | None = None,
        audit_writer: AuditWriter | None = None,
        issued: IssuedSvidStore | None = None,
    ) -> None:
        self._ca = ca
        self._audit = audit_writer
        self._issued = issued
        # Both the datastore: a batch's SVIDs and its audit records share one transaction.
        self._one_store = audit_writer is not None and cast(object, audit_writer) is issued
        self._x509_ttl = x509_svid_ttl
        self._jwt_ttl = jwt_svid_ttl
        self._wit_ttl = wit_svid_ttl
        self._pool = pool
        self._metrics = metrics

    async def x509_svids(
        self,
        requests: Sequence[X509SvidRequest],
        authorized: Mapping[str, RegistrationEntry],
        agent_id: str = "",
    ) -> list[X509Result]:
        """One result per request, in order (see the module doc); ``agent_id`` is the
        agent the SVIDs are for (recorded with them)."""
        now = time.time()
        results: list[X509Result | None] = [None] * len(requests)
        work: _Work = []
        for i, request in enumerate(requests):
            entry = authorized.get(request.entry_id)
            if entry is None or (entry.expires_at and entry.expires_at <= now):
                results[i] = IssueFailed(request.entry_id, EntryNotAuthorized(request.entry_id))
            else:
                work.append((i, entry, request))
        for i, result in await self._sign_work(work):
            results[i] = result
        done = [r for r in results if r is not None]
        if self._issued is not None:
            # off the event loop: reading 500 leaves and the transaction
            return await asyncio.to_thread(self._record, done, authorized, agent_id)
        if self._audit is not None:
            await asyncio.to_thread(self._audit.append_audit_records, _x509_audit(done, authorized))
        return done

    def _record(
        self, results: list[X509Result], authorized: Mapping[str, RegistrationEntry], agent_id: str
    ) -> list[X509Result]:
        """Record the signed SVIDs and the batch's audit records in one transaction; those
        of entries revoked meanwhile fail instead (and are audited as refused)."""
        assert self._issued is not None
        serials: dict[int, str] = {}
        records: list[IssuedX509Svid] = []
        for i, result in enumerate(results):
            if not isinstance(result, X509SvidIssued):
                continue
            leaf = x509.load_der_x509_certificate(result.cert_chain[0])
            serials[i] = format(leaf.serial_number, "x")
            records.append(
                IssuedX509Svid(
                    serial=serials[i],
                    authority_id=result.authority_id or authority_id_of(leaf),
                    spiffe_id=result.spiffe_id,
                    expires_at=result.expires_at,  # the leaf's NotAfter
                    entry_id=result.entry_id,
                    agent_id=agent_id,
                )
            )
        if not records:
            if self._audit is not None:
                self._audit.append_audit_records(_x509_audit(results, authorized))
            return results
        out = results
        pending = _x509_audit(results, authorized, serials)  # built before the write lock

        def audited(revoked: frozenset[str]) -> list[audit.PendingRecord]:
            nonlocal out
            if not revoked:
                return pending
            out = [
                IssueFailed(r.entry_id, EntryNotAuthorized(r.entry_id))
                if isinstance(r, X509SvidIssued) and r.entry_id in revoked
                else r
                for r in results
            ]
            return _x509_audit(out, authorized, serials)

        if self._one_store:
            self._issued.create_issued_x509_svids(records, audit=audited)
        else:
            written = audited(self._issued.create_issued_x509_svids(records))
            if self._audit is not None:
                self._audit.append_audit_records(written)
        return out

    async def _sign_work(self, work: _Work) -> list[tuple[int, X509Result]]:
        """Sign the authorized items: in the worker pool when the batch is large enough."""
        pool = self._pool
        if pool is not None and pool.usable(len(work)):
            try:
                return await self._sign_pooled(pool, work)
            except PoolUnavailable:
                pass  # the pool logged why; sign this batch here
        # CSR checks and signing are CPU-bound: keep them off the event loop.
        return await asyncio.to_thread(self._sign_batch, work)

    async def _sign_pooled(self, pool: SigningPool, work: _Work) -> list[tuple[int, X509Result]]:
        """:meth:`_sign_batch` in the worker processes; same results, metrics once per batch."""
        try:
            ca, now = self._ca.x509_snapshot()
        except CaError:
            raise PoolUnavailable("no active x509 authority") from None  # per-item errors
        items: list[SignItem] = [
            (
                request.field,
                request.csr,
                entry.spiffe_id,
                tuple(entry.dns_names),
                entry.x509_svid_ttl or self._x509_ttl,
            )
            for _, entry, request in work
        ]
        started = time.perf_counter()
        signed = await pool.sign(ca, now, items)
        seconds = time.perf_counter() - started
        chain = [c.public_bytes(_DER) for c in ca.chain]
        out: list[tuple[int, X509Result]] = []
        count = 0
        authority_id = ""
        for (i, entry, _), (leaf, expires_at, error, message) in zip(work, signed, strict=True):
            if leaf is None:
                failure: Exception = (
                    ValueError(message) if error == ERROR_INVALID else CaError(message)
                )
                out.append((i, IssueFailed(entry.id, failure)))
                continue
            count += 1
            if not authority_id:  # every leaf of this batch has the same signer
                authority_id = authority_id_of(x509.load_der_x509_certificate(leaf))
            out.append(
                (
                    i,
                    X509SvidIssued(
                        entry.id, entry.spiffe_id, [leaf, *chain], expires_at, authority_id
                    ),
                )
            )
        if count and self._metrics is not None:
            self._metrics.svids_signed.labels(KIND_X509).inc(count)
            # One observation per batch: the mean time per SVID across the workers.
            self._metrics.signing_seconds.labels(KIND_X509).observe(seconds / count)
        log.debug(
            "signed x509-svid batch in workers",
            extra={"count": count, "failed": len(work) - count, "authority_id": ca.authority_id},
        )
        return out

    def _sign_batch(self, work: _Work) -> list[tuple[int, X509Result]]:
        """Check each CSR and sign it with its entry's SPIFFE ID, DNS names and TTL."""
        out: list[tuple[int, X509Result]] = []
        ids: dict[str, SpiffeId] = {}
        for i, entry, request in work:
            try:
                public_key = parse_csr(request.csr, request.field)
                spiffe_id = ids.get(entry.spiffe_id)
                if spiffe_id is None:
                    spiffe_id = ids[entry.spiffe_id] = SpiffeId.parse(entry.spiffe_id)
                chain = self._ca.sign_x509_svid(
                    spiffe_id,
                    public_key,
                    entry.x509_svid_ttl or self._x509_ttl,
                    entry.dns_names,
                    request_key_info(request.csr),
                )
            except (ValueError, CaError) as err:
                out.append((i, IssueFailed(entry.id, err)))
                continue
            out.append(
                (
                    i,
                    X509SvidIssued(
                        entry.id,
                        entry.spiffe_id,
                        [c.public_bytes(_DER) for c in chain],
                        int(chain[0].not_valid_after_utc.timestamp()),
                    ),
                )
            )
        return out

    async def jwt_svid(
        self, entry: RegistrationEntry, audience: Sequence[str], agent_id: str = ""
    ) -> str:
        """A JWT-SVID for ``entry`` and ``audience``, with the entry's TTL (or the default);
        recorded (by ``jti``) before it is returned, refused if the entry was revoked."""
        ttl = entry.jwt_svid_ttl or self._jwt_ttl
        token = await asyncio.to_thread(
            self._ca.sign_jwt_svid, SpiffeId.parse(entry.spiffe_id), list(audience), ttl
        )
        if self._issued is not None:
            record = jwt_record(token, entry.spiffe_id, entry_id=entry.id, agent_id=agent_id)
            if not await asyncio.to_thread(self._issued.create_issued_jwt_svid, record):
                raise EntryNotAuthorized(entry.id)
        if self._audit is not None:
            await asyncio.to_thread(self._record_jwt, entry, token)
        return token

    def _record_jwt(self, entry: RegistrationEntry, token: str) -> None:
        assert self._audit is not None
        jti, details = jwt_reference(token)
        self._audit.append_audit_records(
            [
                audit.pending(
                    "jwt_svid.issue",
                    subject=entry.spiffe_id,
                    target=jti,
                    owner=entry_owner(entry),
                    details={"entry_id": entry.id, **details},
                )
            ]
        )

    async def wit_svids(
        self,
        requests: Sequence[WitSvidRequest],
        authorized: Mapping[str, RegistrationEntry],
        agent_id: str = "",
    ) -> list[WitResult]:
        """One WIT-SVID (or failure) per request, in order; off the event loop. Each is
        recorded by ``jti`` (with the JWT-SVIDs: revocable the same way) before it is
        returned, and refused if its entry was revoked meanwhile."""
        return await asyncio.to_thread(self._sign_wits, list(requests), authorized, agent_id)

    def _sign_wits(
        self,
        requests: list[WitSvidRequest],
        authorized: Mapping[str, RegistrationEntry],
        agent_id: str,
    ) -> list[WitResult]:
        now = time.time()
        out: list[WitResult] = []
        for request in requests:
            entry = authorized.get(request.entry_id)
            if entry is None or (entry.expires_at and entry.expires_at <= now):
                out.append(IssueFailed(request.entry_id, EntryNotAuthorized(request.entry_id)))
                continue
            try:
                public_key = parse_public_key(request.public_key, request.field)
                token = self._ca.sign_wit_svid(
                    SpiffeId.parse(entry.spiffe_id), public_key, self._wit_ttl
                )
            except (ValueError, CaError) as err:
                out.append(IssueFailed(entry.id, err))
                continue
            expires_at = int(WitSvid.parse_insecure(token).expires_at.timestamp())
            if self._issued is not None and not self._issued.create_issued_jwt_svid(
                jwt_record(token, entry.spiffe_id, entry_id=entry.id, agent_id=agent_id)
            ):
                out.append(IssueFailed(entry.id, EntryNotAuthorized(entry.id)))
                continue
            out.append(WitSvidIssued(entry.id, entry.spiffe_id, token, int(now), expires_at))
        if self._audit is not None:
            self._record_wits(out, authorized)
        return out

    def _record_wits(
        self, results: Sequence[WitResult], authorized: Mapping[str, RegistrationEntry]
    ) -> None:
        """One ``wit_svid.issue`` record per item: its ``jti`` and expiry, or the refusal."""
        assert self._audit is not None
        records: list[audit.PendingRecord] = []
        for result in results:
            entry = authorized.get(result.entry_id)
            owner = entry_owner(entry) if entry is not None else ""
            if isinstance(result, WitSvidIssued):
                jti, details = jwt_reference(result.token)
                records.append(
                    audit.pending(
                        "wit_svid.issue",
                        subject=result.spiffe_id,
                        target=jti,
                        owner=owner,
                        details={"entry_id": result.entry_id, **details},
                    )
                )
            else:
                records.append(_refusal_record("wit_svid.issue", result, entry, owner))
        self._audit.append_audit_records(records)
