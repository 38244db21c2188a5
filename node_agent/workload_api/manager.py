"""What the Workload API handler needs from the agent's SVID cache (the ``Manager``).

The cache (``node_agent.cache``) implements :class:`Manager`; the handler only sees this
interface, so tests drive it with a fake. Everything here is in Credo's model types;
nothing knows about protobuf or gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from credo.bundle import Bundle, BundleSet
from credo.selector import Selector
from credo.spiffe_id import SpiffeId
from credo.x509svid import X509Svid

__all__ = [
    "BundleSubscription",
    "Identity",
    "Manager",
    "Subscription",
    "WitIdentity",
    "WorkloadUpdate",
]


@dataclass(frozen=True)
class Identity:
    """One identity a workload may use: its entry, SPIFFE ID and current X509-SVID."""

    entry_id: str
    spiffe_id: SpiffeId
    svid: X509Svid
    """Chain (leaf first) and private key."""
    hint: str = ""
    """The entry's hint, passed to the workload to tell identities apart."""


@dataclass(frozen=True)
class WitIdentity:
    """A WIT-SVID for one of a workload's identities, with the private key it binds."""

    identity: Identity
    token: str = field(repr=False)
    """The WIT-SVID, JWS compact."""
    private_key_jwk: str = field(repr=False)
    """The private key of the WIT's ``cnf`` as a JWK (the Workload API's ``wit_svid_key``)."""
    refresh_at: float
    """When the agent replaces it (Unix time): the stream pushes the new one then."""


@dataclass(frozen=True)
class WorkloadUpdate:
    """The full state a workload with some selectors should see, at one moment."""

    identities: tuple[Identity, ...]
    """Ordered; the first is the default identity. Empty: the workload has none."""
    bundle: Bundle
    """The agent's own trust domain's bundle."""
    federated_bundles: Mapping[str, Bundle] = field(default_factory=dict)
    """Trust domain name -> bundle, only those the identities' entries federate with."""
    unsigned: int = 0
    """Matching entries with no X509-SVID yet (not signed, or the server refused it)."""
    crls: tuple[bytes, ...] = ()
    """The trust domain's CRLs (DER), for the Workload API ``crl`` fields."""


class Subscription(Protocol):
    """A stream of :class:`WorkloadUpdate` for one set of selectors."""

    async def next(self) -> WorkloadUpdate:
        """The first call returns the current state at once; later calls wait for a change."""
        ...

    def close(self) -> None:
        """Stop receiving updates; idempotent."""
        ...


class BundleSubscription(Protocol):
    """A stream of (own bundle, federated bundles by trust domain name)."""

    async def next(self) -> tuple[Bundle, Mapping[str, Bundle]]:
        """The first call returns the current bundles at once; later calls wait for a change."""
        ...

    def close(self) -> None:
        """Stop receiving updates; idempotent."""
        ...


class Manager(Protocol):
    """The agent's cache of identities and bundles, as the Workload API sees it."""

    def subscribe(self, selectors: frozenset[Selector]) -> Subscription:
        """Follow the identities (and their bundles) of a workload with ``selectors``."""
        ...

    def subscribe_bundles(self) -> BundleSubscription:
        """Follow the own bundle and every federated bundle."""
        ...

    def matching_identities(self, selectors: frozenset[Selector]) -> tuple[Identity, ...]:
        """The identities whose entry selectors are a subset of ``selectors`` (first = default)."""
        ...

    async def fetch_jwt_svid(self, identity: Identity, audience: tuple[str, ...]) -> str:
        """A JWT-SVID for ``identity`` and ``audience``, cached per (SPIFFE ID, audiences)."""
        ...

    def crls(self) -> tuple[bytes, ...]:
        """The trust domain's CRLs (DER)."""
        ...

    def revoked_jtis(self) -> frozenset[str]:
        """``jti`` of every revoked JWT-SVID of the trust domain."""
        ...

    def bundle_set(self) -> BundleSet:
        """The own and all federated bundles, for validating JWT-SVIDs."""
        ...

    async def fetch_wit_svids(self, identities: tuple[Identity, ...]) -> tuple[WitIdentity, ...]:
        """A WIT-SVID per identity that can have one, cached until about half its lifetime."""
        ...
