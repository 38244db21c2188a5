"""X509-SVIDs: certificate templates, signing, parsing, and validation.

Follows the SPIFFE X509-SVID standard:

* a leaf has exactly one URI SAN (its SPIFFE ID, with a non-root path), ``cA=false``,
  a critical key usage with digitalSignature and without keyCertSign/cRLSign;
* a signing certificate has ``cA=true`` and keyCertSign, and its SPIFFE ID (if any) has
  no path;
* validation is X.509 path validation to an authority in the bundle of the leaf's
  trust domain, plus the leaf checks above.

:func:`verify_x509_svid` raises a specific :class:`credo.X509SvidError` subclass for each
rule it finds broken; it never returns a bool.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from credo.bundle import BundleSet, X509Bundle, is_pem, load_certificates
from credo.errors import (
    BadKeyUsage,
    InvalidKey,
    InvalidSpiffeId,
    InvalidX509Svid,
    LeafIsCa,
    MultipleUriSans,
    NoUriSan,
    SigningCertNotCa,
    UntrustedChain,
    X509SvidExpired,
    X509SvidNotYetValid,
)
from credo.keys import PrivateKey, PublicKey, load_private_key, private_key_to_pkcs8_der
from credo.keys import private_key_to_pkcs8_pem as _key_pem
from credo.spiffe_id import SpiffeId, TrustDomain

__all__ = [
    "BACKDATE",
    "X509Svid",
    "ca_certificate_template",
    "sign_x509_svid",
    "verify_x509_svid",
    "x509_svid_template",
]

BACKDATE = timedelta(seconds=10)
"""How far NotBefore is set before the signing time, to absorb clock skew."""

_SPIFFE_O = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")
_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_LEAF_BC = x509.BasicConstraints(ca=False, path_length=None)
_CA_BC = x509.BasicConstraints(ca=True, path_length=None)


def _key_usage(
    *, digital_signature: bool = False, key_encipherment: bool = False, ca: bool = False
) -> x509.KeyUsage:
    """A KeyUsage value with only the named bits set."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


# Leaf extensions that never change, built once. Passing ready-made Extension objects to
# CertificateBuilder (instead of six add_extension calls, each re-checking for duplicates)
# roughly halves the Python overhead of signing; see benchmarks/svid_sign.py.
_LEAF_BC_EXT = x509.Extension(_LEAF_BC.oid, True, _LEAF_BC)
_LEAF_KU_EC = x509.Extension(x509.KeyUsage.oid, True, _key_usage(digital_signature=True))
_LEAF_KU_RSA = x509.Extension(
    x509.KeyUsage.oid, True, _key_usage(digital_signature=True, key_encipherment=True)
)
_EKU_EXT = x509.Extension(_EKU.oid, False, _EKU)
_LEAF_SUBJECT = x509.Name([_SPIFFE_O])
_CA_KU = _key_usage(ca=True)


def _random_serial() -> int:
    """A random positive 128-bit serial number."""
    return secrets.randbits(127) | (1 << 127)


def _aki_for(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI for certificates signed by ``issuer``."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        key = issuer.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise InvalidKey("issuer key must be EC or RSA") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(key)


@functools.lru_cache(maxsize=64)
def _aki_extension_for(issuer: x509.Certificate) -> x509.Extension[x509.AuthorityKeyIdentifier]:
    """The AKI extension for leaves of ``issuer`` (cached: it is the same every call)."""
    aki = _aki_for(issuer)
    return x509.Extension(aki.oid, False, aki)


def _check_public_key(public_key: object) -> PublicKey:
    """Return ``public_key`` if it is an EC or RSA public key; raise InvalidKey otherwise."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidKey(
            f"public key is {type(public_key).__name__}; expected an EC or RSA public key"
        )
    return public_key


def x509_svid_template(
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    *,
    issuer: x509.Certificate,
    not_before: datetime,
    not_after: datetime,
    serial_number: int | None = None,
    dns_names: Sequence[str] = (),
) -> x509.CertificateBuilder:
    """The unsigned leaf X509-SVID for ``spiffe_id`` and ``public_key``, issued by ``issuer``.

    Subject ``O=SPIFFE`` (plus ``CN=<first DNS name>`` if any); one URI SAN plus the DNS
    SANs; critical ``cA=false``; critical key usage digitalSignature (plus keyEncipherment
    for RSA keys); EKU serverAuth+clientAuth; SKI; AKI from the issuer.
    """
    key = _check_public_key(public_key)
    if not spiffe_id.path:
        raise InvalidSpiffeId(str(spiffe_id), "a leaf SVID's SPIFFE ID must have a path")
    if dns_names:
        subject = x509.Name([_SPIFFE_O, x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    else:
        subject = _LEAF_SUBJECT
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans.extend(x509.DNSName(name) for name in dns_names)
    san = x509.SubjectAlternativeName(sans)
    ski = x509.SubjectKeyIdentifier.from_public_key(key)
    extensions: list[x509.Extension[x509.ExtensionType]] = [
        _LEAF_BC_EXT,
        _LEAF_KU_RSA if isinstance(key, rsa.RSAPublicKey) else _LEAF_KU_EC,
        _EKU_EXT,
        x509.Extension(ski.oid, False, ski),
        _aki_extension_for(issuer),
        x509.Extension(san.oid, False, san),
    ]
    serial = serial_number if serial_number is not None else _random_serial()
    if not 0 < serial < 1 << 159:
        raise ValueError("serial_number must be positive and at most 159 bits")
    start, end = _naive_utc(not_before), _naive_utc(not_after)
    if start > end:
        raise ValueError("not_before must not be after not_after")
    # All fields in one constructor call: the per-field builder methods each copy the
    # builder; the checks they would make are the ones just above.
    return x509.CertificateBuilder(
        issuer_name=issuer.subject,
        subject_name=subject,
        public_key=key,
        serial_number=serial,
        not_valid_before=start,
        not_valid_after=end,
        extensions=extensions,
    )


def _naive_utc(when: datetime) -> datetime:
    """``when`` as the naive-UTC datetime CertificateBuilder stores (naive input = UTC)."""
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    if when.year < 1950:
        raise ValueError("certificate validity must start on or after 1950-01-01")
    return when


def ca_certificate_template(
    trust_domain: TrustDomain,
    public_key: PublicKey,
    *,
    not_before: datetime,
    not_after: datetime,
    issuer: x509.Certificate | None = None,
    serial_number: int | None = None,
) -> x509.CertificateBuilder:
    """The unsigned signing (CA) certificate for ``trust_domain``; ``issuer=None`` = self-signed.

    Subject ``O=SPIFFE, serialNumber=<serial>`` (unique per CA, so rotated CAs never share a
    name); critical ``cA=true``; critical key usage keyCertSign+cRLSign; URI SAN
    ``spiffe://<trust domain>``; SKI; AKI.
    """
    key = _check_public_key(public_key)
    serial = serial_number if serial_number is not None else _random_serial()
    subject = x509.Name([_SPIFFE_O, x509.NameAttribute(NameOID.SERIAL_NUMBER, format(serial, "x"))])
    ski = x509.SubjectKeyIdentifier.from_public_key(key)
    aki = (
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        if issuer is None
        else _aki_for(issuer)
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_CA_BC, critical=True)
        .add_extension(_CA_KU, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain.id_string())]),
            critical=False,
        )
    )


def signature_hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    """The hash Credo signs with for ``key``: SHA-384 for P-384, SHA-512 for P-521, else SHA-256."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size >= 521:
            return hashes.SHA512()
        if key.curve.key_size >= 384:
            return hashes.SHA384()
    return hashes.SHA256()


def sign_x509_svid(
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    *,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    ttl: timedelta,
    dns_names: Sequence[str] = (),
    now: datetime | None = None,
) -> x509.Certificate:
    """Sign a leaf X509-SVID valid from ``now - 10s`` to ``min(now + ttl, CA NotAfter)``."""
    if ttl <= timedelta(0):
        raise ValueError(f"ttl is {ttl}; expected a positive duration")
    now = now or datetime.now(UTC)
    ca_not_after = ca_cert.not_valid_after_utc
    if now >= ca_not_after:
        raise ValueError(
            f"CA certificate expired at {ca_not_after.isoformat()}; cannot sign an SVID after it"
        )
    not_after = min(now + ttl, ca_not_after)
    builder = x509_svid_template(
        spiffe_id,
        public_key,
        issuer=ca_cert,
        not_before=now - BACKDATE,
        not_after=not_after,
        dns_names=dns_names,
    )
    return builder.sign(ca_key, signature_hash_for(ca_key))


# --- shape checks ----------------------------------------------------------------------

_E = TypeVar("_E", bound=x509.ExtensionType)


def _extension(
    cert: x509.Certificate, kind: type[_E], error: type[InvalidX509Svid], what: str
) -> x509.Extension[_E] | None:
    """The certificate's extension of ``kind``, None if absent; malformed → ``error``."""
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None
    except ValueError as err:  # duplicate or undecodable extensions
        raise error(f"{what} has malformed extensions: {err}") from None


def _uri_sans(cert: x509.Certificate, error: type[InvalidX509Svid], what: str) -> list[str]:
    """The URI SAN values of ``cert`` (empty if it has no SAN extension)."""
    san = _extension(cert, x509.SubjectAlternativeName, error, what)
    if san is None:
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def leaf_spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    """Check the leaf's shape against the X509-SVID rules and return its SPIFFE ID."""
    uris = _uri_sans(leaf, InvalidX509Svid, "leaf certificate")
    if not uris:
        raise NoUriSan("leaf certificate has no URI SAN; expected exactly one SPIFFE ID")
    if len(uris) > 1:
        raise MultipleUriSans(
            f"leaf certificate has {len(uris)} URI SANs; expected exactly one SPIFFE ID"
        )
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as err:
        raise InvalidX509Svid(f"leaf URI SAN is not a SPIFFE ID: {err.reason}") from None
    if not spiffe_id.path:
        raise InvalidX509Svid(f"leaf SPIFFE ID {spiffe_id} has no path; expected a non-root path")
    bc = _extension(leaf, x509.BasicConstraints, InvalidX509Svid, "leaf certificate")
    if bc is not None and bc.value.ca:
        raise LeafIsCa("leaf certificate has cA=true; expected cA=false")
    ku = _extension(leaf, x509.KeyUsage, InvalidX509Svid, "leaf certificate")
    if ku is None:
        raise BadKeyUsage("leaf certificate has no key usage; expected critical digitalSignature")
    if not ku.critical:
        raise BadKeyUsage("leaf key usage is not critical; expected it to be critical")
    if ku.value.key_cert_sign:
        raise BadKeyUsage("leaf key usage has keyCertSign; expected it unset on a leaf")
    if ku.value.crl_sign:
        raise BadKeyUsage("leaf key usage has cRLSign; expected it unset on a leaf")
    if not ku.value.digital_signature:
        raise BadKeyUsage("leaf key usage lacks digitalSignature; expected it set")
    return spiffe_id


def _check_signing_cert(cert: x509.Certificate, index: int) -> None:
    """Check that chain certificate ``index`` (>= 1) may sign X509-SVIDs."""
    what = f"signing certificate {index}"
    bc = _extension(cert, x509.BasicConstraints, SigningCertNotCa, what)
    if bc is None or not bc.value.ca:
        raise SigningCertNotCa(f"{what} is not a CA; expected basic constraints cA=true")
    ku = _extension(cert, x509.KeyUsage, SigningCertNotCa, what)
    if ku is None or not ku.value.key_cert_sign:
        raise SigningCertNotCa(f"{what} lacks keyCertSign; expected it set on a signing cert")
    for uri in _uri_sans(cert, SigningCertNotCa, what):
        try:
            ca_id = SpiffeId.parse(uri)
        except InvalidSpiffeId as err:
            raise SigningCertNotCa(f"{what} URI SAN is not a SPIFFE ID: {err.reason}") from None
        if ca_id.path:
            raise SigningCertNotCa(f"{what} SPIFFE ID {ca_id} has a path; expected none")


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    """Raise X509SvidExpired / X509SvidNotYetValid if ``cert`` is not valid at ``now``."""
    if now < cert.not_valid_before_utc:
        raise X509SvidNotYetValid(
            f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}; "
            f"now is {now.isoformat()}"
        )
    if now > cert.not_valid_after_utc:
        raise X509SvidExpired(
            f"{what} expired at {cert.not_valid_after_utc.isoformat()}; now is {now.isoformat()}"
        )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """True when ``parent``'s name and key issued ``child``."""
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_path_length(cert: x509.Certificate, cas_below: int, what: str) -> None:
    """Enforce ``pathLenConstraint``: at most that many CA certs may sit below ``cert``."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return
    if bc.path_length is not None and cas_below > bc.path_length:
        raise UntrustedChain(
            f"{what} allows {bc.path_length} intermediates below it; chain has {cas_below}"
        )


def verify_x509_svid(
    chain: Sequence[x509.Certificate],
    bundles: X509Bundle | BundleSet,
    *,
    now: datetime | None = None,
) -> SpiffeId:
    """Validate an X509-SVID chain (leaf first) against ``bundles``; return its SPIFFE ID.

    Raises a :class:`credo.X509SvidError` subclass naming the first broken rule.
    """
    if not chain:
        raise InvalidX509Svid("certificate chain is empty; expected the leaf first")
    now = now or datetime.now(UTC)
    spiffe_id = leaf_spiffe_id(chain[0])
    for index, cert in enumerate(chain[1:], start=1):
        _check_signing_cert(cert, index)

    td = spiffe_id.trust_domain
    if isinstance(bundles, X509Bundle):
        if bundles.trust_domain != td:
            raise UntrustedChain(
                f"no bundle for trust domain {td}; the given bundle is for {bundles.trust_domain}"
            )
        authorities = bundles.authorities
    else:
        x509_bundle = bundles.get_x509_bundle_for_trust_domain(td)
        if x509_bundle is None:
            raise UntrustedChain(f"no bundle for trust domain {td}")
        authorities = x509_bundle.authorities
    if not authorities:
        raise UntrustedChain(f"bundle for trust domain {td} has no X.509 authorities")

    for index, cert in enumerate(chain):
        _check_validity(
            cert, now, "leaf certificate" if index == 0 else f"chain certificate {index}"
        )
        if cert in authorities:
            _check_path_length(cert, max(0, index - 1), f"authority at chain position {index}")
            return spiffe_id
        for authority in authorities:
            if _issued_by(cert, authority):
                _check_validity(authority, now, "bundle authority")
                _check_path_length(authority, index, "bundle authority")
                return spiffe_id
        if index + 1 == len(chain):
            break
        if not _issued_by(cert, chain[index + 1]):
            raise UntrustedChain(
                f"chain certificate {index} is not signed by chain certificate {index + 1}"
            )
        _check_path_length(chain[index + 1], max(0, index), f"chain certificate {index + 1}")
    raise UntrustedChain(f"chain does not lead to an authority in the bundle for trust domain {td}")


# --- X509Svid --------------------------------------------------------------------------


def _same_public_key(a: PublicKey, b: object) -> bool:
    """True when ``a`` and ``b`` are the same public key."""
    if not isinstance(b, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return a.public_bytes(der, fmt) == b.public_bytes(der, fmt)


@dataclass(frozen=True)
class X509Svid:
    """An X509-SVID: SPIFFE ID, certificate chain (leaf first) and the leaf's private key."""

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey = field(repr=False)
    hint: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cert_chain", tuple(self.cert_chain))
        if not self.cert_chain:
            raise InvalidX509Svid("certificate chain is empty; expected the leaf first")

    @property
    def leaf(self) -> x509.Certificate:
        """The leaf certificate (the SVID proper)."""
        return self.cert_chain[0]

    @property
    def expires_at(self) -> datetime:
        """The leaf's NotAfter, as an aware UTC datetime."""
        return self.leaf.not_valid_after_utc

    @classmethod
    def parse(cls, chain: bytes, key: bytes, *, hint: str = "") -> X509Svid:
        """Parse a chain (PEM or concatenated DER, leaf first) and key (PKCS#8 PEM or DER).

        Checks the leaf and signing-certificate shapes and that the key matches the leaf;
        it does not check trust (use :func:`verify_x509_svid`).
        """
        try:
            certs = load_certificates(bytes(chain))
        except ValueError as err:
            kind = "PEM" if is_pem(bytes(chain)) else "DER"
            raise InvalidX509Svid(f"cannot parse {kind} certificate chain: {err}") from None
        if not certs:
            raise InvalidX509Svid("certificate chain is empty; expected the leaf first")
        spiffe_id = leaf_spiffe_id(certs[0])
        for index, cert in enumerate(certs[1:], start=1):
            _check_signing_cert(cert, index)
        try:
            private_key = load_private_key(bytes(key))
        except InvalidKey as err:
            raise InvalidX509Svid(f"cannot parse private key: {err.reason}") from None
        if not _same_public_key(private_key.public_key(), certs[0].public_key()):
            raise InvalidX509Svid("private key does not match the leaf certificate's public key")
        return cls(spiffe_id, tuple(certs), private_key, hint)

    def marshal_chain_der(self) -> bytes:
        """The chain as concatenated DER (the Workload API ``x509_svid`` field)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.cert_chain)

    def marshal_chain_pem(self) -> bytes:
        """The chain as PEM blocks, leaf first."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.cert_chain)

    def marshal_key_der(self) -> bytes:
        """The private key as PKCS#8 DER (the Workload API ``x509_svid_key`` field)."""
        return private_key_to_pkcs8_der(self.private_key)

    def marshal_key_pem(self) -> bytes:
        """The private key as PKCS#8 PEM."""
        return _key_pem(self.private_key)
