"""Trust bundles: X.509 authorities, JWT keys, and the SPIFFE bundle (JWKS) that holds both.

* :class:`X509Bundle` — a trust domain's X.509 authorities (PEM or concatenated DER).
* :class:`JwtBundle` — a trust domain's JWT signing keys by ``kid`` (RFC 7517 JWKS).
* :class:`WitBundle` — a trust domain's WIT-SVID signing keys by ``kid`` (``use: wit-svid``).
* :class:`Bundle` — the SPIFFE bundle: all of the above plus ``spiffe_sequence`` and
  ``spiffe_refresh_hint``, in the JWKS format of the SPIFFE Trust Domain and Bundle standard.
* :class:`BundleSet` — bundles by trust domain, for verifying SVIDs from federated domains.

Every parser raises :class:`credo.BundleError` on malformed input, and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from credo.errors import BundleError, InvalidSpiffeId
from credo.keys import PublicKey
from credo.spiffe_id import TrustDomain

__all__ = ["Bundle", "BundleSet", "JwtBundle", "WitBundle", "X509Bundle"]

_USE_X509 = "x509-svid"
_USE_JWT = "jwt-svid"
_USE_WIT = "wit-svid"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


# --- DER / PEM certificate lists -------------------------------------------------------


def split_der(data: bytes) -> list[bytes]:
    """Split concatenated DER structures by their ASN.1 SEQUENCE headers.

    Raises ValueError when ``data`` is not a run of complete DER SEQUENCEs.
    """
    items: list[bytes] = []
    i, end = 0, len(data)
    while i < end:
        if data[i] != 0x30:
            raise ValueError(f"byte {i} is not the start of a DER SEQUENCE")
        if i + 2 > end:
            raise ValueError("DER data is truncated")
        first = data[i + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or i + 2 + n > end:
                raise ValueError("DER length is indefinite, too long or truncated")
            header, length = 2 + n, int.from_bytes(data[i + 2 : i + 2 + n], "big")
        stop = i + header + length
        if stop > end:
            raise ValueError("DER data is truncated")
        items.append(data[i:stop])
        i = stop
    return items


def load_der_certificates(data: bytes) -> list[x509.Certificate]:
    """Parse concatenated DER certificates; raise ValueError on malformed input."""
    return [x509.load_der_x509_certificate(item) for item in split_der(data)]


def is_pem(data: bytes) -> bool:
    """True when ``data`` looks like PEM text rather than DER."""
    return data.lstrip()[:10] == b"-----BEGIN"


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Parse PEM or concatenated DER certificates (autodetected); raise ValueError if bad."""
    if is_pem(data):
        return x509.load_pem_x509_certificates(data)
    return load_der_certificates(data)


def _parse_certs(
    data: bytes, what: str, *, allow_empty: bool = False
) -> tuple[x509.Certificate, ...]:
    """Parse certificates for a bundle, mapping every failure to BundleError.

    With ``allow_empty``, empty ``data`` is a bundle without authorities (a trust domain whose
    X.509 authorities were all removed, or one that federates JWT authorities only).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BundleError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.strip():
        if allow_empty:
            return ()
        raise BundleError(f"{what} is empty; expected at least one certificate")
    try:
        certs = load_certificates(data)
    except ValueError as err:
        raise BundleError(f"cannot parse certificates in {what}: {err}") from None
    if not certs:
        raise BundleError(f"{what} holds no certificates; expected at least one")
    return tuple(certs)


def _coerce_td(trust_domain: TrustDomain | str) -> TrustDomain:
    """Accept a TrustDomain or its text, mapping bad text to BundleError."""
    if isinstance(trust_domain, TrustDomain):
        return trust_domain
    try:
        return TrustDomain.parse(trust_domain)
    except InvalidSpiffeId as err:
        raise BundleError(str(err)) from None


# --- JWK <-> public key ----------------------------------------------------------------

_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _b64url_int(value: int, size: int | None = None) -> str:
    """Base64url (unpadded) big-endian encoding of ``value``."""
    raw = value.to_bytes(size or max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_decode(text: Any, name: str) -> bytes:
    """Decode an unpadded base64url JWK member, raising BundleError if it is not one."""
    if not isinstance(text, str) or not text:
        raise BundleError(f"JWK member {name!r} must be a non-empty base64url string")
    if not _B64URL.fullmatch(text):
        raise BundleError(f"JWK member {name!r} is not valid base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BundleError(f"JWK member {name!r} is not valid base64url") from None


def public_key_to_jwk(key: PublicKey) -> dict[str, Any]:
    """The RFC 7517 JWK members (``kty`` and key parameters) for an EC or RSA public key."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(key.curve.name)
        if crv is None:
            raise BundleError(f"unsupported curve {key.curve.name}; expected P-256/384/521")
        size = _CURVES[crv][1]
        nums = key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": _b64url_int(nums.x, size),
            "y": _b64url_int(nums.y, size),
        }
    if isinstance(key, rsa.RSAPublicKey):
        rnums = key.public_numbers()
        return {"kty": "RSA", "n": _b64url_int(rnums.n), "e": _b64url_int(rnums.e)}
    raise BundleError(f"unsupported key type {type(key).__name__}; expected EC or RSA")


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """Build the EC or RSA public key a JWK describes; raise BundleError if it is malformed."""
    kty = jwk.get("kty")
    if kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _CURVES:
            raise BundleError(f"JWK crv {crv!r} is unsupported; expected P-256, P-384 or P-521")
        curve, size = _CURVES[crv]
        x = _b64url_decode(jwk.get("x"), "x")
        y = _b64url_decode(jwk.get("y"), "y")
        if len(x) != size or len(y) != size:
            raise BundleError(f"JWK EC coordinates must be {size} bytes for {crv}")
        try:
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        except ValueError:
            raise BundleError(f"JWK EC point is not on curve {crv}") from None
    if kty == "RSA":
        n = int.from_bytes(_b64url_decode(jwk.get("n"), "n"), "big")
        e = int.from_bytes(_b64url_decode(jwk.get("e"), "e"), "big")
        if n.bit_length() < 2048:
            raise BundleError(f"JWK RSA modulus is {n.bit_length()} bits; expected >= 2048")
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as err:
            raise BundleError(f"JWK RSA key is invalid: {err}") from None
    raise BundleError(f"JWK kty {kty!r} is unsupported; expected 'EC' or 'RSA'")


def _is_supported_jwk(jwk: Mapping[str, Any]) -> bool:
    """True for the key types Credo can use: ``EC`` on P-256/384/521 and ``RSA``.

    Keys of any other type (``OKP`` Ed25519, ``oct``, an unknown curve) are ignored by the
    bundle parsers, as the SPIFFE bundle format (4.2.1) and RFC 7517 (5) require, instead of
    making the whole bundle fail.
    """
    kty = jwk.get("kty")
    if kty == "RSA":
        return True
    return kty == "EC" and jwk.get("crv") in _CURVES


def _load_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Decode ``data`` as a UTF-8 JSON object, mapping every failure to BundleError."""
    if not isinstance(data, bytes | bytearray | memoryview | str):
        raise BundleError(f"{what} must be bytes, got {type(data).__name__}")
    try:
        doc = json.loads(bytes(data) if not isinstance(data, str) else data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError
        raise BundleError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{what} must be a JSON object with a 'keys' array")
    return doc


def _keys_array(doc: Mapping[str, Any], what: str) -> list[dict[str, Any]]:
    """Return the ``keys`` array of a JWKS document, checking each entry is an object."""
    keys = doc.get("keys", [])
    if not isinstance(keys, list):
        raise BundleError(f"{what} 'keys' must be an array")
    for i, entry in enumerate(keys):
        if not isinstance(entry, dict):
            raise BundleError(f"{what} key entry {i} must be a JSON object")
    return keys


def _parse_kid(entry: Mapping[str, Any], i: int) -> str:
    """Return a JWT key entry's non-empty ``kid``."""
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise BundleError(f"key entry {i} has no 'kid'; JWT authorities need a key ID")
    return kid


# --- bundles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class X509Bundle:
    """A trust domain's X.509 authorities (root or intermediate CA certificates)."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "trust_domain", _coerce_td(self.trust_domain))
        object.__setattr__(self, "authorities", tuple(self.authorities))

    @classmethod
    def parse_der(cls, trust_domain: TrustDomain | str, data: bytes) -> X509Bundle:
        """Parse concatenated DER certificates (the Workload API ``bundle`` fields).

        Empty ``data`` is a bundle with no authorities: a federated trust domain may publish
        JWT authorities only (X509-SVID standard, 6.2), and a bundle's key set may be empty.
        """
        if is_pem(bytes(data)):
            raise BundleError("bundle is PEM; expected concatenated DER")
        return cls(_coerce_td(trust_domain), _parse_certs(data, "X.509 bundle", allow_empty=True))

    @classmethod
    def parse_pem(cls, trust_domain: TrustDomain | str, data: bytes) -> X509Bundle:
        """Parse PEM ``CERTIFICATE`` blocks."""
        if not is_pem(bytes(data)):
            raise BundleError("bundle is not PEM; expected '-----BEGIN CERTIFICATE-----'")
        return cls(_coerce_td(trust_domain), _parse_certs(data, "X.509 bundle"))

    @classmethod
    def parse(cls, trust_domain: TrustDomain | str, data: bytes) -> X509Bundle:
        """Parse PEM or concatenated DER, whichever ``data`` is."""
        return cls(_coerce_td(trust_domain), _parse_certs(data, "X.509 bundle"))

    def marshal_der(self) -> bytes:
        """The authorities as concatenated DER."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.authorities)

    def marshal_pem(self) -> bytes:
        """The authorities as PEM blocks."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.authorities)


@dataclass(frozen=True, eq=False)
class JwtBundle:
    """A trust domain's JWT-SVID signing keys, by key ID (``kid``)."""

    trust_domain: TrustDomain
    keys: Mapping[str, PublicKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trust_domain", _coerce_td(self.trust_domain))
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JwtBundle):
            return NotImplemented
        return self.trust_domain == other.trust_domain and dict(self.keys) == dict(other.keys)

    __hash__ = None  # type: ignore[assignment]

    def get_key(self, key_id: str) -> PublicKey | None:
        """The public key for ``key_id``, or None."""
        return self.keys.get(key_id)

    @classmethod
    def parse(cls, trust_domain: TrustDomain | str, data: bytes) -> JwtBundle:
        """Parse an RFC 7517 JWKS of signing keys.

        Keys with a ``use`` other than ``sig`` or ``jwt-svid`` (``x509-svid``, ``enc``...)
        and keys of a type Credo does not know are skipped; unknown members are ignored.
        """
        td = _coerce_td(trust_domain)
        doc = _load_json_object(data, "JWT bundle")
        keys: dict[str, PublicKey] = {}
        for i, entry in enumerate(_keys_array(doc, "JWT bundle")):
            if entry.get("use") not in (None, "sig", _USE_JWT) or not _is_supported_jwk(entry):
                continue
            kid = _parse_kid(entry, i)
            if kid in keys:
                raise BundleError(f"key entry {i} repeats kid {kid!r}; key IDs must be unique")
            keys[kid] = public_key_from_jwk(entry)
        return cls(td, keys)

    def marshal(self) -> bytes:
        """The keys as an RFC 7517 JWKS document."""
        entries = [{**public_key_to_jwk(key), "kid": kid} for kid, key in self.keys.items()]
        return json.dumps({"keys": entries}, sort_keys=False).encode()


@dataclass(frozen=True, eq=False)
class WitBundle:
    """A trust domain's WIT-SVID signing keys, by key ID (``kid``) (WIT-SVID standard, 6)."""

    trust_domain: TrustDomain
    keys: Mapping[str, PublicKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trust_domain", _coerce_td(self.trust_domain))
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WitBundle):
            return NotImplemented
        return self.trust_domain == other.trust_domain and dict(self.keys) == dict(other.keys)

    __hash__ = None  # type: ignore[assignment]

    def get_key(self, key_id: str) -> PublicKey | None:
        """The public key for ``key_id``, or None."""
        return self.keys.get(key_id)

    @classmethod
    def parse(cls, trust_domain: TrustDomain | str, data: bytes | str) -> WitBundle:
        """Parse a JWKS of WIT-SVID signing keys (the Workload API's ``FetchWITBundles``).

        Keys marked for another ``use`` (``jwt-svid``, ``x509-svid``...) and keys of a type
        Credo does not know are skipped; a key with no ``use`` counts.
        """
        td = _coerce_td(trust_domain)
        doc = _load_json_object(data.encode() if isinstance(data, str) else data, "WIT bundle")
        keys: dict[str, PublicKey] = {}
        for i, entry in enumerate(_keys_array(doc, "WIT bundle")):
            if entry.get("use") not in (None, _USE_WIT) or not _is_supported_jwk(entry):
                continue
            kid = _parse_kid(entry, i)
            if kid in keys:
                raise BundleError(f"key entry {i} repeats kid {kid!r}; key IDs must be unique")
            keys[kid] = public_key_from_jwk(entry)
        return cls(td, keys)

    def marshal(self) -> bytes:
        """The keys as a plain RFC 7517 JWKS document (``FetchWITBundles``).

        No ``use`` member, as in JWT bundles: JOSE libraries accept only ``sig``/``enc``
        there, and the bundle's purpose already says what the keys are for.
        """
        entries = [{**public_key_to_jwk(key), "kid": kid} for kid, key in self.keys.items()]
        return json.dumps({"keys": entries}).encode()


@dataclass(frozen=True, eq=False)
class Bundle:
    """A SPIFFE bundle: a trust domain's X.509 and JWT authorities, with a sequence number.

    ``sequence_number`` is ``spiffe_sequence`` (incremented on every change);
    ``refresh_hint`` is ``spiffe_refresh_hint`` in seconds, or None if unset.
    ``wit_authorities`` are the WIT-SVID signing keys (``use: wit-svid``) by ``kid``.
    """

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: Mapping[str, PublicKey] = field(default_factory=dict)
    sequence_number: int = 0
    refresh_hint: int | None = None
    wit_authorities: Mapping[str, PublicKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trust_domain", _coerce_td(self.trust_domain))
        object.__setattr__(self, "x509_authorities", tuple(self.x509_authorities))
        object.__setattr__(self, "jwt_authorities", MappingProxyType(dict(self.jwt_authorities)))
        object.__setattr__(self, "wit_authorities", MappingProxyType(dict(self.wit_authorities)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bundle):
            return NotImplemented
        return (
            self.trust_domain == other.trust_domain
            and self.x509_authorities == other.x509_authorities
            and dict(self.jwt_authorities) == dict(other.jwt_authorities)
            and self.sequence_number == other.sequence_number
            and self.refresh_hint == other.refresh_hint
            and dict(self.wit_authorities) == dict(other.wit_authorities)
        )

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def parse(cls, trust_domain: TrustDomain | str, data: bytes) -> Bundle:
        """Parse a SPIFFE bundle (JWKS with ``use`` on every key).

        As the standard requires (SPIFFE Trust Domain and Bundle, 4.1.3, 4.2.1, 4.2.2), a key
        with no ``use``, an unknown ``use`` or an unknown key type is ignored, not an error,
        and an empty ``keys`` array is a valid bundle (all of a trust domain's keys revoked).
        """
        td = _coerce_td(trust_domain)
        doc = _load_json_object(data, "SPIFFE bundle")
        if "keys" not in doc:
            raise BundleError("SPIFFE bundle has no 'keys' array")
        authorities: list[x509.Certificate] = []
        jwt_keys: dict[str, PublicKey] = {}
        wit_keys: dict[str, PublicKey] = {}
        for i, entry in enumerate(_keys_array(doc, "SPIFFE bundle")):
            use = entry.get("use")
            if use not in (_USE_X509, _USE_JWT, _USE_WIT) or not _is_supported_jwk(entry):
                continue  # no, unknown or other use, or an unknown key type
            if use == _USE_X509:
                cert = _parse_x5c(entry, i)
                if cert is not None:
                    authorities.append(cert)
            else:
                kid = _parse_kid(entry, i)
                if kid in jwt_keys or kid in wit_keys:
                    raise BundleError(f"key entry {i} repeats kid {kid!r}; key IDs must be unique")
                keys = jwt_keys if use == _USE_JWT else wit_keys
                keys[kid] = public_key_from_jwk(entry)
        sequence = doc.get("spiffe_sequence", 0)
        if type(sequence) is not int or sequence < 0:
            raise BundleError("'spiffe_sequence' must be a non-negative integer")
        hint = doc.get("spiffe_refresh_hint")
        if hint is not None and (type(hint) is not int or hint < 0):
            raise BundleError("'spiffe_refresh_hint' must be a non-negative integer (seconds)")
        return cls(td, tuple(authorities), jwt_keys, sequence, hint, wit_keys)

    def marshal(self) -> bytes:
        """The bundle as a SPIFFE bundle JWKS document."""
        entries: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            der = cert.public_bytes(serialization.Encoding.DER)
            key = cert.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise BundleError("X.509 authority key must be EC or RSA")
            entries.append(
                {
                    **public_key_to_jwk(key),
                    "use": _USE_X509,
                    "x5c": [base64.b64encode(der).decode("ascii")],
                }
            )
        for kid, jwt_key in self.jwt_authorities.items():
            entries.append({**public_key_to_jwk(jwt_key), "use": _USE_JWT, "kid": kid})
        for kid, wit_key in self.wit_authorities.items():
            entries.append({**public_key_to_jwk(wit_key), "use": _USE_WIT, "kid": kid})
        doc: dict[str, Any] = {"keys": entries, "spiffe_sequence": self.sequence_number}
        if self.refresh_hint is not None:
            doc["spiffe_refresh_hint"] = self.refresh_hint
        return json.dumps(doc).encode()

    def marshal_pem(self) -> bytes:
        """The X.509 authorities as PEM blocks."""
        return self.x509_bundle().marshal_pem()

    def x509_bundle(self) -> X509Bundle:
        """The X.509 part of this bundle."""
        return X509Bundle(self.trust_domain, self.x509_authorities)

    def jwt_bundle(self) -> JwtBundle:
        """The JWT part of this bundle."""
        return JwtBundle(self.trust_domain, self.jwt_authorities)

    def wit_bundle(self) -> WitBundle:
        """The WIT-SVID part of this bundle (no keys: the domain does not issue WIT-SVIDs)."""
        return WitBundle(self.trust_domain, self.wit_authorities)


def _parse_x5c(entry: Mapping[str, Any], i: int) -> x509.Certificate | None:
    """Return the certificate of an ``x509-svid`` key entry, or None if it has none.

    Per X509-SVID section 6.2, an entry without ``x5c`` (or with an empty one) is ignored,
    and only the first ``x5c`` value counts.
    """
    x5c = entry.get("x5c")
    if x5c is None or x5c == []:
        return None
    if not isinstance(x5c, list) or not isinstance(x5c[0], str):
        raise BundleError(f"key entry {i} 'x5c' must be an array of base64 strings")
    try:
        der = base64.b64decode(x5c[0], validate=True)
        return x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError) as err:
        raise BundleError(f"key entry {i} 'x5c' is not a base64 DER certificate: {err}") from None


class BundleSet(Mapping[TrustDomain, Bundle]):
    """SPIFFE bundles by trust domain (own plus federated). Mutable: :meth:`add`/:meth:`remove`."""

    def __init__(self, bundles: Iterable[Bundle] = ()) -> None:
        self._bundles: dict[TrustDomain, Bundle] = {}
        for bundle in bundles:
            self.add(bundle)

    def add(self, bundle: Bundle) -> None:
        """Add ``bundle``, replacing any bundle for the same trust domain."""
        if not isinstance(bundle, Bundle):
            raise TypeError(f"expected a Bundle, got {type(bundle).__name__}")
        self._bundles[bundle.trust_domain] = bundle

    def remove(self, trust_domain: TrustDomain) -> None:
        """Remove the bundle for ``trust_domain`` if there is one."""
        self._bundles.pop(trust_domain, None)

    def __getitem__(self, trust_domain: TrustDomain) -> Bundle:
        return self._bundles[trust_domain]

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(sorted(self._bundles))

    def __len__(self) -> int:
        return len(self._bundles)

    def __repr__(self) -> str:
        return f"BundleSet({[str(td) for td in self]})"

    def get_bundle_for_trust_domain(self, trust_domain: TrustDomain) -> Bundle | None:
        """The SPIFFE bundle for ``trust_domain``, or None."""
        return self._bundles.get(trust_domain)

    def get_x509_bundle_for_trust_domain(self, trust_domain: TrustDomain) -> X509Bundle | None:
        """The X.509 bundle for ``trust_domain``, or None."""
        bundle = self._bundles.get(trust_domain)
        return None if bundle is None else bundle.x509_bundle()

    def get_jwt_bundle_for_trust_domain(self, trust_domain: TrustDomain) -> JwtBundle | None:
        """The JWT bundle for ``trust_domain``, or None."""
        bundle = self._bundles.get(trust_domain)
        return None if bundle is None else bundle.jwt_bundle()

    def get_wit_bundle_for_trust_domain(self, trust_domain: TrustDomain) -> WitBundle | None:
        """The WIT bundle for ``trust_domain``, or None."""
        bundle = self._bundles.get(trust_domain)
        return None if bundle is None else bundle.wit_bundle()
