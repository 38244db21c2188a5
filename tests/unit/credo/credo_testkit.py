"""Helpers shared by the credo unit tests: real keys and CAs, no mocks."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from credo import (
    Bundle,
    KeyType,
    TrustDomain,
    ca_certificate_template,
    generate_private_key,
)
from credo.keys import PrivateKey

FIXTURES = Path(__file__).parent / "fixtures"
X509_FIXTURES = FIXTURES / "x509"
NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Ca:
    """A trust domain's root and intermediate CA, with keys."""

    trust_domain: TrustDomain
    root: x509.Certificate
    root_key: PrivateKey
    intermediate: x509.Certificate
    intermediate_key: PrivateKey

    def bundle(self, **kwargs: object) -> Bundle:
        """The SPIFFE bundle holding this CA's root."""
        return Bundle(self.trust_domain, (self.root,), **kwargs)  # type: ignore[arg-type]


def make_ca(name: str = "example.org", key_type: KeyType = KeyType.EC_P256) -> Ca:
    """Build a root and an intermediate CA for trust domain ``name``."""
    td = TrustDomain(name)
    start, end = NOW - timedelta(days=365), NOW + timedelta(days=3650)
    root_key = generate_private_key(key_type)
    root = ca_certificate_template(td, root_key.public_key(), not_before=start, not_after=end).sign(
        root_key, hashes.SHA256()
    )
    inter_key = generate_private_key(key_type)
    inter = ca_certificate_template(
        td, inter_key.public_key(), not_before=start, not_after=end, issuer=root
    ).sign(root_key, hashes.SHA256())
    return Ca(td, root, root_key, inter, inter_key)
