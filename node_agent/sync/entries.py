"""The agent's view of what the server authorized: registration entries and bundles.

:class:`RegistrationEntry` is a registration entry in Credo's model types (the server's
:class:`server.datastore.models.RegistrationEntry`, as far as an agent needs it);
:class:`SyncMessage` is one message of the sync stream, already converted from protobuf by
:mod:`node_agent.server_client`; :class:`SyncState` is what the stream has built so far —
entries by id, the own bundle (with which authorities are tainted) and the federated
bundles — and applies each message to itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from credo._protocol import entries_digest
from credo.bundle import Bundle
from credo.selector import Selector
from credo.spiffe_id import SpiffeId

__all__ = ["Crls", "RegistrationEntry", "SyncMessage", "SyncState", "TrustBundles"]


@dataclass(frozen=True)
class RegistrationEntry:
    """A registration entry the server authorized for this agent."""

    id: str
    spiffe_id: SpiffeId
    parent_id: str
    selectors: frozenset[Selector]
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    admin: bool = False
    downstream: bool = False
    node_alias: bool = False
    hint: str = ""
    expires_at: int = 0
    federates_with: tuple[str, ...] = ()
    revision_number: int = 0
    created_at: int = 0

    @property
    def sort_key(self) -> tuple[int, str]:
        """Deterministic order of identities: oldest entry first, then by id."""
        return (self.created_at, self.id)

    def svid_shape(self) -> tuple[object, ...]:
        """What the X509-SVID depends on; when it changes the SVID must be re-issued."""
        return (str(self.spiffe_id), self.dns_names, self.x509_svid_ttl, self.revision_number)


@dataclass(frozen=True)
class Crls:
    """The current CRL (DER) of every X.509 authority of the trust domain, and the serial
    numbers they revoke."""

    der: tuple[bytes, ...] = ()
    revoked_serials: frozenset[int] = frozenset()


@dataclass(frozen=True)
class TrustBundles:
    """The own bundle, which of its X.509 authorities are tainted, and federated bundles."""

    bundle: Bundle
    tainted_x509: frozenset[bytes] = frozenset()
    """DER of the own bundle's X.509 authorities marked tainted."""
    federated: Mapping[str, Bundle] = field(default_factory=dict)
    """Trust domain name -> bundle."""
    tainted_jwt: frozenset[str] = frozenset()
    """Key IDs of the own bundle's JWT and WIT authorities marked tainted."""
    crls: Crls = Crls()
    """The trust domain's CRLs, as the server last sent them."""
    revoked_jtis: frozenset[str] = frozenset()
    """``jti`` of every revoked, unexpired JWT-SVID of the trust domain."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "federated", MappingProxyType(dict(self.federated)))


@dataclass(frozen=True)
class SyncMessage:
    """One message of the ``SyncEntries`` stream.

    ``full``: ``entries`` is the whole authorized set (or the first part of it, when split)
    and replaces what the agent holds; otherwise ``entries`` are created or updated entries
    and ``deleted_entry_ids`` removed ones. ``bundle`` (with its tainted authorities) comes
    on full messages and whenever it changed; ``federated_bundles`` whenever they changed;
    ``crls`` (None: unchanged) on full messages and whenever a CRL changed.
    """

    event_id: int
    full: bool = False
    entries: tuple[RegistrationEntry, ...] = ()
    deleted_entry_ids: tuple[str, ...] = ()
    bundle: Bundle | None = None
    tainted_x509: frozenset[bytes] = frozenset()
    tainted_jwt: frozenset[str] = frozenset()
    federated_bundles: tuple[Bundle, ...] = ()
    crls: Crls | None = None
    revoked_jtis: frozenset[str] | None = None
    """None: unchanged; otherwise every revoked, unexpired JWT-SVID's ``jti``."""
    heartbeat_interval: float = 0.0
    """Seconds between the server's heartbeats on this stream; 0: it sends none."""
    digest: bytes = b""
    """Set on heartbeats only (no changes): the digest of every entry the server holds for
    the agent as of ``event_id`` (:func:`credo._protocol.entries_digest`)."""

    @property
    def heartbeat(self) -> bool:
        """Whether this is a heartbeat (no changes, the server's event id and digest)."""
        return bool(self.digest)


class SyncState:
    """Entries by id, trust bundles and the last event id, built from the sync stream."""

    def __init__(self) -> None:
        self.entries: dict[str, RegistrationEntry] = {}
        self.bundles: TrustBundles | None = None
        self.crls = Crls()
        self.revoked_jtis: frozenset[str] = frozenset()
        self.last_event_id = 0
        self.complete = False
        """False while the messages of a split full set are still arriving."""

    def digest(self) -> bytes:
        """The digest of the entries held, comparable with a heartbeat's."""
        return entries_digest((e.id, e.revision_number) for e in self.entries.values())

    def apply(self, message: SyncMessage) -> tuple[bool, bool]:
        """Apply one message; return (entries changed, bundles changed)."""
        entries_changed = False
        if message.full:
            fresh = {entry.id: entry for entry in message.entries}
            entries_changed = fresh != self.entries
            self.entries = fresh
        else:
            for entry in message.entries:
                if self.entries.get(entry.id) != entry:
                    self.entries[entry.id] = entry
                    entries_changed = True
            for entry_id in message.deleted_entry_ids:
                if self.entries.pop(entry_id, None) is not None:
                    entries_changed = True
        bundles_changed = self._apply_bundles(message)
        if message.full:
            # A full set split over several messages starts with event_id 0; only its last
            # message carries the event id, and nothing before that may be resumed from.
            # (An unsplit set with entries always has a non-zero event id: creating an
            # entry is an event. An empty set may have id 0 on a fresh server.)
            self.last_event_id = message.event_id
            self.complete = message.event_id != 0 or not message.entries
        elif message.event_id:
            self.last_event_id = max(self.last_event_id, message.event_id)
            self.complete = True
        return entries_changed, bundles_changed

    def _apply_bundles(self, message: SyncMessage) -> bool:
        """Take the own and federated bundles (and the CRLs) from ``message``."""
        crls_changed = message.crls is not None and message.crls != self.crls
        if message.crls is not None:
            self.crls = message.crls
        if message.revoked_jtis is not None and message.revoked_jtis != self.revoked_jtis:
            self.revoked_jtis = message.revoked_jtis
            crls_changed = True
        current = self.bundles
        if message.bundle is None and not message.federated_bundles:
            if crls_changed and current is not None:
                self.bundles = replace(current, crls=self.crls, revoked_jtis=self.revoked_jtis)
                return True
            return False
        if message.bundle is not None:
            own, tainted, tainted_jwt = message.bundle, message.tainted_x509, message.tainted_jwt
        elif current is not None:
            own, tainted, tainted_jwt = current.bundle, current.tainted_x509, current.tainted_jwt
        else:
            return False
        federated: dict[str, Bundle] = {}
        if message.bundle is None and current is not None:
            # Only federated bundles changed: they come alone, on top of what we hold.
            federated.update(current.federated)
        for bundle in message.federated_bundles:
            federated[str(bundle.trust_domain)] = bundle
        fresh = TrustBundles(own, tainted, federated, tainted_jwt, self.crls, self.revoked_jtis)
        if (
            not crls_changed
            and current is not None
            and current.bundle == fresh.bundle
            and current.tainted_x509 == fresh.tainted_x509
            and current.tainted_jwt == fresh.tainted_jwt
            and dict(current.federated) == dict(fresh.federated)
        ):
            return False
        self.bundles = fresh
        return True
