"""Checking a delegated access token in a resource server: :func:`verify_access_token`.

Credo's token endpoint issues RFC 9068 JWT access tokens (``typ: at+jwt``) whose ``sub`` is
the person and whose ``act`` is the agent acting for them, earlier agents nested inside
(RFC 8693 4.1). A resource server checks one with::

    token = credo.verify_access_token(
        bearer, issuer="https://credo.example.com:8443", audience="https://git.example.com",
        required_scopes=["repo:read"],
    )
    token.subject     # "alice"            (the person)
    token.actors      # ("spiffe://example.org/agents/reviewer", "spiffe://.../coder")
    token.scopes      # frozenset({"repo:read"})
    token.owner       # "alice@example.com" (credo_owner: who answers for the agent)

Keys are found by discovery (``<issuer>/.well-known/oauth-authorization-server`` ->
``jwks_uri``) and cached for five minutes per issuer; a token signed by a key not in the
cache triggers one refetch (at most every 30 s). Every refusal raises a specific
:class:`credo.errors.AccessTokenError`.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from credo.errors import (
    AccessTokenAudienceMismatch,
    AccessTokenExpired,
    AccessTokenKeysUnavailable,
    InsufficientScope,
    InvalidAccessToken,
    UntrustedAccessToken,
)

__all__ = ["AccessToken", "verify_access_token"]

_CACHE_SECONDS = 300.0
_REFETCH_SECONDS = 30.0
_TIMEOUT = 5.0
_MAX_BYTES = 512 * 1024
_ALGORITHMS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]


@dataclass(frozen=True)
class AccessToken:
    """A verified delegated access token.

    ``actors`` is the actor chain newest first: ``actors[0]`` is the agent that presented
    the token (``client_id``), the last one the agent the person first delegated to.
    """

    subject: str
    actors: tuple[str, ...]
    scopes: frozenset[str]
    owner: str
    client_id: str
    audience: str
    expires_at: int
    jti: str
    claims: Mapping[str, Any] = field(repr=False)


@dataclass
class _Keys:
    keys: dict[str, jwt.PyJWK]
    fetched_at: float


_cache: dict[str, _Keys] = {}
_lock = threading.Lock()


def _get_json(url: str, context: ssl.SSLContext | None) -> Any:
    if not url.startswith(("https://", "http://")):
        raise AccessTokenKeysUnavailable(f"{url[:200]!r} is not an http(s) URL")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT, context=context) as response:
            body = response.read(_MAX_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise AccessTokenKeysUnavailable(f"cannot fetch {url}: {exc}") from None
    if len(body) > _MAX_BYTES:
        raise AccessTokenKeysUnavailable(f"{url}: response larger than {_MAX_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise AccessTokenKeysUnavailable(f"{url}: response is not JSON") from None


def _fetch_keys(issuer: str, context: ssl.SSLContext | None) -> dict[str, jwt.PyJWK]:
    metadata = _get_json(issuer.rstrip("/") + "/.well-known/oauth-authorization-server", context)
    if not isinstance(metadata, dict) or metadata.get("issuer") != issuer:
        raise AccessTokenKeysUnavailable(f"the metadata of {issuer} does not name it as issuer")
    jwks_uri = metadata.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        raise AccessTokenKeysUnavailable(f"the metadata of {issuer} has no jwks_uri")
    doc = _get_json(jwks_uri, context)
    try:
        keys = jwt.PyJWKSet.from_dict(doc).keys
    except jwt.PyJWTError as exc:
        raise AccessTokenKeysUnavailable(f"{jwks_uri}: not a usable JWKS: {exc}") from None
    return {k.key_id: k for k in keys if k.key_id}


def _key(issuer: str, kid: str, context: ssl.SSLContext | None) -> jwt.PyJWK:
    now = time.monotonic()
    with _lock:
        cached = _cache.get(issuer)
    if cached is not None and now - cached.fetched_at < _CACHE_SECONDS and kid in cached.keys:
        return cached.keys[kid]
    if cached is None or now - cached.fetched_at >= _REFETCH_SECONDS:
        cached = _Keys(_fetch_keys(issuer, context), now)
        with _lock:
            _cache[issuer] = cached
    found = cached.keys.get(kid)
    if found is None:
        raise UntrustedAccessToken(f"key {kid[:64]!r} is not published by {issuer}")
    return found


def _actors(act: Any) -> tuple[str, ...]:
    out: list[str] = []
    while isinstance(act, Mapping) and len(out) < 64:
        sub = act.get("sub")
        if not isinstance(sub, str):
            raise InvalidAccessToken("act must nest objects with a string sub")
        out.append(sub)
        act = act.get("act")
    return tuple(out)


def verify_access_token(
    token: str,
    *,
    issuer: str,
    audience: str,
    required_scopes: Iterable[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    leeway: float = 30.0,
    now: float | None = None,
) -> AccessToken:
    """Verify ``token`` (signature, ``typ``, ``iss``, ``aud``, times, scopes) and return it.

    ``ssl_context`` is used for discovery (for a server presenting a certificate from its
    own CA, a context trusting the SPIFFE bundle). Raises a specific
    :class:`~credo.errors.AccessTokenError`, or :class:`AccessTokenKeysUnavailable` when the
    issuer's keys cannot be fetched.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidAccessToken("not a JWT (JWS compact serialization)") from None
    if header.get("typ") != "at+jwt":
        raise InvalidAccessToken(f"typ is {header.get('typ')!r}; expected 'at+jwt' (RFC 9068)")
    if header.get("alg") not in _ALGORITHMS:
        raise InvalidAccessToken(f"alg {header.get('alg')!r} is not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidAccessToken("the header has no kid")
    key = _key(issuer, kid, ssl_context)
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[str(header["alg"])],
            options={
                "verify_aud": False,
                "verify_iss": False,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise UntrustedAccessToken("the signature does not verify") from None
    except jwt.PyJWTError as exc:
        raise InvalidAccessToken(str(exc)) from None
    if claims.get("iss") != issuer:
        raise InvalidAccessToken(f"iss is {str(claims.get('iss'))[:200]!r}; expected {issuer}")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if audience not in audiences:
        raise AccessTokenAudienceMismatch(f"aud {aud!r} does not name {audience}")
    current = time.time() if now is None else now
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise InvalidAccessToken("exp is missing or not a number")
    if exp <= current - leeway:
        raise AccessTokenExpired("exp is in the past")
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if isinstance(value, int | float) and value > current + leeway:
            raise AccessTokenExpired(f"{name} is in the future")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidAccessToken("sub is missing")
    actors = _actors(claims.get("act"))
    if not actors:
        raise InvalidAccessToken("act is missing: not a delegated token")
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise InvalidAccessToken("scope must be a space-separated string")
    scopes = frozenset(scope.split())
    missing = sorted(set(required_scopes) - scopes)
    if missing:
        raise InsufficientScope(missing)
    client_id = claims.get("client_id")
    if client_id != actors[0]:
        raise InvalidAccessToken("client_id is not the newest actor")
    return AccessToken(
        subject=sub,
        actors=actors,
        scopes=scopes,
        owner=str(claims.get("credo_owner", "")),
        client_id=str(client_id),
        audience=audience,
        expires_at=int(exp),
        jti=str(claims.get("jti", "")),
        claims=claims,
    )
