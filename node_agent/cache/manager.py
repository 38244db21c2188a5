"""The agent's SVID cache: signs, caches, renews and serves workload identities.

:class:`CacheManager` implements the Workload API's
:class:`~node_agent.workload_api.manager.Manager`. The sync stream feeds it entries and
bundles (:class:`~node_agent.sync.syncer.SyncListener`); its :meth:`CacheManager.run` loop
keeps an X509-SVID for each entry it should hold:

* **Which entries.** Entries the agent serves are those whose parent is the agent or one
  of its node aliases (node-alias entries themselves are not served). SVIDs are kept for
  every entry used by an open subscription (always), for every entry already cached, and
  for further entries in (created_at, id) order while the cache has room
  (``max_size``, SPIRE's ``svid_cache_max_size``). Beyond that the least recently used
  SVIDs not used by a subscription are evicted; they are signed again on demand.
* **Signing.** The agent makes each key itself (ec-p256) and sends CSRs in batches of at
  most 500 per ``BatchNewX509SVID`` call.
* **Renewal.** Each SVID is renewed at half its lifetime, ±10% jitter. An SVID whose
  issuing authority is marked tainted in the bundle is re-issued at once (and served until
  the new one arrives); one whose authority left the bundle (revoked) is dropped at once,
  as is the SVID of a deleted entry.
* **Offline.** While the server is unreachable cached SVIDs are served until they expire.
* **Push.** Subscriptions get the full state again on every new or rotated SVID, entry
  change and bundle change. A new subscription whose matching entries have no SVID yet
  waits for them (up to ``svid_wait_timeout``) rather than report "no identity".
* **JWT-SVIDs** are cached per (SPIFFE ID, audiences) and reused until half their life;
  one whose signing key is tainted or left the bundle (revoked) is dropped at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from cryptography import x509

from credo._proto.credo.server.v1 import agent_pb2
from credo.bundle import Bundle, BundleSet
from credo.errors import CredoError
from credo.jwtsvid import JwtSvid
from credo.keys import PrivateKey, generate_private_key, make_csr
from credo.selector import Selector
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import X509Svid, leaf_spiffe_id
from node_agent.attestation.anchor import find_anchor
from node_agent.attestation.errors import ServerUnreachable
from node_agent.cache.errors import JwtSvidUnavailable
from node_agent.sync.entries import Entry, TrustBundles
from node_agent.sync.syncer import Backoff, wait_event
from node_agent.workload_api.manager import Identity, WorkloadUpdate

__all__ = ["MAX_BATCH", "CacheConfig", "CacheManager", "ServerClient"]

log = logging.getLogger(__name__)

MAX_BATCH = 500
"""Most CSRs the server accepts in one ``BatchNewX509SVID`` call."""


class ServerClient(Protocol):
    """What the cache needs from the agent's session with the server."""

    @property
    def agent_id(self) -> SpiffeId:
        """The agent's SPIFFE ID."""
        ...

    async def stub(self) -> Any:
        """An ``Agent`` stub on a channel to the current server."""
        ...

    def raise_if_banned(self, err: BaseException) -> None:
        """Raise AgentBanned when ``err`` says the agent is banned."""
        ...

    def failover(self) -> str:
        """Move to the next server address."""
        ...


@dataclass(frozen=True)
class CacheConfig:
    """Settings of the SVID cache; times in seconds."""

    trust_domain: TrustDomain
    max_size: int = 1000
    svid_wait_timeout: float = 5.0
    batch_size: int = MAX_BATCH
    rpc_timeout: float = 30.0
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    # Renew at (0.5 ± renew_jitter/2) of an SVID's lifetime: ±10% of half-life.
    renew_jitter: float = 0.1
    # Most cached JWT-SVIDs; the audiences are chosen by workloads, so the cache is bounded
    # (least recently used dropped first).
    jwt_cache_max_size: int = 1000


@dataclass
class _Cached:
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


@dataclass
class _CachedJwt:
    token: str
    refresh_at: float
    expires_at: float


def _jwt_kid(token: str) -> str:
    """The ``kid`` header of ``token`` (not verified), or "" if it has none."""
    try:
        head = token.split(".", 1)[0]
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        kid = header.get("kid", "") if isinstance(header, dict) else ""
    except ValueError:
        return ""
    return kid if isinstance(kid, str) else ""


class _Subscription:
    """A workload's view: the state for its selectors, pushed again on every change."""

    def __init__(self, manager: CacheManager, selectors: frozenset[Selector]) -> None:
        self._manager = manager
        self.selectors = selectors
        self._event = asyncio.Event()
        self._first = True
        self._last: tuple[object, ...] | None = None
        self.closed = False

    def notify(self) -> None:
        self._event.set()

    async def next(self) -> WorkloadUpdate:
        """The first call returns at once (after a bounded wait for pending SVIDs); later
        calls wait until what this workload would see has changed."""
        manager = self._manager
        if self._first:
            self._first = False
            deadline = time.monotonic() + manager.config.svid_wait_timeout
            while not manager._ready_for(self.selectors):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._event.clear()
                await wait_event(self._event, left)
            update = manager._update_for(self.selectors)
            self._last = _fingerprint(update)
            return update
        while True:
            await self._event.wait()
            self._event.clear()
            update = manager._update_for(self.selectors)
            fingerprint = _fingerprint(update)
            if fingerprint != self._last:
                self._last = fingerprint
                return update

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._manager._unsubscribe(self)


class _BundleSubscription:
    """A stream of (own bundle, federated bundles)."""

    def __init__(self, manager: CacheManager) -> None:
        self._manager = manager
        self._event = asyncio.Event()
        self._first = True
        self._last: tuple[Bundle, dict[str, Bundle]] | None = None

    def notify(self) -> None:
        self._event.set()

    async def next(self) -> tuple[Bundle, Mapping[str, Bundle]]:
        if not self._first:
            while True:
                await self._event.wait()
                self._event.clear()
                if self._current() != self._last:
                    break
        self._first = False
        self._last = self._current()
        return self._last

    def _current(self) -> tuple[Bundle, dict[str, Bundle]]:
        bundles = self._manager._trust_bundles()
        return bundles.bundle, dict(bundles.federated)

    def close(self) -> None:
        self._manager._bundle_subs.discard(self)


def _fingerprint(update: WorkloadUpdate) -> tuple[object, ...]:
    return (
        tuple((i.entry_id, i.svid.leaf.serial_number, i.hint) for i in update.identities),
        update.bundle,
        dict(update.federated_bundles),
    )


class CacheManager:
    """Signs and caches workload SVIDs; serves them to the Workload API.

    Feed it with :meth:`update_entries` / :meth:`update_bundles` and run :meth:`run`.
    """

    def __init__(
        self,
        config: CacheConfig,
        client: ServerClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._client = client
        self._clock = clock
        self._entries: dict[str, Entry] = {}
        self._served: list[Entry] = []
        self._entries_synced = False
        self._bundles: TrustBundles | None = None
        self._svids: OrderedDict[str, _Cached] = OrderedDict()
        self._failed_until: dict[str, float] = {}
        self._subs: set[_Subscription] = set()
        self._bundle_subs: set[_BundleSubscription] = set()
        self._jwts: OrderedDict[tuple[str, tuple[str, ...]], _CachedJwt] = OrderedDict()
        # Per-key lock and the number of callers using it; removed when unused.
        self._jwt_locks: dict[tuple[str, tuple[str, ...]], tuple[asyncio.Lock, list[int]]] = {}
        self._wake = asyncio.Event()
        self.connected = False
        self.batch_calls = 0
        """Number of ``BatchNewX509SVID`` calls made (for tests and metrics)."""

    # --- feeding: SyncListener -------------------------------------------------------------

    def update_entries(self, entries: Mapping[str, Entry]) -> None:
        """Replace the entry set; drop at once the SVIDs of deleted or re-targeted entries."""
        self._entries = dict(entries)
        self._entries_synced = True
        self._served = self._compute_served()
        served_ids = {e.id: e for e in self._served}
        dropped = []
        for entry_id, cached in list(self._svids.items()):
            entry = served_ids.get(entry_id)
            if entry is None or str(entry.spiffe_id) != str(cached.svid.spiffe_id):
                del self._svids[entry_id]
                dropped.append(entry_id)
        if dropped:
            log.info("dropped SVIDs of deleted entries", extra={"entries": len(dropped)})
        live_ids = {str(e.spiffe_id) for e in self._served}
        for key in [k for k in self._jwts if k[0] not in live_ids]:
            del self._jwts[key]
        self._failed_until = {k: v for k, v in self._failed_until.items() if k in served_ids}
        self._changed()

    def update_bundles(self, bundles: TrustBundles) -> None:
        """Take new bundles; drop SVIDs whose authority was removed, re-issue tainted ones."""
        self._bundles = bundles
        authorities = bundles.bundle.x509_authorities
        revoked = []
        for entry_id, cached in list(self._svids.items()):
            cached.anchor = find_anchor(cached.svid.cert_chain, authorities)
            if cached.anchor is None:
                del self._svids[entry_id]
                revoked.append(entry_id)
            elif cached.anchor in bundles.tainted_x509:
                log.info(
                    "SVID signed by a tainted authority; re-issuing", extra={"entry_id": entry_id}
                )
        if revoked:
            log.warning(
                "dropped SVIDs whose authority left the bundle", extra={"entries": len(revoked)}
            )
        kids = bundles.bundle.jwt_authorities
        if kids:
            # A JWT-SVID signed by a tainted key, or one that left the bundle (revoked), is
            # not served again: the next fetch mints one with the active key.
            stale = [
                k
                for k, c in self._jwts.items()
                if _jwt_kid(c.token) not in kids or _jwt_kid(c.token) in bundles.tainted_jwt
            ]
            for key in stale:
                del self._jwts[key]
            if stale:
                log.warning(
                    "dropped JWT-SVIDs of a tainted or revoked key", extra={"svids": len(stale)}
                )
        for sub in list(self._bundle_subs):
            sub.notify()
        self._changed()

    def set_connected(self, connected: bool) -> None:
        """Record whether the sync stream is up."""
        self.connected = connected
        if connected:
            self._wake.set()

    def _changed(self) -> None:
        self._wake.set()
        for sub in list(self._subs):
            sub.notify()

    def _compute_served(self) -> list[Entry]:
        """Entries this agent serves to workloads, oldest first."""
        try:
            agent_id = str(self._client.agent_id)
        except RuntimeError:
            agent_id = ""
        parents = {agent_id}
        for entry in self._entries.values():
            if entry.node_alias or (entry.parent_id == agent_id and not entry.selectors):
                parents.add(str(entry.spiffe_id))
        served = [
            e
            for e in self._entries.values()
            if not e.node_alias and e.selectors and e.parent_id in parents
        ]
        served.sort(key=lambda e: e.sort_key)
        return served

    # --- Manager -----------------------------------------------------------------------

    def subscribe(self, selectors: frozenset[Selector]) -> _Subscription:
        """Follow the identities (and bundles) of a workload with ``selectors``."""
        sub = _Subscription(self, frozenset(selectors))
        self._subs.add(sub)
        if any(e.id not in self._svids for e in self._matching_entries(sub.selectors)):
            self._wake.set()
        return sub

    def _unsubscribe(self, sub: _Subscription) -> None:
        self._subs.discard(sub)

    def subscribe_bundles(self) -> _BundleSubscription:
        """Follow the own bundle and every federated bundle."""
        sub = _BundleSubscription(self)
        self._bundle_subs.add(sub)
        return sub

    def matching_identities(self, selectors: frozenset[Selector]) -> tuple[Identity, ...]:
        """Identities whose entry selectors are a subset of ``selectors`` (first = default)."""
        now = self._clock()
        identities = []
        for entry in self._matching_entries(selectors):
            cached = self._svids.get(entry.id)
            if cached is None or cached.expires_at <= now:
                continue
            self._svids.move_to_end(entry.id)
            identities.append(Identity(entry.id, entry.spiffe_id, cached.svid, entry.hint))
        return tuple(identities)

    def bundle_set(self) -> BundleSet:
        """The own and all federated bundles."""
        bundles = self._trust_bundles()
        return BundleSet([bundles.bundle, *bundles.federated.values()])

    async def fetch_jwt_svid(self, identity: Identity, audience: tuple[str, ...]) -> str:
        """A JWT-SVID for ``identity`` and ``audience``, reused until half its lifetime."""
        key = (str(identity.spiffe_id), tuple(sorted(set(audience))))
        slot = self._jwt_locks.get(key)
        if slot is None:
            slot = self._jwt_locks[key] = (asyncio.Lock(), [0])
        lock, users = slot
        users[0] += 1
        try:
            async with lock:
                cached = self._jwts.get(key)
                if cached is not None and self._clock() < cached.refresh_at:
                    self._jwts.move_to_end(key)
                    return cached.token
                try:
                    token, issued_at, expires_at = await self._new_jwt_svid(identity, audience)
                except JwtSvidUnavailable:
                    if cached is not None and self._clock() < cached.expires_at - 5:
                        log.warning(
                            "server unreachable; serving cached JWT-SVID",
                            extra={"spiffe_id": key[0]},
                        )
                        return cached.token
                    raise
                self._jwts[key] = _CachedJwt(
                    token, issued_at + (expires_at - issued_at) / 2, expires_at
                )
                self._jwts.move_to_end(key)
                self._trim_jwts()
                return token
        finally:
            users[0] -= 1
            if users[0] == 0 and self._jwt_locks.get(key) is slot:
                del self._jwt_locks[key]

    def _trim_jwts(self) -> None:
        """Drop expired JWT-SVIDs, then the least recently used beyond the size limit."""
        now = self._clock()
        for key in [k for k, c in self._jwts.items() if c.expires_at <= now]:
            del self._jwts[key]
        while len(self._jwts) > max(self.config.jwt_cache_max_size, 0):
            self._jwts.popitem(last=False)

    async def _new_jwt_svid(
        self, identity: Identity, audience: tuple[str, ...]
    ) -> tuple[str, float, float]:
        request = agent_pb2.NewJWTSVIDRequest(entry_id=identity.entry_id, audience=list(audience))
        last = "no server answered"
        for _attempt in range(2):
            try:
                stub = await self._client.stub()
                response = await stub.NewJWTSVID(request, timeout=self.config.rpc_timeout)
            except grpc.aio.AioRpcError as exc:
                self._client.raise_if_banned(exc)
                last = f"{exc.code().name}: {exc.details()}"
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    break
                self._client.failover()
                continue
            except ServerUnreachable as exc:
                last = str(exc)
                self._client.failover()
                continue
            token = response.svid.token
            issued_at = float(response.svid.issued_at)
            expires_at = float(response.svid.expires_at)
            if not expires_at or not issued_at:
                try:
                    parsed = JwtSvid.parse_insecure(token, list(audience))
                except CredoError as err:
                    raise JwtSvidUnavailable(
                        f"server returned an unusable JWT-SVID: {err}"
                    ) from None
                expires_at = parsed.expires_at.timestamp()
                issued_at = parsed.issued_at.timestamp() if parsed.issued_at else self._clock()
            return token, issued_at, expires_at
        raise JwtSvidUnavailable(f"cannot get a JWT-SVID for {identity.spiffe_id}: {last}")

    # --- views ------------------------------------------------------------------------

    def _trust_bundles(self) -> TrustBundles:
        if self._bundles is not None:
            return self._bundles
        return TrustBundles(Bundle(self.config.trust_domain))

    def _matching_entries(self, selectors: frozenset[Selector]) -> list[Entry]:
        return [e for e in self._served if e.selectors <= selectors]

    def _ready_for(self, selectors: frozenset[Selector]) -> bool:
        """True when this workload's state is complete: entries synced, SVIDs signed."""
        if not self._entries_synced or self._bundles is None:
            return False
        now = self._clock()
        for entry in self._matching_entries(selectors):
            if entry.id not in self._svids and self._failed_until.get(entry.id, 0) <= now:
                return False
        return True

    def _update_for(self, selectors: frozenset[Selector]) -> WorkloadUpdate:
        identities = self.matching_identities(selectors)
        bundles = self._trust_bundles()
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
        return WorkloadUpdate(identities, bundles.bundle, federated)

    def cached_svid(self, entry_id: str) -> X509Svid | None:
        """The cached X509-SVID of ``entry_id`` (for tests and diagnostics)."""
        cached = self._svids.get(entry_id)
        return None if cached is None else cached.svid

    def renew_at(self, entry_id: str) -> float | None:
        """When the cached SVID of ``entry_id`` will be renewed (Unix time)."""
        cached = self._svids.get(entry_id)
        return None if cached is None else cached.renew_at

    @property
    def size(self) -> int:
        """Number of cached X509-SVIDs."""
        return len(self._svids)

    # --- the signing loop ----------------------------------------------------------------

    def _pinned(self) -> set[str]:
        """Entry ids used by an open subscription: never evicted."""
        pinned: set[str] = set()
        for sub in self._subs:
            pinned.update(e.id for e in self._matching_entries(sub.selectors))
        return pinned

    def _due(self, now: float) -> list[Entry]:
        """Entries needing an SVID now: missing, stale shape, past renew time, tainted."""
        pinned = self._pinned()
        tainted = self._bundles.tainted_x509 if self._bundles else frozenset()
        room = self.config.max_size - len(set(self._svids) | pinned)
        due: list[Entry] = []
        later: list[Entry] = []
        for entry in self._served:
            if self._failed_until.get(entry.id, 0) > now:
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

    def _next_deadline(self, now: float) -> float:
        times = [c.renew_at for c in self._svids.values()]
        times += [c.expires_at for c in self._svids.values()]
        times += [t for t in self._failed_until.values() if t > now]
        return min(times, default=now + 3600)

    def _drop_expired(self, now: float) -> None:
        expired = [k for k, c in self._svids.items() if c.expires_at <= now]
        for entry_id in expired:
            del self._svids[entry_id]
        if expired:
            log.warning("cached SVIDs expired", extra={"entries": len(expired)})
            self._changed()

    def _evict(self) -> None:
        """Keep the cache within ``max_size``: drop least recently used, unpinned SVIDs."""
        excess = len(self._svids) - self.config.max_size
        if excess <= 0:
            return
        pinned = self._pinned()
        for entry_id in list(self._svids):
            if excess <= 0:
                break
            if entry_id not in pinned:
                del self._svids[entry_id]
                excess -= 1

    async def run(self) -> None:
        """Sign, renew and expire SVIDs forever; only AgentBanned escapes."""
        backoff = Backoff(self.config.backoff_min, self.config.backoff_max)
        while True:
            self._wake.clear()
            now = self._clock()
            self._drop_expired(now)
            due = self._due(now) if self._bundles is not None else []
            if due:
                batch = due[: min(self.config.batch_size, MAX_BATCH)]
                ok = await self._issue(batch)
                if ok:
                    backoff.reset()
                    continue
                delay = backoff.next()
                await wait_event(self._wake, delay)
                continue
            wait = max(0.0, self._next_deadline(now) - self._clock())
            await wait_event(self._wake, min(wait, 3600.0))

    async def _issue(self, batch: list[Entry]) -> bool:
        """Sign one batch; return False when the call itself failed (retry with backoff)."""
        keys: list[PrivateKey] = []
        params = []
        pairs = await asyncio.to_thread(_keys_and_csrs, len(batch))
        for entry, (key, csr) in zip(batch, pairs, strict=True):
            keys.append(key)
            params.append(agent_pb2.NewX509SVIDParams(entry_id=entry.id, csr=csr))
        try:
            stub = await self._client.stub()
            self.batch_calls += 1
            response = await stub.BatchNewX509SVID(
                agent_pb2.BatchNewX509SVIDRequest(params=params), timeout=self.config.rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            self._client.raise_if_banned(exc)
            log.warning(
                "X509-SVID batch signing failed",
                extra={"entries": len(batch), "error": f"{exc.code().name}: {exc.details()}"},
            )
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._client.failover()
            return False
        except ServerUnreachable as exc:
            log.warning(
                "X509-SVID batch signing failed", extra={"entries": len(batch), "error": str(exc)}
            )
            self._client.failover()
            return False
        by_entry = {e.id: (e, k) for e, k in zip(batch, keys, strict=True)}
        now = self._clock()
        issued = 0
        answered: set[str] = set()
        for result in response.results:
            answered.add(result.entry_id)
            item = by_entry.get(result.entry_id)
            if item is None:
                continue
            entry, key = item
            if result.status.code != 0:
                self._failed_until[entry.id] = now + 5.0
                log.warning(
                    "server refused an X509-SVID",
                    extra={
                        "entry_id": entry.id,
                        "code": result.status.code,
                        "error": result.status.message,
                    },
                )
                continue
            if self._entries.get(entry.id) is None:
                continue  # deleted while we were signing
            cached = self._cache_result(entry, key, result.svid, now)
            if cached is not None:
                issued += 1
        for entry_id in set(by_entry) - answered:
            self._failed_until[entry_id] = now + 5.0
        self._evict()
        if issued:
            log.info("X509-SVIDs issued", extra={"entries": issued, "cached": len(self._svids)})
            self._changed()
        return True

    def _cache_result(
        self, entry: Entry, key: PrivateKey, proto_svid: Any, now: float
    ) -> _Cached | None:
        try:
            chain = tuple(x509.load_der_x509_certificate(bytes(c)) for c in proto_svid.cert_chain)
            if not chain:
                raise ValueError("empty certificate chain")
            spiffe_id = leaf_spiffe_id(chain[0])
            if spiffe_id != entry.spiffe_id:
                raise ValueError(f"SVID is for {spiffe_id}, expected {entry.spiffe_id}")
            svid = X509Svid(spiffe_id, chain, key, entry.hint)
        except (CredoError, ValueError) as exc:
            self._failed_until[entry.id] = now + 5.0
            log.warning(
                "server returned an unusable X509-SVID",
                extra={"entry_id": entry.id, "error": str(exc)},
            )
            return None
        end = chain[0].not_valid_after_utc.timestamp()
        # Count the lifetime from when the SVID arrived, not from NotBefore: the server
        # backdates NotBefore (clock skew), and with a short TTL half of NotAfter-NotBefore
        # falls before the SVID even arrived -- an endless re-signing loop.
        start = max(chain[0].not_valid_before_utc.timestamp(), min(now, end))
        jitter = self.config.renew_jitter
        renew_at = start + (end - start) * 0.5 * random.uniform(1 - jitter, 1 + jitter)
        bundles = self._bundles
        anchor = find_anchor(chain, bundles.bundle.x509_authorities) if bundles else None
        tainted = bundles is not None and anchor in bundles.tainted_x509
        cached = _Cached(entry.id, entry.svid_shape(), svid, renew_at, end, anchor, tainted)
        self._svids[entry.id] = cached
        self._svids.move_to_end(entry.id)
        self._failed_until.pop(entry.id, None)
        return cached


def _keys_and_csrs(count: int) -> list[tuple[PrivateKey, bytes]]:
    """Generate ``count`` ec-p256 keys and their CSRs (run in a worker thread)."""
    out = []
    for _ in range(count):
        key = generate_private_key()
        out.append((key, make_csr(key)))
    return out
