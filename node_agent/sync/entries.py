"""The agent's view of what the server authorized: registration entries and bundles.

:class:`Entry` is a registration entry in Credo's model types (no protobuf);
:class:`SyncState` is what the sync stream has built so far — entries by id, the own
bundle (with which X.509 authorities are tainted) and the federated bundles — and applies
each :class:`~credo._proto.credo.server.v1.agent_pb2.SyncEntriesResponse` to itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo.bundle import Bundle
from credo.errors import CredoError
from credo.keys import PublicKey
from credo.selector import Selector
from credo.spiffe_id import SpiffeId

__all__ = ["Entry", "SyncState", "TrustBundles", "bundle_from_proto", "entry_from_proto"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
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


def entry_from_proto(message: Any) -> Entry:
    """Convert a ``RegistrationEntry`` message; raise ValueError if it is malformed."""
    return Entry(
        id=message.id,
        spiffe_id=SpiffeId.parse(message.spiffe_id),
        parent_id=message.parent_id,
        selectors=frozenset(Selector(s.type, s.value) for s in message.selectors),
        x509_svid_ttl=message.x509_svid_ttl,
        jwt_svid_ttl=message.jwt_svid_ttl,
        dns_names=tuple(message.dns_names),
        admin=message.admin,
        downstream=message.downstream,
        node_alias=message.node_alias,
        hint=message.hint,
        expires_at=message.expires_at,
        federates_with=tuple(message.federates_with),
        revision_number=message.revision_number,
        created_at=message.created_at,
    )


@dataclass(frozen=True)
class TrustBundles:
    """The own bundle, which of its X.509 authorities are tainted, and federated bundles."""

    bundle: Bundle
    tainted_x509: frozenset[bytes] = frozenset()
    """DER of the own bundle's X.509 authorities marked tainted."""
    federated: Mapping[str, Bundle] = field(default_factory=dict)
    """Trust domain name -> bundle."""
    tainted_jwt: frozenset[str] = frozenset()
    """Key IDs of the own bundle's JWT authorities marked tainted."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "federated", MappingProxyType(dict(self.federated)))


def bundle_from_proto(message: Any) -> tuple[Bundle, frozenset[bytes]]:
    """Convert a ``Bundle`` message to a :class:`Bundle` and the DER of tainted authorities."""
    authorities = []
    tainted = set()
    for authority in message.x509_authorities:
        cert = x509.load_der_x509_certificate(bytes(authority.asn1))
        authorities.append(cert)
        if authority.tainted:
            tainted.add(cert.public_bytes(serialization.Encoding.DER))
    jwt_keys: dict[str, PublicKey] = {}
    for key in message.jwt_authorities:
        public = serialization.load_der_public_key(bytes(key.public_key))
        jwt_keys[key.key_id] = public  # type: ignore[assignment]
    bundle = Bundle(
        message.trust_domain,
        tuple(authorities),
        jwt_keys,
        message.sequence_number,
        message.refresh_hint or None,
    )
    return bundle, frozenset(tainted)


class SyncState:
    """Entries by id, trust bundles and the last event id, built from the sync stream."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.bundles: TrustBundles | None = None
        self.last_event_id = 0
        self.complete = False
        """False while the messages of a split full set are still arriving."""

    def apply(self, message: Any) -> tuple[bool, bool]:
        """Apply one ``SyncEntriesResponse``; return (entries changed, bundles changed)."""
        entries_changed = False
        if message.full:
            fresh: dict[str, Entry] = {}
            for item in message.entries:
                entry = self._convert(item)
                if entry is not None:
                    fresh[entry.id] = entry
            entries_changed = fresh != self.entries
            self.entries = fresh
        else:
            for item in message.entries:
                entry = self._convert(item)
                if entry is not None and self.entries.get(entry.id) != entry:
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

    def _apply_bundles(self, message: Any) -> bool:
        """Take the own and federated bundles from ``message`` when it carries them."""
        has_bundle = message.HasField("bundle") and message.bundle.trust_domain
        if not has_bundle and not message.federated_bundles:
            return False
        current = self.bundles
        try:
            if has_bundle:
                own, tainted = bundle_from_proto(message.bundle)
                tainted_jwt = frozenset(
                    k.key_id for k in message.bundle.jwt_authorities if k.tainted
                )
            elif current is not None:
                own, tainted = current.bundle, current.tainted_x509
                tainted_jwt = current.tainted_jwt
            else:
                return False
            federated: dict[str, Bundle] = {}
            if not has_bundle and current is not None:
                # Only federated bundles changed: they come alone, on top of what we hold.
                federated.update(current.federated)
            for item in message.federated_bundles:
                fb, _ = bundle_from_proto(item)
                federated[str(fb.trust_domain)] = fb
        except (CredoError, ValueError) as exc:
            log.warning("ignoring malformed bundle from the server", extra={"error": str(exc)})
            return False
        fresh = TrustBundles(own, tainted, federated, tainted_jwt)
        if (
            current is not None
            and current.bundle == fresh.bundle
            and current.tainted_x509 == fresh.tainted_x509
            and current.tainted_jwt == fresh.tainted_jwt
            and dict(current.federated) == dict(fresh.federated)
        ):
            return False
        self.bundles = fresh
        return True

    @staticmethod
    def _convert(item: Any) -> Entry | None:
        try:
            return entry_from_proto(item)
        except (CredoError, ValueError) as exc:
            log.warning(
                "ignoring malformed entry from the server",
                extra={"entry_id": item.id, "error": str(exc)},
            )
            return None
