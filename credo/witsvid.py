"""WIT-SVIDs: Workload Identity Tokens per the SPIFFE WIT-SVID standard.

A WIT-SVID (the SPIFFE profile of the WIMSE Workload Identity Token) is a JWS compact token
that binds a workload's public key to its SPIFFE ID:

* header: ``typ`` = ``wit+jwt``, ``alg`` (RS/ES/PS 256/384/512) and ``kid`` (required);
* claims: ``sub`` (the SPIFFE ID), ``exp``, ``cnf.jwk`` (the workload's public key, with its
  ``alg``), and, when Credo signs, ``iat``, ``nbf`` and a random ``jti``. No ``aud``: a WIT
  is not addressed to anyone, and it is never a bearer token.

The signing keys are the trust domain's WIT authorities, published in its SPIFFE bundle
with ``use: wit-svid`` (:class:`credo.WitBundle`). A verifier must not accept a WIT without
a proof of possession of the ``cnf`` key: :mod:`credo.wpt` makes and checks one.

:meth:`WitSvid.parse_and_validate` raises a :class:`credo.WitSvidError` subclass for each
broken rule; it never returns a bool. Never log a whole token or its private key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import secrets
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from credo.bundle import BundleSet, WitBundle, public_key_from_jwk, public_key_to_jwk
from credo.errors import (
    BundleError,
    InvalidSpiffeId,
    InvalidWitSvid,
    UntrustedWitSvid,
    WitSvidError,
    WitSvidExpired,
    WitSvidRevoked,
)
from credo.keys import PrivateKey, PublicKey, jwt_algorithm_for
from credo.spiffe_id import SpiffeId

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_WIT_SVID_TTL",
    "WIT_TYPE",
    "WitSvid",
    "private_key_from_jwk",
    "private_key_to_jwk",
    "public_key_jwk",
    "sign_wit_svid",
    "token_hash",
]

WIT_TYPE = "wit+jwt"
"""The ``typ`` header of every WIT-SVID."""

ALLOWED_ALGORITHMS = frozenset(
    f"{family}{bits}" for family in ("RS", "ES", "PS") for bits in (256, 384, 512)
)
"""The JWS ``alg`` values the WIT-SVID standard allows (header and ``cnf.jwk.alg``)."""

DEFAULT_WIT_SVID_TTL = timedelta(hours=1)
"""WIT-SVID lifetime when neither ``expires_at`` nor ``ttl`` is given."""

DEFAULT_LEEWAY = timedelta(seconds=30)
"""Clock skew tolerated when checking ``exp`` and ``nbf``."""

NOT_BEFORE_BACKDATE = timedelta(seconds=10)
"""``nbf`` is set this far before the issue time, for verifiers whose clocks run behind."""

_EC_CURVE_FOR_ALG = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def token_hash(token: str) -> str:
    """Base64url (unpadded) SHA-256 of a token's ASCII text: the WIMSE ``wth``/``ath``/``tth``."""
    return _b64url(hashlib.sha256(token.encode("ascii")).digest())


def algorithm_fits_key(alg: str, key: PublicKey | PrivateKey) -> bool:
    """True when ``alg`` can be used with ``key`` (ES* on its own curve, RS*/PS* on RSA)."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return _EC_CURVE_FOR_ALG.get(alg) == key.curve.name
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return alg[:2] in ("RS", "PS") and alg in ALLOWED_ALGORITHMS
    return False


def public_key_jwk(key: PublicKey | PrivateKey, alg: str | None = None) -> dict[str, Any]:
    """The public JWK of ``key`` with its ``alg`` (default: the one Credo signs with)."""
    public = (
        key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else key
    )
    alg = alg or jwt_algorithm_for(public)
    if not algorithm_fits_key(alg, public):
        raise ValueError(f"alg {alg!r} does not fit the key")
    return {**public_key_to_jwk(public), "alg": alg}


def _jose_key(key: PublicKey | PrivateKey) -> ECKey | RSAKey:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return ECKey.import_key(key)
    return RSAKey.import_key(key)


def private_key_to_jwk(key: PrivateKey, alg: str | None = None) -> str:
    """``key`` as an RFC 7517 private JWK (JSON text) with ``alg``: the Workload API's
    ``wit_svid_key``. Secret: never log it."""
    doc = _jose_key(key).as_dict(private=True)
    doc["alg"] = alg or jwt_algorithm_for(key)
    return json.dumps(doc)


def private_key_from_jwk(text: str | Mapping[str, Any]) -> PrivateKey:
    """Load an EC or RSA private key from a JWK (JSON text or object); ValueError if bad."""
    try:
        doc = json.loads(text) if isinstance(text, str) else dict(text)
    except ValueError:
        raise ValueError("private key is not a JSON JWK") from None
    if not isinstance(doc, dict) or "d" not in doc:
        raise ValueError("private key JWK has no 'd' member; expected a private key")
    key: object
    try:
        if doc.get("kty") == "EC":
            key = ECKey.import_key(doc).private_key
        elif doc.get("kty") == "RSA":
            key = RSAKey.import_key(doc).private_key
        else:
            raise ValueError(f"private key JWK kty {doc.get('kty')!r}; expected 'EC' or 'RSA'")
    except (JoseError, TypeError, KeyError) as err:
        raise ValueError(f"private key JWK is malformed: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("private key JWK is not an EC or RSA private key")
    return key


def sign_wit_svid(
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    *,
    key: PrivateKey,
    key_id: str,
    expires_at: datetime | None = None,
    ttl: timedelta | None = None,
    public_key_alg: str | None = None,
    now: datetime | None = None,
    jti: str | None = None,
) -> str:
    """Sign a WIT-SVID binding ``public_key`` (``cnf.jwk``) to ``spiffe_id`` with ``key``.

    ``alg`` follows the signing key; ``cnf.jwk.alg`` follows ``public_key`` unless
    ``public_key_alg`` is given. ``exp`` is ``expires_at`` if given, else ``now + ttl``
    (default one hour); ``nbf`` is 10 s before ``iat``; ``jti`` is random unless given.
    """
    if not key_id:
        raise ValueError("key_id is empty; WIT-SVIDs need a 'kid' header")
    issued = _now(now)
    if expires_at is None:
        expires_at = issued + (ttl if ttl is not None else DEFAULT_WIT_SVID_TTL)
    elif ttl is not None:
        raise ValueError("give expires_at or ttl, not both")
    if expires_at.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware")
    if expires_at <= issued:
        raise ValueError("expires_at must be after the issue time")
    claims = {
        "sub": str(spiffe_id),
        "exp": math.floor(expires_at.timestamp()),
        "iat": math.floor(issued.timestamp()),
        "nbf": math.floor((issued - NOT_BEFORE_BACKDATE).timestamp()),
        "jti": jti or secrets.token_urlsafe(24),
        "cnf": {"jwk": public_key_jwk(public_key, public_key_alg)},
    }
    header = {"alg": jwt_algorithm_for(key), "typ": WIT_TYPE, "kid": key_id}
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return jws.serialize_compact(header, payload, _jose_key(key), algorithms=[header["alg"]])


# --- parsing ---------------------------------------------------------------------------


def _decode_part(part: str, what: str, error: type[WitSvidError]) -> dict[str, Any]:
    if not part or any(c not in _B64URL_CHARS for c in part):
        raise error(f"{what} is not base64url")
    try:
        doc = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise error(f"{what} is not base64url JSON") from None
    if not isinstance(doc, dict):
        raise error(f"{what} must be a JSON object")
    return doc


_B64URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def split_compact(
    token: object, error: type[WitSvidError] = InvalidWitSvid
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a JWS compact token (signature not checked)."""
    if not isinstance(token, str) or not token:
        raise error("token must be a non-empty string")
    parts = token.split(".")
    if len(parts) != 3 or not parts[2]:
        raise error("token is not a JWS compact serialization (header.payload.signature)")
    return _decode_part(parts[0], "header", error), _decode_part(parts[1], "payload", error)


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> datetime | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise InvalidWitSvid(f"claim {name!r} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidWitSvid(f"claim {name!r} must be a NumericDate (seconds since the epoch)")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise InvalidWitSvid(f"claim {name!r} is out of range") from None


def parse_cnf(claims: Mapping[str, Any]) -> tuple[PublicKey, str, dict[str, Any]]:
    """The ``cnf.jwk`` key of a WIT, its ``alg`` and the JWK itself; InvalidWitSvid if bad."""
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict) or not isinstance(cnf.get("jwk"), dict):
        raise InvalidWitSvid("claim 'cnf' must be an object with a 'jwk' public key")
    jwk = cnf["jwk"]
    if "d" in jwk or "p" in jwk:
        raise InvalidWitSvid("cnf.jwk holds private key material")
    alg = jwk.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise InvalidWitSvid(f"cnf.jwk.alg {alg!r} is not allowed; expected RS/ES/PS 256/384/512")
    try:
        key = public_key_from_jwk(jwk)
    except BundleError as err:
        raise InvalidWitSvid(f"cnf.jwk is not a usable public key: {err.reason}") from None
    if not algorithm_fits_key(alg, key):
        raise InvalidWitSvid(f"cnf.jwk.alg {alg} does not fit the key in cnf.jwk")
    return key, alg, dict(jwk)


@dataclass(frozen=True)
class WitSvid:
    """A parsed WIT-SVID: its SPIFFE ID, lifetime, claims and the workload key it binds."""

    token: str = field(repr=False)
    spiffe_id: SpiffeId
    expires_at: datetime
    key_id: str
    algorithm: str
    public_key: PublicKey = field(repr=False)
    """The ``cnf.jwk`` key: the one a proof of possession must be signed with."""
    public_key_alg: str
    """``cnf.jwk.alg``: the algorithm of proofs signed with :attr:`public_key`."""
    claims: Mapping[str, Any] = field(repr=False, default_factory=dict)
    header: Mapping[str, Any] = field(repr=False, default_factory=dict)
    issued_at: datetime | None = None
    not_before: datetime | None = None
    jti: str | None = None

    @property
    def wth(self) -> str:
        """The hash a Workload Proof Token carries in ``wth`` to bind itself to this WIT."""
        return token_hash(self.token)

    @classmethod
    def parse_insecure(cls, token: str) -> WitSvid:
        """Parse the header and claims and check their shape, WITHOUT checking the signature
        or the lifetime. For a workload reading its own WIT; never to authenticate a peer."""
        header, claims = split_compact(token)
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != WIT_TYPE:
            raise InvalidWitSvid(f"header 'typ' is {typ!r}; expected {WIT_TYPE!r}")
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise InvalidWitSvid(
                f"header 'alg' {alg!r} is not allowed; expected RS/ES/PS 256/384/512"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidWitSvid("header 'kid' is missing; WIT-SVIDs must name their key")
        if "crit" in header:
            raise InvalidWitSvid("header 'crit' is not supported")
        sub = claims.get("sub")
        if not isinstance(sub, str):
            raise InvalidWitSvid("claim 'sub' is missing; expected the SPIFFE ID")
        try:
            spiffe_id = SpiffeId.parse(sub)
        except InvalidSpiffeId as err:
            raise InvalidWitSvid(f"claim 'sub' is not a SPIFFE ID: {err.reason}") from None
        expires_at = _numeric_date(claims, "exp", required=True)
        assert expires_at is not None
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or not jti):
            raise InvalidWitSvid("claim 'jti' must be a non-empty string")
        public_key, public_key_alg, _ = parse_cnf(claims)
        return cls(
            token=token,
            spiffe_id=spiffe_id,
            expires_at=expires_at,
            key_id=kid,
            algorithm=alg,
            public_key=public_key,
            public_key_alg=public_key_alg,
            claims=MappingProxyType(claims),
            header=MappingProxyType(header),
            issued_at=_numeric_date(claims, "iat", required=False),
            not_before=_numeric_date(claims, "nbf", required=False),
            jti=jti,
        )

    @classmethod
    def parse_and_validate(
        cls,
        token: str,
        bundles: WitBundle | BundleSet | Mapping[Any, WitBundle],
        *,
        now: datetime | None = None,
        leeway: timedelta = DEFAULT_LEEWAY,
        revoked: Container[str] | None = None,
    ) -> WitSvid:
        """Parse ``token`` and check it against the WIT bundle of its trust domain.

        Checks the header (``typ``, ``alg``, ``kid``), the claims (``sub``, ``exp``,
        ``nbf``, ``cnf.jwk``), that ``kid`` names a key of the WIT bundle for ``sub``'s
        trust domain, and the signature. ``revoked`` is a revocation source: any container
        of revoked ``jti`` values, e.g. a :class:`credo.revocation.JwtRevocationList` or
        :class:`credo.revocation.PolledRevocationList` (the server lists revoked WIT-SVIDs
        there with the JWTs): a listed ``jti`` raises :class:`credo.errors.WitSvidRevoked`.
        Proof of possession is the caller's next step (:func:`credo.wpt.verify_wpt`).
        """
        wit = cls.parse_insecure(token)
        td = wit.spiffe_id.trust_domain
        bundle: WitBundle | None
        if isinstance(bundles, WitBundle):
            bundle = bundles if bundles.trust_domain == td else None
        elif isinstance(bundles, BundleSet):
            bundle = bundles.get_wit_bundle_for_trust_domain(td)
        else:
            bundle = bundles.get(td) or bundles.get(str(td))
        if bundle is None:
            raise UntrustedWitSvid(f"no WIT bundle for trust domain {td}")
        key = bundle.get_key(wit.key_id)
        if key is None:
            raise UntrustedWitSvid(
                f"no WIT-SVID key {wit.key_id!r} in the bundle of trust domain {td}"
            )
        if not algorithm_fits_key(wit.algorithm, key):
            raise UntrustedWitSvid(f"alg {wit.algorithm} does not fit key {wit.key_id!r}")
        try:
            jws.deserialize_compact(token, _jose_key(key), algorithms=[wit.algorithm])
        except (JoseError, ValueError):
            raise UntrustedWitSvid("signature does not verify") from None
        moment = _now(now)
        if wit.expires_at <= moment - leeway:
            raise WitSvidExpired(f"token expired at {wit.expires_at.isoformat()}")
        if wit.not_before is not None and wit.not_before > moment + leeway:
            raise WitSvidExpired(f"token is not valid before {wit.not_before.isoformat()}")
        if revoked is not None and wit.jti is not None and wit.jti in revoked:
            raise WitSvidRevoked(f"jti {wit.jti[:64]!r} has been revoked")
        return wit
