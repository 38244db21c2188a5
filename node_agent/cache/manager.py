"""The agent's SVID cache manager: which identities to hold, signed, renewed and served.

:class:`CacheManager` implements the Workload API's
:class:`~node_agent.workload_api.manager.Manager`. The sync stream feeds it entries and
bundles (:class:`~node_agent.sync.syncer.SyncListener`); its :meth:`CacheManager.run` loop
keeps an X509-SVID for each entry it should hold. Its parts:

* :mod:`~node_agent.cache.svids` — the cached X509-SVIDs: LRU bound, renewal times,
  authorities, and which entries are due;
* :mod:`~node_agent.cache.signer` — signing one batch (keys, CSRs, one server call);
* :mod:`~node_agent.cache.jwt` — cached JWT-SVIDs;
* :mod:`~node_agent.cache.wit` — cached WIT-SVIDs and the workload keys they bind;
* :mod:`~node_agent.cache.subscriptions` — the workloads' streams.

What it decides:

* **Which entries.** The agent serves every entry the server sent (the server sends only
  what it authorized for this agent: under the agent, under its node aliases, and their
  descendants), except those naming agents rather than workloads (node-alias entries,
  and entries with only ``spiffe_id:`` selectors). SVIDs are kept for
  every entry used by an open subscription (always), for every entry already cached, and
  for further entries in (created_at, id) order while the cache has room
  (``max_size``, SPIRE's ``svid_cache_max_size``). Beyond that the least recently used
  SVIDs not used by a subscription are evicted; they are signed again on demand.
* **Renewal.** Each SVID is renewed at half its lifetime, +-10% jitter. An SVID whose
  issuing authority is marked tainted in the bundle is re-issued at once (and served until
  the new one arrives); one whose authority left the bundle (revoked) is dropped at once,
  as is the SVID of a deleted (or revoked) entry, and one whose serial a CRL lists (it is
  signed again unless the server refuses: its entry is revoked). A failed signing call is
  retried with the server client's backoff.
* **Offline.** While the server is unreachable cached SVIDs are served until they expire.
* **Push.** Subscriptions get the full state again on every new or rotated SVID, entry
  change, bundle change and CRL change. A new subscription whose matching entries have no SVID yet
  waits for them (up to ``svid_wait_timeout``) rather than report "no identity".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from credo.bundle import Bundle, BundleSet
from credo.selector import Selector
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import X509Svid
from node_agent._wait import wait_event
from node_agent.cache.errors import JwtSvidRateLimited, JwtSvidRefused, JwtSvidUnavailable
from node_agent.cache.jwt import JwtSvidCache
from node_agent.cache.signer import sign_batch
from node_agent.cache.subscriptions import BundleSubscription, Subscription, Subscriptions
from node_agent.cache.svids import SvidCache
from node_agent.cache.wit import WitSvidCache
from node_agent.errors import ServerClientError, ServerRefused
from node_agent.server_client import (
    MAX_BATCH,
    Backoff,
    IssuedJwtSvid,
    IssuedWitSvid,
    X509SvidResult,
)
from node_agent.sync.entries import RegistrationEntry, TrustBundles
from node_agent.workload_api.manager import Identity, WitIdentity, WorkloadUpdate

__all__ = ["MAX_BATCH", "CacheClient", "CacheConfig", "CacheManager"]

log = logging.getLogger(__name__)

# Selectors of this type name an agent (node-alias entries); workload attestors never make them.
_NODE_SELECTOR_TYPE = "spiffe_id"


class CacheClient(Protocol):
    """What the cache needs from the server client."""

    @property
    def agent_id(self) -> SpiffeId:
        """The agent's SPIFFE ID (RuntimeError before attestation)."""
        ...

    def backoff(self) -> Backoff:
        """A fresh backoff for one retry loop."""
        ...

    async def batch_new_x509_svid(
        self, csrs: Sequence[tuple[str, bytes]]
    ) -> list[X509SvidResult]: ...

    async def new_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> IssuedJwtSvid: ...

    async def batch_new_wit_svid(
        self, keys: Sequence[tuple[str, bytes]]
    ) -> list[IssuedWitSvid]: ...


@dataclass(frozen=True)
class CacheConfig:
    """Settings of the SVID cache; times in seconds."""

    trust_domain: TrustDomain
    max_size: int = 1000
    svid_wait_timeout: float = 5.0
    batch_size: int = MAX_BATCH
    # Most cached JWT-SVIDs; the audiences are chosen by workloads, so the cache is bounded
    # (least recently used dropped first).
    jwt_cache_max_size: int = 1000


class CacheManager:
    """Signs and caches workload SVIDs; serves them to the Workload API.

    Feed it with :meth:`update_entries` / :meth:`update_bundles` and run :meth:`run`.
    """

    def __init__(
        self,
        config: CacheConfig,
        client: CacheClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._client = client
        self._clock = clock
        self._entries: dict[str, RegistrationEntry] = {}
        self._served: list[RegistrationEntry] = []
        self._entries_synced = False
        self._bundles: TrustBundles | None = None
        self.svids = SvidCache(config.max_size)
        self.jwt_svids = JwtSvidCache(self._new_jwt_svid, config.jwt_cache_max_size, clock=clock)
        self.wit_svids = WitSvidCache(self._new_wit_svids, clock=clock)
        self._subs = Subscriptions(self, config.svid_wait_timeout)
        self._wake = asyncio.Event()
        self.connected = False
        self.batch_calls = 0
        """Number of ``BatchNewX509SVID`` calls made (for tests and metrics)."""

    # --- feeding: SyncListener -------------------------------------------------------------

    def update_entries(self, entries: Mapping[str, RegistrationEntry]) -> None:
        """Replace the entry set; drop at once the SVIDs of deleted or re-targeted entries."""
        self._entries = dict(entries)
        self._entries_synced = True
        self._served = self._compute_served()
        dropped = self.svids.retain({e.id: e for e in self._served})
        if dropped:
            log.info("dropped SVIDs of deleted entries", extra={"entries": len(dropped)})
        self.jwt_svids.retain({str(e.spiffe_id) for e in self._served})
        self.wit_svids.retain({e.id for e in self._served})
        self._changed()

    def update_bundles(self, bundles: TrustBundles) -> None:
        """Take new bundles; drop SVIDs whose authority was removed, re-issue tainted ones."""
        self._bundles = bundles
        revoked = self.svids.reanchor(bundles)
        if revoked:
            log.warning(
                "dropped SVIDs whose authority left the bundle", extra={"entries": len(revoked)}
            )
        withdrawn = self.svids.drop_revoked(bundles.crls.revoked_serials)
        if withdrawn:
            log.warning("dropped SVIDs revoked by a CRL", extra={"entries": len(withdrawn)})
        kids = bundles.bundle.jwt_authorities
        if kids:
            self.jwt_svids.drop_untrusted(kids, bundles.tainted_jwt)
        wit_kids = bundles.bundle.wit_authorities
        if wit_kids:
            self.wit_svids.drop_untrusted(wit_kids, bundles.tainted_jwt)
        self.jwt_svids.drop_revoked(bundles.revoked_jtis)
        self.wit_svids.drop_revoked(bundles.revoked_jtis)
        self._subs.notify_bundles()
        self._changed()

    def set_connected(self, connected: bool) -> None:
        """Record whether the sync stream is up."""
        self.connected = connected
        if connected:
            self._wake.set()

    def _changed(self) -> None:
        self._wake.set()
        self._subs.notify()

    def _compute_served(self) -> list[RegistrationEntry]:
        """Entries this agent serves to workloads, oldest first.

        Every entry the server sent is authorized for this agent: those under the agent, under
        a join-token alias, under a ``--node`` alias whose selectors match the node (the alias
        entry itself is not sent), and every descendant of those. All of them are served,
        except entries that name agents rather than workloads: node aliases, and entries
        whose selectors are only ``spiffe_id:`` (the join-token alias,
        ``spiffe_id:<agent id>``), which no workload attestor produces.
        """
        served = [
            e
            for e in self._entries.values()
            if not e.node_alias and any(s.type != _NODE_SELECTOR_TYPE for s in e.selectors)
        ]
        served.sort(key=lambda e: e.sort_key)
        return served

    # --- Manager -----------------------------------------------------------------------

    def subscribe(self, selectors: frozenset[Selector]) -> Subscription:
        """Follow the identities (and bundles) of a workload with ``selectors``."""
        sub = self._subs.subscribe(selectors)
        if any(e.id not in self.svids for e in self._matching_entries(sub.selectors)):
            self._wake.set()
        return sub

    def subscribe_bundles(self) -> BundleSubscription:
        """Follow the own bundle and every federated bundle."""
        return self._subs.subscribe_bundles()

    def matching_identities(self, selectors: frozenset[Selector]) -> tuple[Identity, ...]:
        """Identities whose entry selectors are a subset of ``selectors`` (first = default)."""
        now = self._clock()
        identities = []
        for entry in self._matching_entries(selectors):
            cached = self.svids.use(entry.id, now)
            if cached is not None:
                identities.append(Identity(entry.id, entry.spiffe_id, cached.svid, entry.hint))
        return tuple(identities)

    def bundle_set(self) -> BundleSet:
        """The own and all federated bundles."""
        bundles = self.trust_bundles()
        return BundleSet([bundles.bundle, *bundles.federated.values()])

    async def fetch_jwt_svid(self, identity: Identity, audience: tuple[str, ...]) -> str:
        """A JWT-SVID for ``identity`` and ``audience``, reused until half its lifetime."""
        return await self.jwt_svids.get(identity, audience)

    async def fetch_wit_svids(self, identities: tuple[Identity, ...]) -> tuple[WitIdentity, ...]:
        """A WIT-SVID per identity, reused until about half its lifetime (one batch call)."""
        return await self.wit_svids.get(identities)

    async def _new_wit_svids(self, keys: Sequence[tuple[str, bytes]]) -> list[IssuedWitSvid]:
        return await self._client.batch_new_wit_svid(keys)

    async def _new_jwt_svid(self, identity: Identity, audience: tuple[str, ...]) -> IssuedJwtSvid:
        try:
            return await self._client.new_jwt_svid(identity.entry_id, audience)
        except ServerRefused as exc:
            if exc.retryable:
                raise JwtSvidRateLimited(
                    f"the server rate-limited JWT-SVIDs for {identity.spiffe_id}: {exc.message}"
                ) from None
            raise JwtSvidRefused(str(identity.spiffe_id), exc.code, exc.message) from None
        except ServerClientError as exc:
            raise JwtSvidUnavailable(
                f"cannot get a JWT-SVID for {identity.spiffe_id}: {exc}"
            ) from None

    # --- views (WorkloadView, for subscriptions) ----------------------------------------

    def trust_bundles(self) -> TrustBundles:
        """The bundles synced so far (an empty own bundle before the first)."""
        if self._bundles is not None:
            return self._bundles
        return TrustBundles(Bundle(self.config.trust_domain))

    def _matching_entries(self, selectors: frozenset[Selector]) -> list[RegistrationEntry]:
        return [e for e in self._served if e.selectors <= selectors]

    def ready_for(self, selectors: frozenset[Selector]) -> bool:
        """True when this workload's state is complete: entries synced, SVIDs signed."""
        if not self._entries_synced or self._bundles is None:
            return False
        now = self._clock()
        return all(
            e.id in self.svids or self.svids.waiting_after_refusal(e.id, now)
            for e in self._matching_entries(selectors)
        )

    def update_for(self, selectors: frozenset[Selector]) -> WorkloadUpdate:
        """The full state a workload with ``selectors`` sees now."""
        identities = self.matching_identities(selectors)
        bundles = self.trust_bundles()
        wanted: set[str] = set()
        for identity in identities:
            entry = self._entries.get(identity.entry_id)
            if entry is not None:
                wanted.update(entry.federates_with)
        federated = {
            name: bundle
            for name, bundle in bundles.federated.items()
            if name in wanted or f"spiffe://{name}" in wanted
        }
        unsigned = len(self._matching_entries(selectors)) - len(identities)
        return WorkloadUpdate(identities, bundles.bundle, federated, unsigned, bundles.crls.der)

    def crls(self) -> tuple[bytes, ...]:
        """The trust domain's CRLs (DER), as the server last sent them."""
        return self.trust_bundles().crls.der

    def revoked_jtis(self) -> frozenset[str]:
        """``jti`` of every revoked, unexpired JWT-SVID, as the server last sent them."""
        return self.trust_bundles().revoked_jtis

    def cached_svid(self, entry_id: str) -> X509Svid | None:
        """The cached X509-SVID of ``entry_id`` (for tests and diagnostics)."""
        cached = self.svids.get(entry_id)
        return None if cached is None else cached.svid

    def renew_at(self, entry_id: str) -> float | None:
        """When the cached SVID of ``entry_id`` will be renewed (Unix time)."""
        cached = self.svids.get(entry_id)
        return None if cached is None else cached.renew_at

    @property
    def size(self) -> int:
        """Number of cached X509-SVIDs."""
        return len(self.svids)

    @property
    def served(self) -> tuple[RegistrationEntry, ...]:
        """The entries this agent serves, oldest first."""
        return tuple(self._served)

    # --- the signing loop ----------------------------------------------------------------

    def _pinned(self) -> set[str]:
        """Entry ids used by an open subscription: never evicted."""
        pinned: set[str] = set()
        for selectors in self._subs.selectors():
            pinned.update(e.id for e in self._matching_entries(selectors))
        return pinned

    async def run(self) -> None:
        """Sign, renew and expire SVIDs forever; only AgentBanned escapes."""
        backoff = self._client.backoff()
        while True:
            self._wake.clear()
            now = self._clock()
            expired = self.svids.drop_expired(now)
            if expired:
                log.warning("cached SVIDs expired", extra={"entries": len(expired)})
                self._changed()
            due: list[RegistrationEntry] = []
            if self._bundles is not None:
                tainted = self._bundles.tainted_x509
                due = self.svids.due(self._served, self._pinned(), tainted, now)
            if due:
                if await self._issue(due[: min(self.config.batch_size, MAX_BATCH)]):
                    backoff.reset()
                    continue
                await wait_event(self._wake, backoff.next())
                continue
            wait = max(0.0, self.svids.next_deadline(now) - self._clock())
            await wait_event(self._wake, min(wait, 3600.0))

    async def _issue(self, batch: list[RegistrationEntry]) -> bool:
        """Sign one batch; return False when the call itself failed (retry with backoff)."""
        self.batch_calls += 1
        try:
            signed = await sign_batch(self._client, batch)
        except ServerClientError as exc:
            log.warning(
                "X509-SVID batch signing failed", extra={"entries": len(batch), "error": str(exc)}
            )
            return False
        now = self._clock()
        for entry_id in signed.refused:
            self.svids.refused(entry_id, now)
        issued = 0
        for entry, svid in signed.issued:
            if entry.id in self._entries:  # not deleted while we were signing
                self.svids.add(entry, svid, now, self._bundles)
                issued += 1
        self.svids.evict(self._pinned())
        if issued:
            log.info("X509-SVIDs issued", extra={"entries": issued, "cached": len(self.svids)})
            self._changed()
        return True
