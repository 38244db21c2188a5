"""Workload Proof Tokens (WIMSE draft-ietf-wimse-wpt): proof of possession for a WIT-SVID.

A WIT-SVID is never a bearer token: a workload that presents one also presents a Workload
Proof Token (WPT), a short-lived JWT signed with the private key bound in the WIT's
``cnf.jwk``. Over HTTP the two travel in the ``Workload-Identity-Token`` and
``Workload-Proof-Token`` request headers (:data:`WIT_HEADER`, :data:`WPT_HEADER`).

* header: ``typ`` = ``wpt+jwt``; ``alg`` = the WIT's ``cnf.jwk.alg``;
* claims: ``aud`` (the target, e.g. the request URI), ``exp`` (seconds away), ``jti``
  (unique), ``wth`` (SHA-256 hash of the WIT), and ``ath`` / ``tth`` (hashes of the OAuth
  access token / Transaction Token) when those tokens travel with the request, ``oth``
  (hashes of other tokens by name).

:func:`create_wpt` makes one; :func:`verify_wpt` checks one against an already validated
WIT and raises :class:`credo.InvalidWorkloadProof` for each broken rule;
:func:`verify_request` does both from the request headers. Replay protection beyond
``exp`` (refusing a ``jti`` seen before) is the recipient's choice: the ``jti`` is returned.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError

from credo.bundle import BundleSet, WitBundle
from credo.errors import InvalidWitSvid, InvalidWorkloadProof
from credo.keys import PrivateKey
from credo.witsvid import (
    DEFAULT_LEEWAY,
    WitSvid,
    _jose_key,
    algorithm_fits_key,
    public_key_jwk,
    split_compact,
    token_hash,
)

__all__ = [
    "DEFAULT_WPT_TTL",
    "WIT_HEADER",
    "WPT_HEADER",
    "WPT_TYPE",
    "WorkloadProof",
    "create_wpt",
    "verify_request",
    "verify_wpt",
]

WPT_TYPE = "wpt+jwt"
"""The ``typ`` header of every Workload Proof Token."""

WIT_HEADER = "Workload-Identity-Token"
"""The HTTP request header that carries the WIT-SVID."""

WPT_HEADER = "Workload-Proof-Token"
"""The HTTP request header that carries the Workload Proof Token."""

DEFAULT_WPT_TTL = timedelta(seconds=30)
"""Proof lifetime when neither ``expires_at`` nor ``ttl`` is given: seconds, not minutes."""

_RESERVED = ("aud", "exp", "iat", "jti", "wth", "ath", "tth", "oth")


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def create_wpt(
    wit: str | WitSvid,
    key: PrivateKey,
    audience: str,
    *,
    ttl: timedelta | None = None,
    expires_at: datetime | None = None,
    access_token: str | None = None,
    txn_token: str | None = None,
    other_tokens: Mapping[str, str] | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    jti: str | None = None,
    now: datetime | None = None,
) -> str:
    """A Workload Proof Token for ``wit``, signed with ``key`` (the WIT's ``cnf`` key).

    ``audience`` is the recipient (e.g. the request's URI). ``access_token`` and
    ``txn_token`` add ``ath`` / ``tth``; ``other_tokens`` (name -> token) adds ``oth``.
    Raises ValueError when ``key`` is not the key the WIT binds.
    """
    parsed = wit if isinstance(wit, WitSvid) else WitSvid.parse_insecure(wit)
    if public_key_jwk(key, parsed.public_key_alg) != public_key_jwk(
        parsed.public_key, parsed.public_key_alg
    ):
        raise ValueError("key is not the key bound in the WIT-SVID's cnf claim")
    if not isinstance(audience, str) or not audience:
        raise ValueError("audience must be a non-empty string")
    issued = _now(now)
    if expires_at is None:
        expires_at = issued + (ttl if ttl is not None else DEFAULT_WPT_TTL)
    elif ttl is not None:
        raise ValueError("give expires_at or ttl, not both")
    if expires_at <= issued:
        raise ValueError("expires_at must be after the issue time")
    claims: dict[str, Any] = {}
    if extra_claims:
        clash = sorted(set(extra_claims) & set(_RESERVED))
        if clash:
            raise ValueError(f"extra_claims may not set {', '.join(clash)}")
        claims.update(extra_claims)
    claims.update(
        aud=audience,
        exp=math.floor(expires_at.timestamp()),
        iat=math.floor(issued.timestamp()),
        jti=jti or secrets.token_urlsafe(24),
        wth=parsed.wth,
    )
    if access_token is not None:
        claims["ath"] = token_hash(access_token)
    if txn_token is not None:
        claims["tth"] = token_hash(txn_token)
    if other_tokens:
        claims["oth"] = {name: token_hash(token) for name, token in other_tokens.items()}
    header = {"alg": parsed.public_key_alg, "typ": WPT_TYPE}
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return jws.serialize_compact(header, payload, _jose_key(key), algorithms=[header["alg"]])


@dataclass(frozen=True)
class WorkloadProof:
    """A verified WIT-SVID and the proof that came with it."""

    wit: WitSvid
    audience: str
    expires_at: datetime
    jti: str
    claims: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE ID of the workload that made the request."""
        return str(self.wit.spiffe_id)


def _check_hash(claims: Mapping[str, Any], name: str, token: str | None, what: str) -> None:
    value = claims.get(name)
    if token is None:
        if value is not None:
            raise InvalidWorkloadProof(f"claim {name!r} is set but no {what} came with the proof")
        return
    if value is None:
        raise InvalidWorkloadProof(f"claim {name!r} is missing; the request carries a {what}")
    if not isinstance(value, str) or not secrets.compare_digest(value, token_hash(token)):
        raise InvalidWorkloadProof(f"claim {name!r} does not match the {what} of the request")


def verify_wpt(
    wpt: str,
    wit: WitSvid,
    audience: str,
    *,
    access_token: str | None = None,
    txn_token: str | None = None,
    other_tokens: Mapping[str, str] | None = None,
    now: datetime | None = None,
    leeway: timedelta = DEFAULT_LEEWAY,
) -> WorkloadProof:
    """Check ``wpt`` as the proof for ``wit`` (already validated) at ``audience``.

    Checks ``typ``, that ``alg`` is the WIT's ``cnf.jwk.alg``, the signature with the
    ``cnf`` key, ``aud``, ``exp``, ``jti``, ``wth``, and ``ath`` / ``tth`` / ``oth`` against
    the tokens that travel with the request (a hash claim for a token that is not there, or
    a missing one for a token that is, is refused).
    """
    header, claims = split_compact(wpt, InvalidWorkloadProof)
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() != WPT_TYPE:
        raise InvalidWorkloadProof(f"header 'typ' is {typ!r}; expected {WPT_TYPE!r}")
    alg = header.get("alg")
    if alg != wit.public_key_alg:
        raise InvalidWorkloadProof(
            f"header 'alg' is {alg!r}; expected the WIT's cnf.jwk.alg {wit.public_key_alg!r}"
        )
    if "crit" in header:
        raise InvalidWorkloadProof("header 'crit' is not supported")
    if not algorithm_fits_key(alg, wit.public_key):
        raise InvalidWorkloadProof(f"alg {alg} does not fit the WIT's cnf key")
    try:
        jws.deserialize_compact(wpt, _jose_key(wit.public_key), algorithms=[alg])
    except (JoseError, ValueError):
        raise InvalidWorkloadProof("signature does not verify with the WIT's cnf key") from None
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if audience not in audiences:
        raise InvalidWorkloadProof(f"claim 'aud' is {aud!r}; expected {audience!r}")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise InvalidWorkloadProof("claim 'exp' is missing or not a NumericDate")
    expires_at = datetime.fromtimestamp(exp, UTC)
    moment = _now(now)
    if expires_at <= moment - leeway:
        raise InvalidWorkloadProof(f"proof expired at {expires_at.isoformat()}")
    if wit.expires_at <= moment - leeway:
        raise InvalidWorkloadProof(f"the WIT-SVID expired at {wit.expires_at.isoformat()}")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise InvalidWorkloadProof("claim 'jti' is missing; expected a unique string")
    wth = claims.get("wth")
    if not isinstance(wth, str) or not secrets.compare_digest(wth, wit.wth):
        raise InvalidWorkloadProof("claim 'wth' does not match the WIT-SVID it came with")
    _check_hash(claims, "ath", access_token, "access token")
    _check_hash(claims, "tth", txn_token, "transaction token")
    oth = claims.get("oth")
    if other_tokens or oth is not None:
        if not isinstance(oth, dict) or set(oth) != set(other_tokens or {}):
            raise InvalidWorkloadProof("claim 'oth' does not name the other tokens of the request")
        for name, token in (other_tokens or {}).items():
            _check_hash(oth, name, token, f"{name} token")
    return WorkloadProof(wit, audience, expires_at, jti, MappingProxyType(claims))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value.strip()
    return None


def verify_request(
    headers: Mapping[str, str],
    audience: str,
    bundles: WitBundle | BundleSet | Mapping[Any, WitBundle],
    *,
    access_token: str | None = None,
    txn_token: str | None = None,
    other_tokens: Mapping[str, str] | None = None,
    now: datetime | None = None,
    leeway: timedelta = DEFAULT_LEEWAY,
    revoked: Container[str] | None = None,
) -> WorkloadProof:
    """Authenticate an HTTP request by its ``Workload-Identity-Token`` and
    ``Workload-Proof-Token`` headers: the WIT against ``bundles`` (and ``revoked``, a
    revocation source as :meth:`credo.WitSvid.parse_and_validate` takes), then the proof."""
    wit_text = _header(headers, WIT_HEADER)
    wpt_text = _header(headers, WPT_HEADER)
    if not wit_text:
        raise InvalidWitSvid(f"request has no {WIT_HEADER} header")
    if not wpt_text:
        raise InvalidWorkloadProof(f"request has no {WPT_HEADER} header")
    wit = WitSvid.parse_and_validate(wit_text, bundles, now=now, leeway=leeway, revoked=revoked)
    return verify_wpt(
        wpt_text,
        wit,
        audience,
        access_token=access_token,
        txn_token=txn_token,
        other_tokens=other_tokens,
        now=now,
        leeway=leeway,
    )
