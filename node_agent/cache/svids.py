"""The cached workload X509-SVIDs, by entry id, and which of them need signing.

:class:`SvidCache` keeps at most ``max_size`` SVIDs (SPIRE's ``svid_cache_max_size``) in
least-recently-used order; SVIDs of entries used by an open subscription ("pinned") are
never evicted. Each SVID carries when it is renewed (:func:`credo._renewal.renew_at`:
half-life +-10%, counted from when it arrived) and which bundle authority it leads to:
an SVID whose authority is tainted is re-issued at once, one whose authority left the
bundle (revoked) is dropped at once. An entry the server refused is not asked for again
for a few seconds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from credo._renewal import renew_at
from credo.x509svid import X509Svid
from node_agent.attestation.anchor import find_anchor
from node_agent.sync.entries import RegistrationEntry, TrustBundles

__all__ = ["REFUSED_RETRY", "CachedSvid", "SvidCache"]

log = logging.getLogger(__name__)

REFUSED_RETRY = 5.0
"""Seconds before an entry whose SVID the server refused is asked for again."""


@dataclass
class CachedSvid:
    """One cached X509-SVID and what it was issued for."""

    entry_id: str
    shape: tuple[object, ...]
    svid: X509Svid
    renew_at: float
    expires_at: float
    anchor: bytes | None
    """DER of the bundle authority the chain leads to (None: not in the bundle)."""
    issued_tainted: bool = False
    """Signed by an authority already tainted (no other to use yet): do not re-issue at once."""


class SvidCache:
    """X509-SVIDs by entry id, least recently used first."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._svids: OrderedDict[str, CachedSvid] = OrderedDict()
        self._refused_until: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._svids)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._svids

    def ids(self) -> set[str]:
        return set(self._svids)

    def get(self, entry_id: str) -> CachedSvid | None:
        """The cached SVID of ``entry_id`` (without marking it used)."""
        return self._svids.get(entry_id)

    def use(self, entry_id: str, now: float) -> CachedSvid | None:
        """The cached, unexpired SVID of ``entry_id``, marked most recently used."""
        cached = self._svids.get(entry_id)
        if cached is None or cached.expires_at <= now:
            return None
        self._svids.move_to_end(entry_id)
        return cached

    def add(
        self,
        entry: RegistrationEntry,
        svid: X509Svid,
        received_at: float,
        bundles: TrustBundles | None,
    ) -> CachedSvid:
        """Cache ``svid`` for ``entry``, which arrived at ``received_at``."""
        leaf = svid.leaf
        end = leaf.not_valid_after_utc.timestamp()
        renew = renew_at(leaf.not_valid_before_utc.timestamp(), end, received_at=received_at)
        anchor = find_anchor(svid.cert_chain, bundles.bundle.x509_authorities) if bundles else None
        tainted = bundles is not None and anchor in bundles.tainted_x509
        cached = CachedSvid(entry.id, entry.svid_shape(), svid, renew, end, anchor, tainted)
        self._svids[entry.id] = cached
        self._svids.move_to_end(entry.id)
        self._refused_until.pop(entry.id, None)
        return cached

    def refused(self, entry_id: str, now: float) -> None:
        """The server refused ``entry_id``'s SVID: do not ask again for a while."""
        self._refused_until[entry_id] = now + REFUSED_RETRY

    def waiting_after_refusal(self, entry_id: str, now: float) -> bool:
        return self._refused_until.get(entry_id, 0) > now

    def retain(self, served: Mapping[str, RegistrationEntry]) -> list[str]:
        """Drop the SVIDs of entries not in ``served`` or re-targeted; return their ids."""
        dropped = []
        for entry_id, cached in list(self._svids.items()):
            entry = served.get(entry_id)
            if entry is None or str(entry.spiffe_id) != str(cached.svid.spiffe_id):
                del self._svids[entry_id]
                dropped.append(entry_id)
        self._refused_until = {k: v for k, v in self._refused_until.items() if k in served}
        return dropped

    def reanchor(self, bundles: TrustBundles) -> list[str]:
        """Find each SVID's authority in the new bundle; drop (and return) those with none."""
        revoked = []
        for entry_id, cached in list(self._svids.items()):
            cached.anchor = find_anchor(cached.svid.cert_chain, bundles.bundle.x509_authorities)
            if cached.anchor is None:
                del self._svids[entry_id]
                revoked.append(entry_id)
            elif cached.anchor in bundles.tainted_x509:
                log.info(
                    "SVID signed by a tainted authority; re-issuing", extra={"entry_id": entry_id}
                )
        return revoked

    def drop_revoked(self, serials: Collection[int]) -> list[str]:
        """Drop SVIDs whose serial a CRL revokes; return their entry ids."""
        if not serials:
            return []
        dropped = [i for i, c in self._svids.items() if c.svid.leaf.serial_number in serials]
        for entry_id in dropped:
            del self._svids[entry_id]
        return dropped

    def drop_expired(self, now: float) -> list[str]:
        expired = [k for k, c in self._svids.items() if c.expires_at <= now]
        for entry_id in expired:
            del self._svids[entry_id]
        return expired

    def evict(self, pinned: Collection[str]) -> None:
        """Keep within ``max_size``: drop least recently used SVIDs not in ``pinned``."""
        excess = len(self._svids) - self.max_size
        if excess <= 0:
            return
        for entry_id in list(self._svids):
            if excess <= 0:
                break
            if entry_id not in pinned:
                del self._svids[entry_id]
                excess -= 1

    def due(
        self,
        served: Iterable[RegistrationEntry],
        pinned: Collection[str],
        tainted: Collection[bytes],
        now: float,
    ) -> list[RegistrationEntry]:
        """Entries needing an SVID now, pinned ones first: missing (while there is room, or
        pinned), stale shape, past renewal time, or signed by a tainted authority."""
        room = self.max_size - len(set(self._svids) | set(pinned))
        due: list[RegistrationEntry] = []
        later: list[RegistrationEntry] = []
        for entry in served:
            if self.waiting_after_refusal(entry.id, now):
                continue
            cached = self._svids.get(entry.id)
            if cached is None:
                if entry.id in pinned:
                    due.append(entry)
                elif room > 0:
                    room -= 1
                    later.append(entry)
                continue
            if (
                cached.shape != entry.svid_shape()
                or now >= cached.renew_at
                or (cached.anchor in tainted and not cached.issued_tainted)
            ):
                (due if entry.id in pinned else later).append(entry)
        return due + later

    def next_deadline(self, now: float) -> float:
        """The next moment something is due: a renewal, an expiry, a refusal's end."""
        times = [c.renew_at for c in self._svids.values()]
        times += [c.expires_at for c in self._svids.values()]
        times += [t for t in self._refused_until.values() if t > now]
        return min(times, default=now + 3600)
