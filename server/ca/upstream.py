"""The upstream CA: an operator's own CA on disk, under which Credo's CA is an intermediate.

With ``upstream_ca_cert`` / ``upstream_ca_key`` set, every X.509 authority the manager
prepares is signed by the upstream CA instead of itself; the bundle's X.509 authorities are
the upstream root(s), and SVID chains carry the intermediates between.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from credo.errors import CredoError
from credo.keys import PrivateKey, PublicKey, load_private_key
from server.ca.errors import UpstreamCaError

__all__ = ["UpstreamCa", "is_self_signed", "load_upstream_ca", "spki_der"]


@dataclass(frozen=True)
class UpstreamCa:
    """An upstream CA from disk: the signer, its key, what to chain, and the root(s)."""

    certificate: x509.Certificate
    private_key: PrivateKey
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]


def is_self_signed(cert: x509.Certificate) -> bool:
    """True for a certificate that is its own issuer and verifies with its own key."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def spki_der(key: PublicKey | PrivateKey) -> bytes:
    """The DER SubjectPublicKeyInfo of ``key`` (of its public half for a private key)."""
    public = (
        key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else key
    )
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_upstream_ca(cert_path: Path, key_path: Path) -> UpstreamCa:
    """Load the upstream CA: PEM certificates (signer first, then its chain) and its key.

    The self-signed certificate(s) in the file are the roots that go in the bundle; the
    others (after the signer) are sent in SVID chains. Raises :class:`UpstreamCaError`.
    """
    try:
        certs = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    except OSError as err:
        raise UpstreamCaError(
            f"cannot read upstream ca certificate {cert_path}: {err.strerror}"
        ) from None
    except ValueError as err:
        raise UpstreamCaError(
            f"upstream ca certificate {cert_path} is not PEM certificates: {err}"
        ) from None
    try:
        key = load_private_key(Path(key_path).read_bytes())
    except OSError as err:
        raise UpstreamCaError(f"cannot read upstream ca key {key_path}: {err.strerror}") from None
    except CredoError as err:
        raise UpstreamCaError(f"upstream ca key {key_path} is unusable: {err}") from None
    signer = certs[0]
    if spki_der(signer.public_key()) != spki_der(key):  # type: ignore[arg-type]
        raise UpstreamCaError(
            f"upstream ca key {key_path} does not match the first certificate in {cert_path}"
        )
    try:
        bc = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        bc, ku = None, None
    if bc is None or ku is None or not bc.ca or not ku.key_cert_sign:
        raise UpstreamCaError(
            f"upstream ca certificate in {cert_path} is not a ca; expected cA=true and keyCertSign"
        )
    roots = tuple(c for c in certs if is_self_signed(c))
    if not roots:
        raise UpstreamCaError(
            f"upstream ca certificate file {cert_path} has no self-signed root; "
            "expected the chain to end with the root certificate"
        )
    intermediates = tuple(c for c in certs if not is_self_signed(c))
    return UpstreamCa(signer, key, intermediates, roots)
