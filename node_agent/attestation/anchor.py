"""Which trust-bundle authority an X.509 chain leads to (its anchor).

The agent needs this for its own SVID and for every cached workload SVID: an SVID whose
anchor is tainted is renewed at once, one whose anchor left the bundle is dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["der", "find_anchor"]


def der(cert: x509.Certificate) -> bytes:
    """The certificate's DER encoding (how authorities are compared)."""
    return cert.public_bytes(serialization.Encoding.DER)


def _key_id(cert: x509.Certificate, kind: type[Any]) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_class(kind).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    if isinstance(ext, x509.SubjectKeyIdentifier):
        return ext.digest
    if isinstance(ext, x509.AuthorityKeyIdentifier):
        return ext.key_identifier
    return None


def find_anchor(
    chain: tuple[x509.Certificate, ...], authorities: Iterable[x509.Certificate]
) -> bytes | None:
    """The DER of the authority in ``authorities`` that ``chain`` (leaf first) leads to."""
    by_der = {der(a): a for a in authorities}
    for cert in chain:
        encoded = der(cert)
        if encoded in by_der:
            return encoded
    top = chain[-1]
    aki = _key_id(top, x509.AuthorityKeyIdentifier)
    for encoded, authority in by_der.items():
        if top.issuer != authority.subject:
            continue
        ski = _key_id(authority, x509.SubjectKeyIdentifier)
        if aki is not None and ski is not None:
            if aki == ski:
                return encoded
            continue
        with contextlib.suppress(ValueError, TypeError, Exception):
            top.verify_directly_issued_by(authority)
            return encoded
    return None
