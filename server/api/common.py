"""What the agent and admin APIs share: bundles and CRLs as messages."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from credo._proto.credo.server.v1 import types_pb2
from credo.bundle import Bundle
from credo.errors import BundleError
from credo.spiffe_id import TrustDomain
from server.api.convert import bundle_to_proto, crl_to_proto
from server.datastore.protocol import DataStore

__all__ = ["BundleSource"]

log = logging.getLogger(__name__)


class BundleSource:
    """The trust domain's bundle and the federated ones, read from the datastore."""

    def __init__(self, datastore: DataStore, trust_domain: TrustDomain) -> None:
        self._ds = datastore
        self.trust_domain = trust_domain
        self._parsed: dict[str, tuple[bytes, Bundle]] = {}

    def _parse(self, td: str, data: bytes) -> Bundle | None:
        cached = self._parsed.get(td)
        if cached is not None and cached[0] == data:
            return cached[1]
        try:
            bundle = Bundle.parse(td, data)
        except (BundleError, ValueError) as err:
            log.error("stored bundle is unreadable", extra={"trust_domain": td, "error": str(err)})
            return None
        self._parsed[td] = (data, bundle)
        return bundle

    def own_bundle(self) -> Bundle:
        """The trust domain's own bundle (what the authority manager published)."""
        data = self._ds.fetch_bundle(self.trust_domain.name)
        bundle = self._parse(self.trust_domain.name, data) if data is not None else None
        if bundle is None:
            return Bundle(self.trust_domain)
        return bundle

    def crls(self) -> list[types_pb2.Crl]:
        """The current CRL of every X.509 authority of the trust domain (any server's)."""
        return [crl_to_proto(c) for c in self._ds.list_crls()]

    def revoked_jwts(self) -> list[tuple[str, int]]:
        """(jti, expires at) of every revoked JWT-SVID that has not expired yet."""
        return [(j.jti, j.expires_at) for j in self._ds.list_revoked_jwt_svids(int(time.time()))]

    def own(self) -> types_pb2.Bundle:
        """The own bundle as a message, with taint flags and JWT key expiries."""
        return bundle_to_proto(self.own_bundle(), self._ds.list_authorities())

    def federated(self, trust_domains: Iterable[str] | None = None) -> list[types_pb2.Bundle]:
        """Federated bundles (every one, or those of ``trust_domains``), by name."""
        wanted = None if trust_domains is None else set(trust_domains)
        if wanted is not None and not wanted:
            return []
        out = []
        for td, data in sorted(self._ds.list_bundles().items()):
            if td == self.trust_domain.name or (wanted is not None and td not in wanted):
                continue
            bundle = self._parse(td, data)
            if bundle is not None:
                out.append(bundle_to_proto(bundle))
        return out
