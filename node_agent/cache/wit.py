"""Cached WIT-SVIDs, one per entry, each with the key pair the agent made for it.

A workload that opens ``FetchWITSVID`` gets a WIT-SVID per identity. The agent makes the
workload's key pair (ec-p256, off the event loop), sends the public keys of every identity
that has no WIT yet (or whose WIT is past its renewal time) in one ``BatchNewWITSVID`` call,
and keeps token and key until about half the WIT's lifetime (+-10% jitter, like the other
SVIDs); then the next fetch gets a new key pair and token, and the stream pushes them.

A WIT whose signing key is tainted or left the bundle (revoked), whose ``jti`` the server
lists as revoked (sync stream), or whose entry is gone, is dropped at once (the stream then
pushes a new one, unless the entry itself was revoked). While the server cannot be reached
a cached WIT is served until shortly before it expires, and the renewal is retried after a
short delay. Tokens and keys are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization

from credo._renewal import renew_at
from credo.errors import CredoError
from credo.keys import PrivateKey, generate_private_key
from credo.witsvid import WitSvid, private_key_to_jwk
from node_agent.cache.errors import WitSvidUnavailable
from node_agent.errors import ServerClientError
from node_agent.server_client import MAX_BATCH, IssuedWitSvid
from node_agent.workload_api.manager import Identity, WitIdentity

__all__ = ["WitSvidCache"]

log = logging.getLogger(__name__)

_STALE_GRACE = 5.0
"""A cached WIT is served while the server is unreachable until this long before expiry."""
_RETRY_AFTER = 5.0
"""After a failed renewal, try again this many seconds later (at most a quarter of what is left)."""

SignBatch = Callable[[Sequence[tuple[str, bytes]]], Awaitable[list[IssuedWitSvid]]]


@dataclass
class _CachedWit:
    spiffe_id: str
    token: str = field(repr=False)
    key_jwk: str = field(repr=False)
    key_id: str
    expires_at: float
    refresh_at: float
    jti: str = ""


def _keys(count: int) -> list[tuple[PrivateKey, bytes]]:
    """``count`` ec-p256 key pairs and their DER public keys (run in a worker thread)."""
    out = []
    for _ in range(count):
        key = generate_private_key()
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        out.append((key, der))
    return out


class WitSvidCache:
    """WIT-SVIDs by entry id; ``sign`` asks the server for a batch of new ones."""

    def __init__(self, sign: SignBatch, *, clock: Callable[[], float] = time.time) -> None:
        self._sign = sign
        self._clock = clock
        self._wits: dict[str, _CachedWit] = {}
        self._lock = asyncio.Lock()
        self.batch_calls = 0
        """Number of ``BatchNewWITSVID`` calls made (for tests)."""

    def __len__(self) -> int:
        return len(self._wits)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._wits

    async def get(self, identities: Sequence[Identity]) -> tuple[WitIdentity, ...]:
        """A WIT-SVID for each identity that can have one: cached, or signed now in one batch.

        Raises :class:`WitSvidUnavailable` when none of ``identities`` has a usable WIT.
        """
        async with self._lock:
            now = self._clock()
            due = [
                i
                for i in identities
                if (c := self._wits.get(i.entry_id)) is None or now >= c.refresh_at
            ]
            failure = ""
            if due:
                failure = await self._renew(due)
            now = self._clock()
            out = []
            for identity in identities:
                cached = self._wits.get(identity.entry_id)
                if cached is None or cached.expires_at - _STALE_GRACE <= now:
                    continue
                out.append(WitIdentity(identity, cached.token, cached.key_jwk, cached.refresh_at))
            if not out:
                raise WitSvidUnavailable(
                    f"no WIT-SVID could be issued: {failure or 'the server issued none'}"
                )
            return tuple(out)

    async def _renew(self, due: list[Identity]) -> str:
        """Sign new WITs for ``due``; return why some could not be signed ("" if all were)."""
        pairs = await asyncio.to_thread(_keys, len(due))
        failure = ""
        for start in range(0, len(due), MAX_BATCH):
            chunk = list(
                zip(due[start : start + MAX_BATCH], pairs[start : start + MAX_BATCH], strict=True)
            )
            self.batch_calls += 1
            try:
                results = await self._sign([(i.entry_id, der) for i, (_, der) in chunk])
            except ServerClientError as exc:
                failure = f"the server is unreachable: {exc}"
                log.warning(
                    "WIT-SVID batch signing failed",
                    extra={"entries": len(chunk), "error": str(exc)},
                )
                self._postpone(i.entry_id for i, _ in chunk)
                continue
            by_entry = {r.entry_id: r for r in results}
            issued = 0
            for identity, (key, _) in chunk:
                result = by_entry.get(identity.entry_id)
                if result is None or result.refusal or not result.token:
                    failure = result.refusal if result is not None else "no answer for the entry"
                    log.warning(
                        "WIT-SVID refused by the server",
                        extra={"spiffe_id": str(identity.spiffe_id), "reason": failure},
                    )
                    self._postpone([identity.entry_id])
                    continue
                try:
                    wit = WitSvid.parse_insecure(result.token)
                except CredoError as exc:
                    failure = f"the server returned an unusable WIT-SVID: {exc}"
                    log.error(
                        "unusable WIT-SVID from the server",
                        extra={"spiffe_id": str(identity.spiffe_id), "error": str(exc)},
                    )
                    continue
                issued_at = result.issued_at or (wit.issued_at.timestamp() if wit.issued_at else 0)
                expires_at = wit.expires_at.timestamp()
                self._wits[identity.entry_id] = _CachedWit(
                    spiffe_id=str(wit.spiffe_id),
                    token=result.token,
                    key_jwk=private_key_to_jwk(key),
                    key_id=wit.key_id,
                    expires_at=expires_at,
                    refresh_at=renew_at(issued_at, expires_at, received_at=self._clock()),
                    jti=wit.jti or "",
                )
                issued += 1
            if issued:
                log.info("WIT-SVIDs issued", extra={"entries": issued, "cached": len(self._wits)})
        return failure

    def _postpone(self, entry_ids: Iterable[str]) -> None:
        """Retry the renewal of cached WITs a little later rather than on every wake-up."""
        now = self._clock()
        for entry_id in entry_ids:
            cached = self._wits.get(entry_id)
            if cached is not None:
                left = max(0.0, cached.expires_at - now)
                cached.refresh_at = now + min(_RETRY_AFTER, left / 4)

    def next_refresh(self, entry_ids: Collection[str]) -> float | None:
        """The earliest renewal time of the cached WITs of ``entry_ids``, or None."""
        times = [self._wits[e].refresh_at for e in entry_ids if e in self._wits]
        return min(times) if times else None

    def retain(self, entry_ids: Collection[str]) -> None:
        """Drop the WITs of every entry not in ``entry_ids`` (their entries are gone)."""
        for entry_id in [e for e in self._wits if e not in entry_ids]:
            del self._wits[entry_id]

    def drop_revoked(self, jtis: Collection[str]) -> bool:
        """Drop WITs whose ``jti`` was revoked (True if any): the next fetch signs new ones."""
        if not jtis:
            return False
        revoked = [e for e, c in self._wits.items() if c.jti and c.jti in jtis]
        for entry_id in revoked:
            del self._wits[entry_id]
        if revoked:
            log.warning("dropped revoked WIT-SVIDs", extra={"svids": len(revoked)})
        return bool(revoked)

    def drop_untrusted(self, key_ids: Collection[str], tainted: Collection[str]) -> None:
        """Drop WITs signed by a key not in ``key_ids`` (revoked) or in ``tainted``: the next
        fetch signs new ones with the active key."""
        stale = [e for e, c in self._wits.items() if c.key_id not in key_ids or c.key_id in tainted]
        for entry_id in stale:
            del self._wits[entry_id]
        if stale:
            log.warning(
                "dropped WIT-SVIDs of a tainted or revoked key", extra={"svids": len(stale)}
            )
