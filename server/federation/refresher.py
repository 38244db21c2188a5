"""Keep each federated trust domain's bundle fresh: :class:`BundleRefresher`.

For every federation relationship in the datastore (re-read every second, so ones created,
changed or deleted by ``credo-server federation ...`` or by another server sharing the
database count at once), fetch the bundle from its endpoint (:mod:`server.federation.fetch`)
when it is due:

* right away for a new relationship, then every ``spiffe_refresh_hint`` seconds of the
  bundle last fetched, bounded to [:data:`MIN_REFRESH`, :data:`MAX_REFRESH`]
  (:data:`DEFAULT_REFRESH` when the bundle has no hint);
* after a failure, again after a backoff doubling from 1 s up to :data:`MAX_BACKOFF`; the
  last good bundle stays stored (and trusted) meanwhile.

A fetched bundle that differs from the stored one replaces it (``set_bundle``: the change
feed then carries it to the agents whose entries ``federates_with`` that trust domain, and
on to their workloads' Workload API streams). Each fetch's outcome is recorded on the
relationship (``last_refresh_at``, ``last_error``) for ``credo-server federation show``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from cryptography.hazmat.primitives import serialization

from credo.bundle import Bundle
from credo.errors import BundleError
from credo.spiffe_id import SpiffeId, TrustDomain
from server.datastore.errors import DataStoreError, NotFound
from server.datastore.models import FederationRelationship
from server.datastore.protocol import DataStore
from server.datastore.snapshot import Snapshot
from server.federation.errors import BundleFetchFailed
from server.federation.fetch import fetch_bundle

__all__ = ["DEFAULT_REFRESH", "MAX_BACKOFF", "MAX_REFRESH", "MIN_REFRESH", "BundleRefresher"]

log = logging.getLogger(__name__)

MIN_REFRESH: Final = 1.0
MAX_REFRESH: Final = 3600.0
DEFAULT_REFRESH: Final = 300.0
MAX_BACKOFF: Final = 300.0
_RELOAD_INTERVAL: Final = 5.0
# With a generation (see BundleRefresher.run): at most this long between two reads.
_RELOAD_FALLBACK: Final = 30.0
# (How often the relationships are read again: a new one is picked up within it.)

Fetcher = Callable[..., Bundle]


@dataclass
class _State:
    relationship: FederationRelationship
    due: float = 0.0
    failures: int = 0
    task: asyncio.Task[None] | None = None


def refresh_interval(bundle: Bundle) -> float:
    """Seconds until ``bundle`` should be fetched again (its hint, bounded)."""
    hint = bundle.refresh_hint
    if not hint:
        return DEFAULT_REFRESH
    return min(max(float(hint), MIN_REFRESH), MAX_REFRESH)


class BundleRefresher:
    """The federated-bundle refresh loop (one of the server's loops in ``server/app.py``)."""

    def __init__(
        self,
        datastore: DataStore,
        trust_domain: TrustDomain,
        *,
        fetcher: Fetcher = fetch_bundle,
        clock: Callable[[], float] = time.monotonic,
        on_refresh: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._ds = datastore
        self._td = trust_domain
        self._fetch = fetcher
        self._clock = clock
        self._states: dict[str, _State] = {}
        # Called with (trust domain, fetched and stored?) after every fetch (metrics).
        self._on_refresh = on_refresh
        # The last read of the relationships (see run).
        self._relationships = Snapshot(
            lambda: self._ds.list_federation_relationships(), _RELOAD_FALLBACK, clock
        )

    async def run(
        self, stop: asyncio.Event, generation: Callable[[], object] | None = None
    ) -> None:
        """Reload the relationships every few seconds and refresh each bundle when due.

        ``generation`` returns a value that moves whenever the relationships may have
        changed (the server passes its change feed's position with the datastore's count
        of committed writes); while it stands still, the relationships read last are used
        for up to ``_RELOAD_FALLBACK`` seconds (a change made through another server that
        stores no bundle: an endpoint moved).
        """
        try:
            while not stop.is_set():
                try:
                    await self._tick(generation)
                except DataStoreError as err:
                    log.error("reading federation relationships failed", extra={"error": str(err)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._next_wait())
        finally:
            for state in self._states.values():
                if state.task is not None:
                    state.task.cancel()

    def _next_wait(self) -> float:
        """Until the next reload of the relationships, or sooner when a refresh is due."""
        now = self._clock()
        due = [s.due - now for s in self._states.values() if s.task is None]
        return max(0.05, min([_RELOAD_INTERVAL, *due]))

    async def _tick(self, generation: Callable[[], object] | None = None) -> None:
        rows = await asyncio.to_thread(self._relationships.get, generation)
        current = {r.trust_domain: r for r in rows}
        for name in list(self._states):
            if name not in current:
                state = self._states.pop(name)
                if state.task is not None:
                    state.task.cancel()
        now = self._clock()
        for name, rel in current.items():
            old = self._states.get(name)
            if old is None or _endpoint(old.relationship) != _endpoint(rel):
                if old is not None and old.task is not None:
                    old.task.cancel()
                self._states[name] = _State(rel, due=now)
            state = self._states[name]
            state.relationship = rel
            if state.task is None and now >= state.due:
                state.task = asyncio.create_task(self._refresh(state), name=f"federation-{name}")

    def _roots(self, rel: FederationRelationship) -> bytes:
        """PEM roots for an https_spiffe endpoint: the endpoint ID's trust domain bundle."""
        if not rel.endpoint_spiffe_id:
            return b""
        td = SpiffeId.parse(rel.endpoint_spiffe_id).trust_domain
        data = self._ds.fetch_bundle(td.name)
        if data is None:
            return b""
        try:
            bundle = Bundle.parse(td, data)
        except (BundleError, ValueError):
            return b""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle.x509_authorities)

    def _fetch_and_store(self, rel: FederationRelationship) -> tuple[Bundle, bool]:
        td = TrustDomain.parse(rel.trust_domain)
        bundle = self._fetch(
            td,
            rel.bundle_endpoint_url,
            rel.bundle_endpoint_profile,
            endpoint_spiffe_id=rel.endpoint_spiffe_id,
            roots_pem=self._roots(rel),
        )
        data = bundle.marshal()
        stored = self._ds.fetch_bundle(td.name)
        changed = stored is None or _parsed(td, stored) != bundle
        if changed:
            # The relationship may have gone while we fetched: do not resurrect its bundle.
            if self._ds.fetch_federation_relationship(td.name) is None:
                return bundle, False
            self._ds.set_bundle(td.name, data)
        return bundle, changed

    async def _refresh(self, state: _State) -> None:
        """Fetch, store and record one relationship's bundle; the state is free again (its
        ``task`` None) only once the outcome is recorded, so what ``federation show`` says
        is never behind a finished refresh."""
        try:
            await self._refresh_and_record(state)
        finally:
            state.task = None

    async def _refresh_and_record(self, state: _State) -> None:
        rel = state.relationship
        error = ""
        try:
            bundle, changed = await asyncio.to_thread(self._fetch_and_store, rel)
        except BundleFetchFailed as err:
            error = str(err)
            state.failures += 1
            backoff = min(2.0 ** (state.failures - 1), MAX_BACKOFF)
            state.due = self._clock() + backoff
            log.warning(
                "federated bundle refresh failed; keeping the last good bundle",
                extra={"trust_domain": rel.trust_domain, "error": error, "retry_in_s": backoff},
            )
        except DataStoreError as err:
            error = f"datastore: {err}"
            state.due = self._clock() + 1.0
            log.error("storing a federated bundle failed", extra={"error": str(err)})
        else:
            state.failures = 0
            state.due = self._clock() + refresh_interval(bundle)
            if changed:
                log.info(
                    "federated bundle updated",
                    extra={
                        "trust_domain": rel.trust_domain,
                        "sequence": bundle.sequence_number,
                        "x509_authorities": len(bundle.x509_authorities),
                        "jwt_authorities": len(bundle.jwt_authorities),
                    },
                )
        if self._on_refresh is not None:
            self._on_refresh(rel.trust_domain, not error)
        await asyncio.to_thread(self._record, rel, error)

    def _record(self, rel: FederationRelationship, error: str) -> None:
        if rel.last_error == error and error:
            return  # the same failure again: nothing new to show
        try:
            current = self._ds.fetch_federation_relationship(rel.trust_domain)
            if current is None or _endpoint(current) != _endpoint(rel):
                return  # deleted or changed meanwhile: this outcome is about the old one
            self._ds.update_federation_relationship(
                replace(current, last_refresh_at=int(time.time()), last_error=error[:1000])
            )
        except NotFound:
            pass  # deleted meanwhile
        except DataStoreError as err:
            log.error("recording a federated bundle refresh failed", extra={"error": str(err)})


def _endpoint(rel: FederationRelationship) -> tuple[str, str, str]:
    return (rel.bundle_endpoint_url, rel.bundle_endpoint_profile, rel.endpoint_spiffe_id)


def _parsed(td: TrustDomain, data: bytes) -> Bundle | None:
    try:
        return Bundle.parse(td, data)
    except (BundleError, ValueError):
        return None
