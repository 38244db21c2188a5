"""Publishing the trust domain's SPIFFE bundle from the CA journal.

The bundle (X.509 authorities, JWT keys and WIT-SVID keys, ``use: wit-svid``) is derived
from every server's authority rows and stored with ``datastore.update_bundle``; its
``spiffe_sequence`` is incremented on every change, including a taint (a forced publish:
agents learn the tainted ids from the authority rows, since the JWKS format has no taint
flag). With an upstream CA, the bundle's X.509 authorities are the upstream root(s), not the
intermediates the servers sign with.

Several servers on one database publish the union of their authorities: the read of the
stored bundle and the rows and the write of the successor happen in one locked datastore
transaction, so two servers publishing at once never hand out the same sequence number or
drop each other's keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from credo.bundle import Bundle
from credo.errors import BundleError
from credo.keys import PublicKey
from credo.spiffe_id import TrustDomain
from server.ca.upstream import UpstreamCa, is_self_signed
from server.datastore.models import Authority

__all__ = ["BundlePublisher", "BundleStore"]

log = logging.getLogger(__name__)


class BundleStore(Protocol):
    """The datastore calls the publisher needs."""

    def fetch_bundle(self, trust_domain: str) -> bytes | None: ...

    def update_bundle(
        self,
        trust_domain: str,
        build: Callable[[bytes | None, list[Authority]], bytes | None],
    ) -> bytes | None: ...


class BundlePublisher:
    """Writes the bundle derived from the authority rows; reads the stored one back."""

    def __init__(
        self, trust_domain: TrustDomain, datastore: BundleStore, refresh_hint: int
    ) -> None:
        self._trust_domain = trust_domain
        self._ds = datastore
        self._refresh_hint = refresh_hint
        self.upstream: UpstreamCa | None = None
        """The upstream CA once loaded: its roots are the bundle's X.509 authorities."""

    def _parse(self, data: bytes | None) -> Bundle | None:
        if data is None:
            return None
        try:
            return Bundle.parse(self._trust_domain, data)
        except BundleError as err:
            log.warning("stored bundle is unreadable; replacing it", extra={"error": str(err)})
            return None

    def current(self) -> Bundle | None:
        """The stored bundle; None if there is none (or it is unreadable)."""
        return self._parse(self._ds.fetch_bundle(self._trust_domain.name))

    def publish(self, *, force: bool = False) -> Bundle:
        """Store the bundle derived from every server's rows; bump the sequence on change.

        ``force`` bumps the sequence even when the contents are unchanged (a taint).
        """
        # The callback may run more than once if the datastore retries; the last run counts.
        published: list[Bundle] = []
        written_flags: list[bool] = []

        def build(current_data: bytes | None, rows: list[Authority]) -> bytes | None:
            current = self._parse(current_data)
            authorities, jwt_keys, wit_keys = self._contents(rows)
            if (
                not force
                and current is not None
                and current.x509_authorities == tuple(authorities)
                and dict(current.jwt_authorities) == jwt_keys
                and dict(current.wit_authorities) == wit_keys
                and current.refresh_hint == self._refresh_hint
            ):
                published.append(current)
                written_flags.append(False)
                return None
            sequence = (current.sequence_number if current is not None else 0) + 1
            bundle = Bundle(
                self._trust_domain,
                tuple(authorities),
                jwt_keys,
                sequence_number=sequence,
                refresh_hint=self._refresh_hint,
                wit_authorities=wit_keys,
            )
            published.append(bundle)
            written_flags.append(True)
            return bundle.marshal()

        self._ds.update_bundle(self._trust_domain.name, build)
        bundle, written = published[-1], written_flags[-1]
        if written:
            log.info(
                "published bundle",
                extra={
                    "trust_domain": self._trust_domain.name,
                    "sequence_number": bundle.sequence_number,
                    "x509_authorities": len(bundle.x509_authorities),
                    "jwt_authorities": len(bundle.jwt_authorities),
                    "wit_authorities": len(bundle.wit_authorities),
                },
            )
        return bundle

    def _contents(
        self, rows: list[Authority]
    ) -> tuple[list[x509.Certificate], dict[str, PublicKey], dict[str, PublicKey]]:
        """The bundle's X.509 authorities, JWT and WIT keys: every owner's live rows."""
        authorities: list[x509.Certificate] = []
        if self.upstream is not None:
            authorities.extend(self.upstream.roots)
        jwt_keys: dict[str, PublicKey] = {}
        wit_keys: dict[str, PublicKey] = {}
        for row in rows:
            if row.kind == "x509":
                cert = x509.load_der_x509_certificate(row.public_data)
                if is_self_signed(cert) and cert not in authorities:
                    authorities.append(cert)
            else:
                public = serialization.load_der_public_key(row.public_data)
                if isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                    keys = wit_keys if row.kind == "wit" else jwt_keys
                    keys[row.authority_id] = public
        return authorities, jwt_keys, wit_keys
