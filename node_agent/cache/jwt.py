"""Cached JWT-SVIDs, per (SPIFFE ID, audiences), reused until about half their lifetime.

Concurrent requests for the same key wait for one server call (a lock per key, removed
when unused). Audiences are chosen by workloads, so the cache is bounded: expired tokens
go first, then the least recently used. A token whose signing key is tainted or left the
bundle (revoked), or whose entry is gone, is dropped at once; while the server cannot be
reached a cached token is served until shortly before it expires.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from credo._renewal import renew_at
from node_agent.cache.errors import JwtSvidUnavailable
from node_agent.server_client import IssuedJwtSvid
from node_agent.workload_api.manager import Identity

__all__ = ["JwtSvidCache"]

log = logging.getLogger(__name__)

_Key = tuple[str, tuple[str, ...]]
_STALE_GRACE = 5.0
"""A cached token is served while the server is unreachable until this long before expiry."""


@dataclass
class _CachedJwt:
    token: str
    refresh_at: float
    expires_at: float


def _jwt_id(token: str) -> str:
    """The ``jti`` claim of ``token`` (not verified), or "" if it has none."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        jti = claims.get("jti", "") if isinstance(claims, dict) else ""
    except (IndexError, ValueError):
        return ""
    return jti if isinstance(jti, str) else ""


def _jwt_kid(token: str) -> str:
    """The ``kid`` header of ``token`` (not verified), or "" if it has none."""
    try:
        head = token.split(".", 1)[0]
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        kid = header.get("kid", "") if isinstance(header, dict) else ""
    except ValueError:
        return ""
    return kid if isinstance(kid, str) else ""


class JwtSvidCache:
    """JWT-SVIDs by (SPIFFE ID, sorted audiences); ``fetch`` asks the server for a new one."""

    def __init__(
        self,
        fetch: Callable[[Identity, tuple[str, ...]], Awaitable[IssuedJwtSvid]],
        max_size: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self.max_size = max_size
        self._clock = clock
        self._tokens: OrderedDict[_Key, _CachedJwt] = OrderedDict()
        # Per-key lock and the number of callers using it; removed when unused.
        self._locks: dict[_Key, tuple[asyncio.Lock, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def in_flight(self) -> int:
        """Keys some caller is fetching or waiting for right now."""
        return len(self._locks)

    async def get(self, identity: Identity, audience: tuple[str, ...]) -> str:
        """A JWT-SVID for ``identity`` and ``audience``: cached, or fetched and cached."""
        key = (str(identity.spiffe_id), tuple(sorted(set(audience))))
        slot = self._locks.get(key)
        if slot is None:
            slot = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = slot
        users[0] += 1
        try:
            async with lock:
                cached = self._tokens.get(key)
                if cached is not None and self._clock() < cached.refresh_at:
                    self._tokens.move_to_end(key)
                    return cached.token
                try:
                    issued = await self._fetch(identity, audience)
                except JwtSvidUnavailable:
                    if cached is not None and self._clock() < cached.expires_at - _STALE_GRACE:
                        log.warning(
                            "server unreachable; serving cached JWT-SVID",
                            extra={"spiffe_id": key[0]},
                        )
                        return cached.token
                    raise
                refresh = renew_at(issued.issued_at, issued.expires_at, received_at=self._clock())
                self._tokens[key] = _CachedJwt(issued.token, refresh, issued.expires_at)
                self._tokens.move_to_end(key)
                self._trim()
                return issued.token
        finally:
            users[0] -= 1
            if users[0] == 0 and self._locks.get(key) is slot:
                del self._locks[key]

    def _trim(self) -> None:
        """Drop expired JWT-SVIDs, then the least recently used beyond the size limit."""
        now = self._clock()
        for key in [k for k, c in self._tokens.items() if c.expires_at <= now]:
            del self._tokens[key]
        while len(self._tokens) > max(self.max_size, 0):
            self._tokens.popitem(last=False)

    def retain(self, spiffe_ids: Collection[str]) -> None:
        """Drop the tokens of every SPIFFE ID not in ``spiffe_ids`` (their entries are gone)."""
        for key in [k for k in self._tokens if k[0] not in spiffe_ids]:
            del self._tokens[key]

    def drop_revoked(self, jtis: Collection[str]) -> None:
        """Drop tokens whose ``jti`` was revoked: the next fetch mints a new one."""
        if not jtis:
            return
        revoked = [k for k, c in self._tokens.items() if _jwt_id(c.token) in jtis]
        for key in revoked:
            del self._tokens[key]
        if revoked:
            log.warning("dropped revoked JWT-SVIDs", extra={"svids": len(revoked)})

    def drop_untrusted(self, key_ids: Collection[str], tainted: Collection[str]) -> None:
        """Drop tokens signed by a key not in ``key_ids`` (revoked) or in ``tainted``: the
        next fetch mints one with the active key."""
        stale = [
            k
            for k, c in self._tokens.items()
            if _jwt_kid(c.token) not in key_ids or _jwt_kid(c.token) in tainted
        ]
        for key in stale:
            del self._tokens[key]
        if stale:
            log.warning(
                "dropped JWT-SVIDs of a tainted or revoked key", extra={"svids": len(stale)}
            )
