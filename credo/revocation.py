"""Revocation lists a resource server can check JWT-SVIDs against without a round trip.

The signing server serves a signed list of every revoked, unexpired JWT-SVID ``jti`` of
its trust domain at ``GET /jwt-revocations`` on its HTTP front end. The list is itself a
JWT signed with the trust domain's JWT key (so the JWT bundle a verifier already has
checks it): ``sub`` is the trust domain's ID, ``aud`` is
:data:`REVOCATION_LIST_AUDIENCE`, ``exp`` a minute ahead, and the claim ``revoked`` holds
``[{"jti": ..., "exp": ...}, ...]``. A verifier polls it (well within its ``exp``) and
passes it to :meth:`credo.JwtSvid.parse_and_validate` as ``revoked=``::

    revoked = JwtRevocationList.fetch("https://credo.example.org/jwt-revocations", bundles)
    svid = JwtSvid.parse_and_validate(token, bundles, ["my-api"], revoked=revoked)

The list also holds the revoked delegated access tokens (token exchange). A long-running
resource server keeps a :class:`PolledRevocationList`, which re-fetches the list when it is
older than its interval (never per request), and passes it to
:func:`credo.verify_access_token` as ``revoked=``.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from credo.bundle import BundleSet, JwtBundle
from credo.errors import InvalidJwtSvid, JwtSvidError
from credo.jwtsvid import JwtSvid

__all__ = [
    "REVOCATION_LIST_AUDIENCE",
    "REVOCATION_LIST_PATH",
    "IntrospectionRevocation",
    "JwtRevocationList",
    "PolledRevocationList",
]

REVOCATION_LIST_AUDIENCE: Final = "credo-jwt-revocation-list"
"""The ``aud`` of a signed JWT revocation list (no JWT-SVID is issued for it)."""
REVOCATION_LIST_PATH: Final = "/jwt-revocations"
"""Where the server's HTTP front end serves the list."""
_MAX_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class JwtRevocationList:
    """The revoked ``jti`` values of one trust domain, as of ``issued_at``; usable (as the
    ``revoked=`` container of ``parse_and_validate``) until ``expires_at``."""

    trust_domain: str
    revoked: frozenset[str]
    issued_at: datetime
    expires_at: datetime

    def __contains__(self, jti: object) -> bool:
        return jti in self.revoked

    @classmethod
    def parse(
        cls, token: str, bundles: JwtBundle | BundleSet, *, now: datetime | None = None
    ) -> JwtRevocationList:
        """Verify a signed list with the trust domain's JWT bundle; raise a JwtSvidError."""
        signed = JwtSvid.parse_and_validate(token, bundles, [REVOCATION_LIST_AUDIENCE], now=now)
        if signed.spiffe_id.path:
            raise InvalidJwtSvid("a revocation list is signed for the trust domain's own ID")
        items = signed.claims.get("revoked")
        if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("jti"), str) for i in items
        ):
            raise InvalidJwtSvid("'revoked' must be a list of {'jti': ..., 'exp': ...}")
        return cls(
            trust_domain=signed.spiffe_id.trust_domain.name,
            revoked=frozenset(i["jti"] for i in items),
            issued_at=signed.issued_at or datetime.fromtimestamp(0, UTC),
            expires_at=signed.expires_at,
        )

    @classmethod
    def fetch(
        cls,
        url: str,
        bundles: JwtBundle | BundleSet,
        *,
        context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> JwtRevocationList:
        """GET the signed list at ``url`` and verify it (``OSError`` if unreachable)."""
        with urllib.request.urlopen(url, context=context, timeout=timeout) as response:
            body = response.read(_MAX_BYTES + 1)
        if len(body) > _MAX_BYTES:
            raise InvalidJwtSvid("revocation list is too large")
        return cls.parse(body.decode("ascii", "replace").strip(), bundles)


class PolledRevocationList:
    """The signed list at ``url``, re-fetched on use once older than ``interval`` seconds.

    ``jti in polled`` answers from the last verified list; a refresh that fails keeps the
    last list while it is unexpired and raises (``OSError`` or a JwtSvidError) after that:
    a resource server never accepts tokens against a stale list.
    """

    def __init__(
        self,
        url: str,
        bundles: JwtBundle | BundleSet,
        *,
        interval: float = 15.0,
        context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._bundles = bundles
        self._interval = interval
        self._context = context
        self._clock = clock
        self._lock = threading.Lock()
        self._list: JwtRevocationList | None = None
        self._fetched_at = 0.0

    def current(self) -> JwtRevocationList:
        """The list, fetched first when older than the interval."""
        now = self._clock()
        with self._lock:
            held, fetched_at = self._list, self._fetched_at
        if held is not None and now - fetched_at < self._interval:
            return held
        try:
            fresh = JwtRevocationList.fetch(self._url, self._bundles, context=self._context)
        except (OSError, JwtSvidError):
            if held is not None and held.expires_at.timestamp() > now:
                return held
            raise
        with self._lock:
            self._list, self._fetched_at = fresh, now
        return fresh

    def __contains__(self, jti: object) -> bool:
        return jti in self.current()


class IntrospectionRevocation:
    """A revocation source that asks the server: RFC 7662 introspection per token.

    ``client_assertion`` returns a JWT-SVID of a SPIFFE ID listed in the server's
    ``introspection_allowed`` (audience: the token endpoint), e.g. fetched from the
    Workload API. A token the server answers ``active: false`` for is revoked (the caller
    has already checked its signature and times). One round trip per check: prefer
    :class:`PolledRevocationList` where that matters. A failed request raises ``OSError``.
    """

    def __init__(
        self,
        introspection_endpoint: str,
        client_assertion: Callable[[], str],
        *,
        context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._endpoint = introspection_endpoint
        self._assertion = client_assertion
        self._context = context
        self._timeout = timeout

    def is_revoked(self, token: str, jti: str) -> bool:
        """True when the server no longer considers ``token`` active."""
        body = urllib.parse.urlencode(
            {
                "token": token,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe",
                "client_assertion": self._assertion(),
            }
        ).encode()
        request = urllib.request.Request(
            self._endpoint,
            data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        with urllib.request.urlopen(request, context=self._context, timeout=self._timeout) as r:
            answer = json.loads(r.read(_MAX_BYTES + 1))
        if not isinstance(answer, dict):
            raise OSError("introspection answered something other than a JSON object")
        return answer.get("active") is not True or answer.get("jti", jti) != jti
