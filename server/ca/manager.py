"""The authority manager: creates, rotates, taints and revokes the CA's signing authorities.

Modelled on SPIRE's CA manager. For each kind (``x509``: the X.509 CA; ``jwt``: the JWT-SVID
signing key; ``wit``: the WIT-SVID signing key, rotated like the JWT key) there is at most
one ``active`` authority (it signs), at most one ``prepared`` authority (the next one,
already published in the bundle), and ``old`` authorities (no longer sign, stay in the
bundle until they expire).

Rotation, one :meth:`AuthorityManager.tick` at a time (``run`` calls it every
``rotation_check_interval`` seconds; tests call it with an explicit ``now``):

* no active authority: activate the prepared one, or create one and activate it;
* the active one has lived half its life: prepare the next one and publish it;
* the active one has a sixth of its life left (or has expired): activate the prepared
  one; the previous active becomes ``old``;
* an ``old`` authority past its NotAfter is pruned (row, key, and bundle entry).

Every step is persisted before the next: the private key first (key manager), then the
datastore row with its status, then the bundle. On start the manager reconciles (in its own
rows only, see below) what a crash (even ``kill -9``) may have left half done:

* a prepared or active row whose key is missing is dropped (logged); an old row without
  its key is kept, since old authorities never sign and only their public part matters;
* a key (``x509-ca-*`` / ``jwt-*`` / ``wit-*``) with no row is deleted;
* several prepared rows: the newest is kept; several active rows: the newest stays
  active, the others become old; no active row but a prepared one: it is activated.

After every change the manager publishes the SPIFFE bundle (:mod:`server.ca.publisher`),
a taint included (agents learn the tainted ids from :meth:`tainted_authority_ids`, since
the JWKS format has no taint flag). With an upstream CA (:mod:`server.ca.upstream`) every
X.509 authority is an intermediate under it, and the bundle holds the upstream root(s).

Several servers on one database (HA): each server has its own CA and JWT key, as in
SPIRE. Every row carries the ``owner`` server id (``config.server_id``, from
``<data-dir>/server_id``); a manager rotates, reconciles, taints and revokes only its
own rows and never drops or changes another server's (a row of another owner past its
NotAfter may be pruned by anyone, so a server that is gone for good does not leave its
authorities behind). Rows from before owners existed (owner ``""``) are adopted on start
by the server whose key manager holds their key. The published bundle is the union of
every owner's authorities.

Authority ids: the lowercase hex SubjectKeyIdentifier of the CA certificate (``x509``),
the ``kid`` (32 random letters and digits) for ``jwt`` and ``wit``. Key ids in the key
manager are ``x509-ca-<authority id>``, ``jwt-<kid>`` and ``wit-<kid>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import string
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo.bundle import Bundle
from credo.errors import CredoError
from credo.keys import KeyType, PrivateKey, PublicKey, generate_private_key
from credo.spiffe_id import TrustDomain
from credo.x509svid import signature_hash_for
from server.ca import templates
from server.ca.ca import X509CA, CertificateAuthority, Clock, JwtKey, utc_now
from server.ca.errors import AuthorityNotFound, InvalidAuthorityState, UpstreamCaError
from server.ca.keymanager import KeyManager
from server.ca.pool import x509_ca_key_id
from server.ca.publisher import BundlePublisher, BundleStore
from server.ca.upstream import UpstreamCa, load_upstream_ca, spki_der
from server.config import ServerConfig
from server.datastore.errors import NotFound
from server.datastore.models import Authority, AuthorityKind
from server.datastore.snapshot import Snapshot

__all__ = [
    "KINDS",
    "AuthorityChange",
    "AuthorityInfo",
    "AuthorityManager",
    "AuthorityManagerConfig",
    "AuthorityState",
    "AuthorityStore",
    "key_id_for",
]

log = logging.getLogger(__name__)

KINDS: tuple[AuthorityKind, ...] = ("x509", "jwt", "wit")
_KID_ALPHABET = string.ascii_letters + string.digits
# Seconds a check may work from the last read of the CA journal when nothing says it moved.
_JOURNAL_REREAD = 60.0
_MAX_REFRESH_HINT = 300


class AuthorityStore(BundleStore, Protocol):
    """The datastore calls the manager needs (``SqlDataStore`` provides them)."""

    def create_authority(self, authority: Authority) -> Authority: ...

    def fetch_authority(self, authority_id: str) -> Authority | None: ...

    def list_authorities(
        self, kind: str | None = None, owner: str | None = None
    ) -> list[Authority]: ...

    def update_authority(self, authority: Authority) -> Authority: ...

    def delete_authority(self, authority_id: str) -> Authority: ...


@dataclass(frozen=True)
class AuthorityManagerConfig:
    """What the manager needs from the server config; durations in seconds."""

    trust_domain: TrustDomain
    ca_ttl: int = 24 * 3600
    # 0 means "same as ca_ttl", as in SPIRE.
    jwt_key_ttl: int = 0
    x509_svid_ttl: int = 3600
    ca_key_type: KeyType = KeyType.EC_P256
    jwt_key_type: KeyType = KeyType.EC_P256
    upstream_ca_cert: Path | None = None
    upstream_ca_key: Path | None = None
    rotation_check_interval: float = 5.0
    # This server's id (``<data-dir>/server_id``): the ``owner`` of the rows it manages.
    server_id: str = ""
    # ``spiffe_refresh_hint`` in seconds; 0: a tenth of the CA TTL, at most 5 minutes.
    bundle_refresh_hint: int = 0

    @property
    def effective_jwt_key_ttl(self) -> int:
        """The JWT key lifetime: ``jwt_key_ttl``, or ``ca_ttl`` when 0."""
        return self.jwt_key_ttl or self.ca_ttl

    @property
    def refresh_hint(self) -> int:
        """``spiffe_refresh_hint``: ``bundle_refresh_hint``, or a tenth of the CA TTL, at
        most 5 minutes."""
        if self.bundle_refresh_hint > 0:
            return self.bundle_refresh_hint
        return max(1, min(self.ca_ttl // 10, _MAX_REFRESH_HINT))

    @classmethod
    def from_server_config(
        cls, config: ServerConfig, server_id: str = ""
    ) -> AuthorityManagerConfig:
        """Take the CA settings from the server's config."""
        return cls(
            server_id=server_id,
            trust_domain=TrustDomain.parse(config.trust_domain),
            ca_ttl=config.ca_ttl,
            x509_svid_ttl=config.x509_svid_ttl,
            ca_key_type=KeyType(config.ca_key_type),
            jwt_key_type=KeyType(config.jwt_key_type),
            upstream_ca_cert=config.upstream_ca_cert,
            upstream_ca_key=config.upstream_ca_key,
            rotation_check_interval=config.rotation_check_interval,
            bundle_refresh_hint=config.bundle_refresh_hint,
        )


@dataclass(frozen=True)
class AuthorityInfo:
    """What the CLI shows about one authority."""

    authority_id: str
    expires_at: datetime
    tainted: bool
    status: Literal["prepared", "active", "old"]


@dataclass(frozen=True)
class AuthorityState:
    """The authorities of one kind: active, prepared and the most recent old one."""

    active: AuthorityInfo | None
    prepared: AuthorityInfo | None
    old: AuthorityInfo | None


@dataclass(frozen=True)
class AuthorityChange:
    """Passed to ``on_change`` callbacks: ``action`` happened to ``authority_id``.

    ``action`` is one of ``prepared``, ``activated``, ``tainted``, ``revoked``, ``pruned``,
    ``dropped`` (reconciliation removed it).
    """

    kind: AuthorityKind
    action: str
    authority_id: str


def _ts(value: datetime) -> int:
    return int(value.timestamp())


def _dt(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def key_id_for(row: Authority) -> str:
    """The key manager id of an authority's private key."""
    if row.kind == "x509":
        return x509_ca_key_id(row.authority_id)
    return f"{row.kind}-{row.authority_id}"


def _info(row: Authority) -> AuthorityInfo:
    return AuthorityInfo(row.authority_id, _dt(row.not_after), row.tainted, row.status)


class AuthorityManager:
    """Keeps the CA's X.509, JWT and WIT authorities rotated, persisted and published."""

    def __init__(
        self,
        config: AuthorityManagerConfig,
        datastore: AuthorityStore,
        key_manager: KeyManager,
        *,
        ca: CertificateAuthority | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.config = config
        self.datastore = datastore
        self.key_manager = key_manager
        self._clock = clock
        self.ca = ca if ca is not None else CertificateAuthority(config.trust_domain, clock=clock)
        self.on_change: list[Callable[[AuthorityChange], None]] = []
        self._lock = threading.RLock()
        # The last read of the whole CA journal (see tick).
        self._journal = Snapshot(lambda: self.datastore.list_authorities(), _JOURNAL_REREAD)
        self._started = False
        self._upstream: UpstreamCa | None = None
        self.publisher = BundlePublisher(config.trust_domain, datastore, config.refresh_hint)
        if (config.upstream_ca_cert is None) != (config.upstream_ca_key is None):
            raise UpstreamCaError("upstream ca certificate and key must be given together")

    @property
    def owner(self) -> str:
        """The ``owner`` of the authority rows this manager manages."""
        return self.config.server_id

    # --- lifecycle --------------------------------------------------------------------

    def start(self, now: datetime | None = None) -> None:
        """Load the upstream CA, reconcile the journal, make sure both kinds are active."""
        with self._lock:
            if self.config.upstream_ca_cert is not None and self.config.upstream_ca_key is not None:
                self._upstream = load_upstream_ca(
                    self.config.upstream_ca_cert, self.config.upstream_ca_key
                )
                self.publisher.upstream = self._upstream
            self._reconcile()
            self._started = True
            self.tick(now)
            self._publish_bundle()

    async def run(
        self, stop_event: asyncio.Event, journal_generation: Callable[[], object] | None = None
    ) -> None:
        """Run :meth:`tick` every ``rotation_check_interval`` seconds until ``stop_event``.

        ``journal_generation`` (see :meth:`tick`) spares an idle server the journal read of
        each check.
        """
        if not self._started:
            await asyncio.to_thread(self.start)
        while not stop_event.is_set():
            try:
                await asyncio.wait_for(stop_event.wait(), self.config.rotation_check_interval)
            except TimeoutError:
                pass
            else:
                return
            try:
                await asyncio.to_thread(self.tick, None, journal_generation)
            except (CredoError, OSError) as err:
                log.error("authority rotation step failed", extra={"error": str(err)})

    def _reconcile(self) -> None:
        """Repair what a crash in the middle of a step may have left behind."""
        key_ids = set(self.key_manager.list_key_ids())
        self._adopt_legacy(key_ids)
        keep: set[str] = set()
        for kind in KINDS:
            rows = self.datastore.list_authorities(kind, owner=self.owner)
            live: list[Authority] = []
            for row in rows:
                if key_id_for(row) in key_ids or row.status == "old":
                    live.append(row)
                    continue
                self.datastore.delete_authority(row.authority_id)
                log.warning(
                    "dropped authority whose private key is missing",
                    extra={"kind": kind, "authority_id": row.authority_id, "status": row.status},
                )
                self._emit(kind, "dropped", row.authority_id)
            prepared = [r for r in live if r.status == "prepared"]
            for row in prepared[:-1]:
                self._delete(row, "dropped")
                live.remove(row)
            active = [r for r in live if r.status == "active"]
            for row in active[:-1]:
                demoted = self.datastore.update_authority(replace(row, status="old"))
                live[live.index(row)] = demoted
                log.warning(
                    "demoted extra active authority to old",
                    extra={"kind": kind, "authority_id": row.authority_id},
                )
            keep.update(key_id_for(r) for r in live)
        for key_id in sorted(key_ids - keep):
            if key_id.startswith(("x509-ca-", "jwt-", "wit-")):
                self.key_manager.delete_key(key_id)
                log.warning("deleted private key with no authority", extra={"key_id": key_id})

    def _adopt_legacy(self, key_ids: set[str]) -> None:
        """Take ownership of rows without an owner whose private key this server holds."""
        if not self.owner:
            return
        for row in self.datastore.list_authorities(owner=""):
            if key_id_for(row) not in key_ids:
                continue  # another server's (or a lost key: pruned by anyone once expired)
            self.datastore.update_authority(replace(row, owner=self.owner))
            log.info(
                "adopted authority written before server ids",
                extra={"kind": row.kind, "authority_id": row.authority_id},
            )

    # --- rotation ---------------------------------------------------------------------

    def tick(
        self, now: datetime | None = None, generation: Callable[[], object] | None = None
    ) -> None:
        """Do whatever rotation step is due at ``now`` (default: the clock) for both kinds.

        ``generation`` returns a value that moves whenever the CA journal may have changed
        (the server passes its change feed's position with the datastore's count of
        committed writes: a journal write by another server publishes the bundle, an event,
        and this server's own writes are counted). While it stands still, for at most
        a minute, the check works from the journal it read last: the steps depend only
        on the rows and the time.
        """
        now = now or self._clock()
        with self._lock:
            # One read of the CA journal per check (it runs every few seconds on every
            # server): each kind's step and the pruning work from it. A kind's step only
            # writes rows of that kind, so the snapshot stays right for the next kinds.
            snapshot = self._journal.get(generation)
            for kind in KINDS:
                self._tick_kind(kind, now, snapshot)
            self._prune_foreign(now, snapshot)

    def _rows(
        self, kind: AuthorityKind, snapshot: list[Authority] | None = None
    ) -> tuple[Authority | None, Authority | None, list[Authority]]:
        if snapshot is None:
            rows = self.datastore.list_authorities(kind, owner=self.owner)
        else:
            rows = [
                r
                for r in snapshot
                if r.kind == kind and (self.owner is None or r.owner == self.owner)
            ]
        active = [r for r in rows if r.status == "active"]
        prepared = [r for r in rows if r.status == "prepared"]
        old = [r for r in rows if r.status == "old"]
        return (active[-1] if active else None, prepared[-1] if prepared else None, old)

    def _lifetime(self, row: Authority) -> tuple[datetime, datetime]:
        if row.kind == "x509":
            cert = x509.load_der_x509_certificate(row.public_data)
            return cert.not_valid_before_utc, cert.not_valid_after_utc
        return _dt(row.created_at), _dt(row.not_after)

    def _tick_kind(
        self, kind: AuthorityKind, now: datetime, snapshot: list[Authority] | None = None
    ) -> None:
        active, prepared, old = self._rows(kind, snapshot)
        if active is None:
            if prepared is None:
                prepared = self._prepare(kind, now)
            self._activate(prepared)
        else:
            not_before, not_after = self._lifetime(active)
            life = not_after - not_before
            if prepared is None and now >= not_before + life / 2:
                prepared = self._prepare(kind, now)
            if prepared is not None and now >= not_after - life / 6:
                self._activate(prepared)
            else:
                self._load_active(active)
        for row in old:
            if _dt(row.not_after) <= now:
                self._delete(row, "pruned")

    def _prune_foreign(self, now: datetime, snapshot: list[Authority] | None = None) -> None:
        """Prune other servers' authorities past their NotAfter (the row only: no key here)."""
        pruned: list[Authority] = []
        rows = self.datastore.list_authorities() if snapshot is None else snapshot
        for row in rows:
            if row.owner == self.owner or _dt(row.not_after) > now:
                continue
            try:
                self.datastore.delete_authority(row.authority_id)
            except NotFound:
                continue  # another server pruned it first
            pruned.append(row)
            log.info(
                "pruned expired authority of another server",
                extra={"kind": row.kind, "authority_id": row.authority_id, "owner": row.owner},
            )
        if pruned:
            self._publish_bundle()
            for row in pruned:
                self._emit(row.kind, "pruned", row.authority_id)

    def _prepare(self, kind: AuthorityKind, now: datetime) -> Authority:
        """Create the next authority: key first, then the row, then the bundle."""
        row = self._prepare_x509(now) if kind == "x509" else self._prepare_jwt(now, kind)
        log.info(
            "prepared authority",
            extra={"kind": kind, "authority_id": row.authority_id, "expires_at": row.not_after},
        )
        self._publish_bundle()
        self._emit(kind, "prepared", row.authority_id)
        return row

    def _prepare_x509(self, now: datetime) -> Authority:
        key = generate_private_key(self.config.ca_key_type)
        ttl = timedelta(seconds=self.config.ca_ttl)
        upstream = self._upstream
        if upstream is None:
            builder = templates.ca_template(self.config.trust_domain, key.public_key(), ttl, now)
            cert = builder.sign(key, signature_hash_for(key))
        else:
            expires = upstream.certificate.not_valid_after_utc
            if expires <= now + timedelta(seconds=60):
                raise UpstreamCaError(
                    f"upstream ca certificate expires at {expires.isoformat()}; expected it "
                    "valid for at least another minute to sign a new intermediate ca"
                )
            builder = templates.ca_template(
                self.config.trust_domain, key.public_key(), ttl, now, upstream.certificate
            )
            cert = builder.sign(upstream.private_key, signature_hash_for(upstream.private_key))
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        authority_id = ski.digest.hex()
        row = Authority(
            authority_id=authority_id,
            kind="x509",
            status="prepared",
            not_after=_ts(cert.not_valid_after_utc),
            public_data=cert.public_bytes(serialization.Encoding.DER),
            created_at=_ts(now),
            owner=self.owner,
        )
        self.key_manager.store_key(key_id_for(row), key)
        return self.datastore.create_authority(row)

    def _prepare_jwt(self, now: datetime, kind: AuthorityKind = "jwt") -> Authority:
        """A JWT or WIT signing key (same key type and lifetime): key first, then the row."""
        kid = "".join(secrets.choice(_KID_ALPHABET) for _ in range(32))
        key = self.key_manager.generate_key(f"{kind}-{kid}", self.config.jwt_key_type)
        row = Authority(
            authority_id=kid,
            kind=kind,
            status="prepared",
            not_after=_ts(now + timedelta(seconds=self.config.effective_jwt_key_ttl)),
            public_data=spki_der(key),
            created_at=_ts(now),
            owner=self.owner,
        )
        return self.datastore.create_authority(row)

    def _activate(self, prepared: Authority) -> None:
        """Demote the active authority to old, then promote ``prepared`` (crash-safe order)."""
        active, _, _ = self._rows(prepared.kind)
        if active is not None:
            self.datastore.update_authority(replace(active, status="old"))
        row = self.datastore.update_authority(replace(prepared, status="active"))
        self._load_active(row)
        log.info(
            "activated authority",
            extra={
                "kind": row.kind,
                "authority_id": row.authority_id,
                "previous_authority_id": active.authority_id if active else "",
                "expires_at": row.not_after,
            },
        )
        self._publish_bundle()
        self._emit(row.kind, "activated", row.authority_id)

    def _load_active(self, row: Authority) -> None:
        """Put ``row``'s authority in the CA's active slot unless it is already there."""
        if row.kind == "x509":
            current = self.ca.x509_ca
            if current is not None and current.authority_id == row.authority_id:
                return
        else:
            signing = self.ca.jwt_key if row.kind == "jwt" else self.ca.wit_key
            if signing is not None and signing.kid == row.authority_id:
                return
        key = self.key_manager.get_key(key_id_for(row))
        if key is None:
            raise InvalidAuthorityState(
                row.kind,
                row.authority_id,
                f"{row.kind} authority {row.authority_id!r} has no private key "
                f"{key_id_for(row)!r}; expected it in the key manager",
            )
        if row.kind == "x509":
            cert = x509.load_der_x509_certificate(row.public_data)
            chain = self._upstream.intermediates if self._upstream is not None else ()
            self.ca.set_x509_ca(X509CA(row.authority_id, cert, key, chain))
        elif row.kind == "jwt":
            self.ca.set_jwt_key(JwtKey(row.authority_id, key, _dt(row.not_after)))
        else:
            self.ca.set_wit_key(JwtKey(row.authority_id, key, _dt(row.not_after)))

    def _delete(self, row: Authority, action: str) -> None:
        """Remove an authority: the row first (so no crash leaves a row without its key)."""
        # NotFound: another server pruned it (expired) first; the key is still ours to delete.
        with contextlib.suppress(NotFound):
            self.datastore.delete_authority(row.authority_id)
        self.key_manager.delete_key(key_id_for(row))
        log.info(
            f"{action} authority",
            extra={"kind": row.kind, "authority_id": row.authority_id, "action": action},
        )
        self._publish_bundle()
        self._emit(row.kind, action, row.authority_id)

    def _emit(self, kind: AuthorityKind, action: str, authority_id: str) -> None:
        change = AuthorityChange(kind, action, authority_id)
        for callback in list(self.on_change):
            callback(change)

    # --- bundle -----------------------------------------------------------------------

    def _publish_bundle(self, *, force: bool = False) -> Bundle:
        return self.publisher.publish(force=force)

    def bundle(self) -> Bundle:
        """The trust domain's current bundle as stored in the datastore."""
        current = self.publisher.current()
        if current is None:
            with self._lock:
                return self._publish_bundle()
        return current

    # --- manual control (credo-server localauthority ...) ------------------------------

    def _find(self, kind: AuthorityKind, authority_id: str) -> Authority:
        row = self.datastore.fetch_authority(authority_id)
        if row is None or row.kind != kind:
            raise AuthorityNotFound(kind, authority_id)
        if row.owner != self.owner:
            raise InvalidAuthorityState(
                kind,
                authority_id,
                f"{kind} authority {authority_id!r} belongs to another server "
                f"(server id {row.owner or '(none)'}); run the command against that server",
            )
        return row

    def state(self, kind: AuthorityKind) -> AuthorityState:
        """The active, prepared and most recent old authority of ``kind``."""
        active, prepared, old = self._rows(kind)
        return AuthorityState(
            active=_info(active) if active else None,
            prepared=_info(prepared) if prepared else None,
            old=_info(old[-1]) if old else None,
        )

    def prepare(self, kind: AuthorityKind) -> AuthorityInfo:
        """Prepare a new authority of ``kind`` now, replacing any prepared one."""
        with self._lock:
            _, previous, _ = self._rows(kind)
            row = self._prepare(kind, self._clock())
            if previous is not None:
                self._delete(previous, "dropped")
            return _info(row)

    def activate(self, kind: AuthorityKind, authority_id: str) -> AuthorityInfo:
        """Activate the prepared authority ``authority_id``; the active one becomes old."""
        with self._lock:
            row = self._find(kind, authority_id)
            if row.status != "prepared":
                _, prepared, _ = self._rows(kind)
                expected = (
                    f"the prepared authority {prepared.authority_id!r}"
                    if prepared
                    else "a prepared authority (run prepare first)"
                )
                raise InvalidAuthorityState(
                    kind,
                    authority_id,
                    f"cannot activate {kind} authority {authority_id!r}: it is {row.status}; "
                    f"expected {expected}",
                )
            self._activate(row)
            return _info(self._find(kind, authority_id))

    def taint(self, kind: AuthorityKind, authority_id: str) -> AuthorityInfo:
        """Mark an old authority tainted: agents re-issue the SVIDs it signed."""
        with self._lock:
            row = self._find(kind, authority_id)
            if row.status != "old":
                raise InvalidAuthorityState(
                    kind,
                    authority_id,
                    f"cannot taint {kind} authority {authority_id!r}: it is {row.status}; "
                    "only an old authority can be tainted (activate its successor first)",
                )
            if row.tainted:
                raise InvalidAuthorityState(
                    kind,
                    authority_id,
                    f"cannot taint {kind} authority {authority_id!r}: it is already tainted",
                )
            row = self.datastore.update_authority(replace(row, tainted=True))
            log.warning("tainted authority", extra={"kind": kind, "authority_id": authority_id})
            self._publish_bundle(force=True)
            self._emit(kind, "tainted", authority_id)
            return _info(row)

    def revoke(self, kind: AuthorityKind, authority_id: str) -> AuthorityInfo:
        """Remove a tainted authority from the journal, the key manager and the bundle."""
        with self._lock:
            row = self._find(kind, authority_id)
            if not row.tainted:
                raise InvalidAuthorityState(
                    kind,
                    authority_id,
                    f"cannot revoke {kind} authority {authority_id!r}: it is not tainted; "
                    "taint it first",
                )
            self._delete(row, "revoked")
            return _info(row)

    def tainted_authority_ids(self, kind: AuthorityKind) -> frozenset[str]:
        """Ids of the tainted (not yet revoked) authorities of ``kind``."""
        return frozenset(r.authority_id for r in self.datastore.list_authorities(kind) if r.tainted)

    # --- server identity --------------------------------------------------------------

    def sign_server_svid(
        self,
        key: PublicKey | PrivateKey,
        dns_names: Sequence[str] = templates.DEFAULT_SERVER_DNS_NAMES,
    ) -> list[x509.Certificate]:
        """Sign the server's own SVID for ``key`` with the X.509-SVID TTL; re-sign at half-life."""
        return self.ca.sign_server_svid(key, self.config.x509_svid_ttl, dns_names)
