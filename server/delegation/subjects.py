"""People's tokens: verifying an ID token or JWT access token from a trusted issuer.

Keys come from the issuer's ``jwks_file`` (re-read when it changes), its ``jwks_url``, or
OIDC discovery (``<issuer>/.well-known/openid-configuration`` -> ``jwks_uri``). Fetched key
sets are kept for five minutes; an unknown ``kid`` triggers one refetch at most every 30 s.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt

from server.delegation.config import SubjectIssuerConfig
from server.delegation.errors import InvalidGrant, InvalidRequest

__all__ = [
    "SubjectIssuer",
    "SubjectIssuers",
    "VerifiedSubject",
    "check_times",
    "unverified_claims",
]

log = logging.getLogger(__name__)

_CACHE_SECONDS = 300.0
_REFETCH_SECONDS = 30.0
_FETCH_TIMEOUT = 5.0
_MAX_JWKS_BYTES = 512 * 1024
_MAX_REMEMBERED = 4096


@dataclass(frozen=True)
class VerifiedSubject:
    """A person's token that passed verification: its issuer's name and its claims."""

    issuer_name: str
    claims: Mapping[str, Any]

    @property
    def sub(self) -> str:
        return str(self.claims["sub"])


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a JWS compact token, unverified (to route it); InvalidRequest if not one."""
    return dict(_unverified_claims(token))


@functools.lru_cache(maxsize=256)
def _unverified_claims(token: str) -> Mapping[str, Any]:
    """The parse of :func:`unverified_claims`, remembered (an agent sends the same person's
    token with each exchange; parsing is a pure function of the token)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise InvalidRequest("subject_token is not a JWT (JWS compact serialization)") from None
    if not isinstance(claims, dict):
        raise InvalidRequest("subject_token claims are not a JSON object")
    return MappingProxyType(claims)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidGrant(f"{name} must be a number of seconds")
    return float(value)


def check_times(claims: Mapping[str, Any], now: float, leeway: float, what: str) -> None:
    """``exp`` in the future and ``nbf``/``iat`` not, within ``leeway``; InvalidGrant if not."""
    exp = _number(claims, "exp")
    if exp is None:
        raise InvalidGrant(f"{what} has no 'exp' claim")
    if exp <= now - leeway:
        raise InvalidGrant(f"{what} has expired")
    for name in ("nbf", "iat"):
        value = _number(claims, name)
        if value is not None and value > now + leeway:
            raise InvalidGrant(f"{what} is not valid yet ({name} is in the future)")


def _fetch_json(url: str, context: ssl.SSLContext | None) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=_FETCH_TIMEOUT, context=context) as response:
        body = response.read(_MAX_JWKS_BYTES + 1)
    if len(body) > _MAX_JWKS_BYTES:
        raise ValueError(f"{url}: response larger than {_MAX_JWKS_BYTES} bytes")
    return json.loads(body)


class SubjectIssuer:
    """One trusted identity provider: verifies its tokens with its current keys."""

    def __init__(
        self, name: str, config: SubjectIssuerConfig, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: jwt.PyJWKSet | None = None
        self._fetched_at = 0.0
        self._file_stamp: tuple[int, int] | None = None
        # The last keys _load returned and when (monotonic): re-checked at most every second.
        self._recent: tuple[jwt.PyJWKSet | None, float] = (None, 0.0)
        # sha256(token) -> (kid, the key that verified it, its claims): a token verified
        # once is not verified again while that key is still the issuer's key for its kid.
        self._verified: dict[bytes, tuple[str | None, jwt.PyJWK, Mapping[str, Any]]] = {}
        self._context: ssl.SSLContext | None = None
        if config.ca_file is not None:
            self._context = ssl.create_default_context(cafile=str(config.ca_file))

    def _jwks_url(self) -> str:
        if self.config.jwks_url:
            return self.config.jwks_url
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = _fetch_json(url, self._context)
        jwks_uri = doc.get("jwks_uri") if isinstance(doc, dict) else None
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise ValueError(f"{url}: no https jwks_uri in the discovery document")
        return jwks_uri

    def _load(self, *, force: bool) -> jwt.PyJWKSet:
        now = self._clock()
        path = self.config.jwks_file
        if path is not None:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if self._keys is None or stamp != self._file_stamp:
                self._keys = jwt.PyJWKSet.from_json(path.read_text())
                self._file_stamp = stamp
            return self._keys
        fresh = now - self._fetched_at < (_REFETCH_SECONDS if force else _CACHE_SECONDS)
        if self._keys is not None and fresh:
            return self._keys
        self._keys = jwt.PyJWKSet.from_dict(_fetch_json(self._jwks_url(), self._context))
        self._fetched_at = now
        return self._keys

    def _recent_keys(self) -> jwt.PyJWKSet | None:
        """The keys loaded less than a second ago, without the lock or a file stat."""
        keys, checked_at = self._recent
        return keys if keys is not None and time.monotonic() - checked_at < 1.0 else None

    def _key_for(self, kid: str | None) -> jwt.PyJWK:
        for force in (False, True):
            recent = None if force else self._recent_keys()
            if recent is not None:
                keys = recent
            else:
                with self._lock:
                    try:
                        keys = self._load(force=force)
                        self._recent = (keys, time.monotonic())
                    except (OSError, ValueError, jwt.PyJWTError) as exc:
                        log.warning(
                            "cannot load subject issuer keys",
                            extra={"issuer": self.name, "error": str(exc)[:200]},
                        )
                        raise InvalidGrant(
                            f"the keys of subject issuer {self.name!r} cannot be loaded right now"
                        ) from None
            candidates = [k for k in keys.keys if kid is None or k.key_id == kid]
            if len(candidates) == 1 or (candidates and kid is not None):
                return candidates[0]
        raise InvalidGrant(
            f"subject_token is signed with key {kid!r}, which issuer {self.name!r} does not publish"
        )

    def verify(self, token: str) -> VerifiedSubject:
        """Verify signature, ``iss``, ``aud``, ``exp``/``nbf``/``iat``; InvalidGrant if not.

        The signature, ``iss`` and ``aud`` checks of a token are remembered for as long as
        the key that verified it is the one the issuer publishes for its ``kid`` (a changed
        or removed key verifies it again, or refuses it); its times are checked on every
        call, against this server's clock."""
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._verified.get(digest)
        if hit is not None and self._key_for(hit[0]) is hit[1]:
            claims = hit[2]
        else:
            claims = self._verify_signed(token, digest)
        check_times(claims, self._clock(), self.config.clock_skew, "subject_token")
        return VerifiedSubject(self.name, claims)

    def _verify_signed(self, token: str, digest: bytes) -> Mapping[str, Any]:
        """Everything :meth:`verify` checks but the times; the result remembered."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidRequest("subject_token is not a JWT") from None
        alg = header.get("alg")
        if alg not in self.config.algorithms:
            raise InvalidGrant(
                f"subject_token alg {alg!r} is not allowed for issuer {self.name!r} "
                f"(allowed: {', '.join(self.config.algorithms)})"
            )
        kid = header.get("kid")
        key = self._key_for(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(self.config.algorithms),
                audience=list(self.config.audience),
                issuer=self.config.issuer,
                options={
                    "require": ["exp", "sub", "iss", "aud"],
                    # Times are checked by verify, against this server's clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise InvalidGrant(
                f"subject_token audience is not one of {', '.join(self.config.audience)}"
            ) from None
        except jwt.InvalidIssuerError:
            raise InvalidGrant(f"subject_token issuer is not {self.config.issuer}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidGrant(f"subject_token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise InvalidGrant(f"subject_token was refused: {exc}") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise InvalidGrant("subject_token 'sub' must be a non-empty string")
        frozen = MappingProxyType(claims)
        if len(self._verified) >= _MAX_REMEMBERED:
            self._verified.clear()
        self._verified[digest] = (kid, key, frozen)
        return frozen


class SubjectIssuers:
    """Every configured subject issuer, looked up by its ``iss``."""

    def __init__(self, issuers: Mapping[str, SubjectIssuer]) -> None:
        self._by_name = dict(issuers)
        self._by_iss = {i.config.issuer: i for i in issuers.values()}

    @classmethod
    def from_config(
        cls, configs: Mapping[str, SubjectIssuerConfig], *, clock: Callable[[], float] = time.time
    ) -> SubjectIssuers:
        return cls({name: SubjectIssuer(name, c, clock=clock) for name, c in configs.items()})

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def by_name(self, name: str) -> SubjectIssuer | None:
        return self._by_name.get(name)

    def for_iss(self, iss: object) -> SubjectIssuer:
        issuer = self._by_iss.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidGrant(
                f"subject_token issuer {str(iss)[:200]!r} is not a trusted subject issuer"
            )
        return issuer
