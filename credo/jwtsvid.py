"""JWT-SVIDs: signing, parsing, and validation per the SPIFFE JWT-SVID standard.

A JWT-SVID is a JWS compact token whose header has ``alg`` (RS/ES/PS 256/384/512),
``kid``, and optionally ``typ`` (``JWT`` or ``JOSE``), and whose claims have ``sub``
(a SPIFFE ID), ``aud``, ``exp`` and, when Credo signs, ``iat`` and a unique ``jti``, and
``iss`` when the server has a ``jwt_issuer`` (what OIDC relying parties such as cloud
providers match on). Validation accepts tokens with and without ``iss``, as the JWT-SVID
standard allows; given ``issuer=``, it requires ``iss`` to be exactly that.

:meth:`JwtSvid.parse_and_validate` raises a :class:`credo.JwtSvidError` subclass for each
broken rule; it never returns a bool. Never log a whole token.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import get_default_algorithms

from credo.bundle import BundleSet, JwtBundle
from credo.errors import (
    InvalidJwtSvid,
    InvalidSpiffeId,
    JwtAudienceMismatch,
    JwtIssuerMismatch,
    JwtSvidExpired,
    JwtSvidRevoked,
    UnknownJwtKey,
    UnsupportedJwtAlgorithm,
    UntrustedJwtSvid,
)
from credo.keys import PrivateKey, PublicKey, jwt_algorithm_for
from credo.spiffe_id import SpiffeId

__all__ = ["ALLOWED_ALGORITHMS", "DEFAULT_JWT_SVID_TTL", "JwtSvid", "sign_jwt_svid"]

ALLOWED_ALGORITHMS = frozenset(
    f"{family}{bits}" for family in ("RS", "ES", "PS") for bits in (256, 384, 512)
)
"""The JWS ``alg`` values the JWT-SVID standard allows."""

DEFAULT_JWT_SVID_TTL = timedelta(minutes=5)
"""JWT-SVID lifetime when neither ``expires_at`` nor ``ttl`` is given (SPIRE's default)."""

DEFAULT_LEEWAY = timedelta(seconds=30)
"""Clock skew tolerated when checking ``exp`` and ``nbf``."""

_ALLOWED_TYPES = ("JWT", "JOSE")
_RESERVED_CLAIMS = ("sub", "aud", "exp", "iat", "iss", "jti")
_EC_CURVE_FOR_ALG = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_JWT_ALGORITHMS = get_default_algorithms()
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _now(now: datetime | None) -> datetime:
    """``now`` or the current time, as an aware UTC datetime."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def sign_jwt_svid(
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    *,
    key: PrivateKey,
    key_id: str,
    expires_at: datetime | None = None,
    ttl: timedelta | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    now: datetime | None = None,
    issuer: str | None = None,
    jwt_id: str | None = None,
) -> str:
    """Sign a JWT-SVID for ``spiffe_id`` and ``audience`` with ``key`` (header ``kid``).

    ``alg`` follows the key (ES256 for P-256, ES384 for P-384, RS256 for RSA). ``exp`` is
    ``expires_at`` if given, else ``now + ttl`` (default 5 minutes). ``aud`` is always a
    list. ``iss`` is ``issuer`` when given; ``jti`` is ``jwt_id`` or 128 random bits.
    ``extra_claims`` may not override ``sub``, ``aud``, ``exp``, ``iat``, ``iss`` or ``jti``.
    """
    if isinstance(audience, str):
        raise ValueError("audience must be a sequence of strings, not a single string")
    audiences = list(audience)
    if not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise ValueError("audience must hold at least one non-empty string")
    if not key_id:
        raise ValueError("key_id is empty; JWT-SVIDs need a 'kid' header")
    issued = _now(now)
    if expires_at is None:
        expires_at = issued + (ttl if ttl is not None else DEFAULT_JWT_SVID_TTL)
    elif ttl is not None:
        raise ValueError("give expires_at or ttl, not both")
    if expires_at.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware")
    if expires_at <= issued:
        raise ValueError("expires_at must be after the issue time")
    claims: dict[str, Any] = {}
    if extra_claims:
        clash = sorted(set(extra_claims) & set(_RESERVED_CLAIMS))
        if clash:
            raise ValueError(f"extra_claims may not set {', '.join(clash)}")
        claims.update(extra_claims)
    if issuer is not None and not issuer:
        raise ValueError("issuer is empty; give None for a token without 'iss'")
    if issuer:
        claims["iss"] = issuer
    claims.update(
        sub=str(spiffe_id),
        aud=audiences,
        exp=math.floor(expires_at.timestamp()),
        iat=math.floor(issued.timestamp()),
        jti=jwt_id or secrets.token_urlsafe(16),
    )
    return jwt.encode(
        claims, key, algorithm=jwt_algorithm_for(key), headers={"kid": key_id, "typ": "JWT"}
    )


def _b64url(part: str, what: str) -> bytes:
    """Decode one unpadded base64url token part (strictly: no padding, no other alphabet)."""
    if not _B64URL.fullmatch(part):
        raise InvalidJwtSvid(f"token {what} is not valid base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise InvalidJwtSvid(f"token {what} is not valid base64url") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object token part."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        raise InvalidJwtSvid(f"token {what} is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidJwtSvid(f"token {what} must be a JSON object")
    return value


def _is_number(value: object) -> bool:
    """True for JSON numbers (int or finite float), false for bools."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _timestamp(value: float) -> datetime:
    """A NumericDate as an aware UTC datetime (clamped to the datetime range)."""
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.max.replace(tzinfo=UTC) if value > 0 else datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Parsed:
    """A token split and decoded, before any trust decision."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expires_at: datetime
    issued_at: datetime | None
    algorithm: str
    key_id: str


def _parse(token: str, *, require_kid: bool) -> _Parsed:
    """Split and check the token's structure, header and claims (not trust or time)."""
    if not isinstance(token, str):
        raise InvalidJwtSvid(f"token must be a string, got {type(token).__name__}")
    if not token:
        raise InvalidJwtSvid("token is empty")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidJwtSvid(
            f"token has {len(parts)} dot-separated parts; expected 3 (JWS compact form)"
        )
    header = _json_object(_b64url(parts[0], "header"), "header")
    claims = _json_object(_b64url(parts[1], "payload"), "payload")
    signature = _b64url(parts[2], "signature")

    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise InvalidJwtSvid("header has no 'alg'")
    if alg not in ALLOWED_ALGORITHMS:
        raise UnsupportedJwtAlgorithm(
            f"header alg {alg[:20]!r} is not allowed; expected one of RS/ES/PS 256/384/512"
        )
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise InvalidJwtSvid("header 'kid' must be a string")
    if require_kid and not kid:
        raise InvalidJwtSvid("header has no 'kid'; expected the signing key's ID")
    if "typ" in header and header["typ"] not in _ALLOWED_TYPES:
        raise InvalidJwtSvid(f"header typ {str(header['typ'])[:20]!r} is not 'JWT' or 'JOSE'")

    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidJwtSvid("claim 'sub' is missing; expected a SPIFFE ID")
    try:
        spiffe_id = SpiffeId.parse(sub)
    except InvalidSpiffeId as err:
        raise InvalidJwtSvid(f"claim 'sub' is not a SPIFFE ID: {err.reason}") from None

    aud = claims.get("aud")
    if isinstance(aud, str):
        audience: tuple[str, ...] = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        audience = tuple(aud)
    else:
        raise InvalidJwtSvid("claim 'aud' is missing; expected a string or a list of strings")
    if not audience or not all(audience):
        raise InvalidJwtSvid("claim 'aud' is empty; expected at least one audience")

    exp = claims.get("exp")
    if exp is None:
        raise InvalidJwtSvid("claim 'exp' is missing; expected an expiry time")
    if not _is_number(exp):
        raise InvalidJwtSvid("claim 'exp' must be a number (seconds since the epoch)")
    iat = claims.get("iat")
    if iat is not None and not _is_number(iat):
        raise InvalidJwtSvid("claim 'iat' must be a number (seconds since the epoch)")
    nbf = claims.get("nbf")
    if nbf is not None and not _is_number(nbf):
        raise InvalidJwtSvid("claim 'nbf' must be a number (seconds since the epoch)")
    for name in ("iss", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise InvalidJwtSvid(f"claim {name!r} must be a string")

    return _Parsed(
        header=header,
        claims=claims,
        signing_input=f"{parts[0]}.{parts[1]}".encode("ascii", "replace"),
        signature=signature,
        spiffe_id=spiffe_id,
        audience=audience,
        expires_at=_timestamp(exp),
        issued_at=None if iat is None else _timestamp(iat),
        algorithm=alg,
        key_id=kid or "",
    )


def _check_issuer(parsed: _Parsed, issuer: str | None) -> None:
    """Raise JwtIssuerMismatch if ``issuer`` is asked for and ``iss`` is not exactly it."""
    if issuer is None:
        return
    if not issuer:
        raise ValueError("issuer is empty; give None to accept tokens with or without 'iss'")
    iss = parsed.claims.get("iss")
    if iss is None:
        raise JwtIssuerMismatch(f"token has no 'iss'; expected issuer {issuer[:200]!r}")
    if iss != issuer:
        raise JwtIssuerMismatch(
            f"token issuer {str(iss)[:200]!r} is not the expected {issuer[:200]!r}"
        )


def _check_time_and_audience(
    parsed: _Parsed, audience: Sequence[str], now: datetime, leeway: timedelta
) -> None:
    """Raise if the token is expired, not yet valid, or for none of ``audience``."""
    if now - leeway > parsed.expires_at:
        raise JwtSvidExpired(
            f"token expired at {parsed.expires_at.isoformat()}; now is {now.isoformat()}"
        )
    nbf = parsed.claims.get("nbf")
    if nbf is not None and now + leeway < _timestamp(nbf):
        raise InvalidJwtSvid(f"token is not valid before {_timestamp(nbf).isoformat()}")
    if not set(parsed.audience) & set(audience):
        raise JwtAudienceMismatch(
            f"token audience {list(parsed.audience)[:5]} contains none of {list(audience)[:5]}"
        )


def _expected_audience(audience: Sequence[str]) -> tuple[str, ...]:
    """Check the caller's expected audience list (a caller error, so ValueError)."""
    if isinstance(audience, str):
        raise ValueError("audience must be a sequence of strings, not a single string")
    expected = tuple(audience)
    if not expected:
        raise ValueError("audience is empty; expected at least one audience to accept")
    return expected


def _check_key_fits(algorithm: str, key: PublicKey, key_id: str) -> None:
    """Raise UntrustedJwtSvid if ``key`` cannot have made an ``algorithm`` signature."""
    if algorithm.startswith("ES"):
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise UntrustedJwtSvid(f"key {key_id!r} is not an EC key but alg is {algorithm}")
        if key.curve.name != _EC_CURVE_FOR_ALG[algorithm]:
            raise UntrustedJwtSvid(
                f"key {key_id!r} is on curve {key.curve.name}, which does not match {algorithm}"
            )
    elif not isinstance(key, rsa.RSAPublicKey):
        raise UntrustedJwtSvid(f"key {key_id!r} is not an RSA key but alg is {algorithm}")


def _verify_signature(parsed: _Parsed, key: PublicKey) -> None:
    """Verify the JWS signature with ``key``; raise UntrustedJwtSvid if it does not verify."""
    _check_key_fits(parsed.algorithm, key, parsed.key_id)
    algorithm = _JWT_ALGORITHMS[parsed.algorithm]
    try:
        ok = algorithm.verify(parsed.signing_input, key, parsed.signature)
    except (jwt.PyJWTError, ValueError, TypeError):
        ok = False
    if not ok:
        raise UntrustedJwtSvid(f"signature does not verify with key {parsed.key_id!r}")


@dataclass(frozen=True)
class JwtSvid:
    """A parsed JWT-SVID. ``token`` is the compact JWS; keep it out of logs."""

    token: str = field(repr=False)
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expires_at: datetime
    issued_at: datetime | None
    claims: Mapping[str, Any] = field(repr=False)
    key_id: str
    algorithm: str

    @classmethod
    def _from(cls, token: str, parsed: _Parsed) -> JwtSvid:
        """Build from a parsed token."""
        return cls(
            token=token,
            spiffe_id=parsed.spiffe_id,
            audience=parsed.audience,
            expires_at=parsed.expires_at,
            issued_at=parsed.issued_at,
            claims=MappingProxyType(parsed.claims),
            key_id=parsed.key_id,
            algorithm=parsed.algorithm,
        )

    @property
    def issuer(self) -> str | None:
        """The ``iss`` claim, or None (the JWT-SVID standard makes it optional)."""
        iss = self.claims.get("iss")
        return iss if isinstance(iss, str) else None

    @property
    def jwt_id(self) -> str | None:
        """The ``jti`` claim (unique per token Credo signs), or None."""
        jti = self.claims.get("jti")
        return jti if isinstance(jti, str) else None

    @classmethod
    def parse_and_validate(
        cls,
        token: str,
        bundles: JwtBundle | BundleSet,
        audience: Sequence[str],
        *,
        now: datetime | None = None,
        leeway: timedelta = DEFAULT_LEEWAY,
        issuer: str | None = None,
        revoked: Container[str] | None = None,
    ) -> JwtSvid:
        """Parse ``token``, verify its signature with the bundle of its trust domain, and check it.

        ``audience`` lists the audiences this validator accepts; the token must name at
        least one. Tokens with and without ``iss`` are accepted unless ``issuer`` is given:
        then ``iss`` must be exactly ``issuer`` (:class:`credo.errors.JwtIssuerMismatch`).
        ``revoked`` is a revocation source: any container of revoked ``jti`` values, e.g. a
        :class:`credo.revocation.JwtRevocationList` the server signed
        (:class:`credo.errors.JwtSvidRevoked`).
        Raises a :class:`credo.JwtSvidError` subclass naming the broken rule.
        """
        expected = _expected_audience(audience)
        parsed = _parse(token, require_kid=True)
        td = parsed.spiffe_id.trust_domain
        if isinstance(bundles, JwtBundle):
            if bundles.trust_domain != td:
                raise UntrustedJwtSvid(
                    f"no JWT bundle for trust domain {td}; the given bundle is for "
                    f"{bundles.trust_domain}"
                )
            bundle = bundles
        else:
            found = bundles.get_jwt_bundle_for_trust_domain(td)
            if found is None:
                raise UntrustedJwtSvid(f"no JWT bundle for trust domain {td}")
            bundle = found
        key = bundle.get_key(parsed.key_id)
        if key is None:
            raise UnknownJwtKey(
                f"key ID {parsed.key_id[:64]!r} is not in the JWT bundle for trust domain {td}"
            )
        _verify_signature(parsed, key)
        _check_time_and_audience(parsed, expected, _now(now), leeway)
        _check_issuer(parsed, issuer)
        if revoked is not None:
            jti = parsed.claims.get("jti")
            if isinstance(jti, str) and jti in revoked:
                raise JwtSvidRevoked(f"jti {jti[:64]!r} has been revoked")
        return cls._from(token, parsed)

    @classmethod
    def parse_insecure(
        cls,
        token: str,
        audience: Sequence[str],
        *,
        now: datetime | None = None,
        leeway: timedelta = DEFAULT_LEEWAY,
        issuer: str | None = None,
    ) -> JwtSvid:
        """Parse and check ``token`` like :meth:`parse_and_validate`, but skip the signature.

        Only for tokens whose signature was already checked (e.g. by the Workload API).
        """
        expected = _expected_audience(audience)
        parsed = _parse(token, require_kid=False)
        _check_time_and_audience(parsed, expected, _now(now), leeway)
        _check_issuer(parsed, issuer)
        return cls._from(token, parsed)
