"""Private keys: generation, PKCS#8 encoding, loading, and the matching JWT algorithm."""

from __future__ import annotations

import enum
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from credo.errors import InvalidKey

__all__ = [
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "generate_private_key",
    "jwt_algorithm_for",
    "key_type_of",
    "load_private_key",
    "make_csr",
    "private_key_to_pkcs8_der",
    "private_key_to_pkcs8_pem",
]

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
"""The private key types Credo signs with."""

PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
"""The public key types Credo certifies and verifies with."""


class KeyType(enum.StrEnum):
    """Key types Credo generates; the values are the config spellings (SPIRE's)."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"


def generate_private_key(key_type: KeyType | str = KeyType.EC_P256) -> PrivateKey:
    """Generate a fresh private key of ``key_type`` (default ``ec-p256``)."""
    try:
        kind = KeyType(key_type)
    except ValueError:
        allowed = ", ".join(k.value for k in KeyType)
        raise InvalidKey(f"unknown key type {key_type!r}; expected one of {allowed}") from None
    if kind is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if kind is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_type_of(key: PrivateKey | PublicKey) -> KeyType:
    """Return the :class:`KeyType` of a private or public key; raise InvalidKey if unsupported."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyType.EC_P256
        if isinstance(key.curve, ec.SECP384R1):
            return KeyType.EC_P384
        raise InvalidKey(f"unsupported curve {key.curve.name}; expected P-256 or P-384")
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise InvalidKey(f"RSA key is {key.key_size} bits; expected at least 2048")
        return KeyType.RSA_2048
    raise InvalidKey(f"unsupported key type {type(key).__name__}; expected EC or RSA")


def private_key_to_pkcs8_der(key: PrivateKey) -> bytes:
    """Encode ``key`` as unencrypted PKCS#8 DER (the Workload API's ``x509_svid_key``)."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_to_pkcs8_pem(key: PrivateKey) -> bytes:
    """Encode ``key`` as unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(data: bytes) -> PrivateKey:
    """Load an unencrypted EC or RSA private key from PEM or DER (PKCS#8 preferred)."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise InvalidKey(f"cannot read private key: {err}; expected PKCS#8 PEM or DER") from None
    except UnsupportedAlgorithm as err:
        raise InvalidKey(f"cannot read private key: {err}; expected EC or RSA") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidKey(f"unsupported key type {type(key).__name__}; expected EC or RSA")
    key_type_of(key)
    return key


def jwt_algorithm_for(key: PrivateKey | PublicKey) -> str:
    """The JWS ``alg`` Credo signs with for ``key``: ES256, ES384 or RS256."""
    kind = key_type_of(key)
    if kind is KeyType.EC_P256:
        return "ES256"
    if kind is KeyType.EC_P384:
        return "ES384"
    return "RS256"


def make_csr(key: PrivateKey) -> bytes:
    """A PKCS#10 CSR (DER) for ``key`` with an empty subject.

    The signing server takes only the public key from it: the SPIFFE ID, names and lifetime
    come from the registration entry.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)
