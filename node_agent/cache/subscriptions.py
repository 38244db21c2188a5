"""Workload API streams on the SVID cache: one per ``FetchX509SVID`` / bundle stream.

A :class:`Subscription` follows the identities of one set of selectors; its first
:meth:`~Subscription.next` returns at once (after a bounded wait for SVIDs still being
signed), later calls wait until what the workload would see has changed. A
:class:`BundleSubscription` follows the own and federated bundles. :class:`Subscriptions`
holds the open ones and wakes them when the cache changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from typing import Protocol

from credo.bundle import Bundle
from credo.selector import Selector
from node_agent._wait import wait_event
from node_agent.sync.entries import TrustBundles
from node_agent.workload_api.manager import WorkloadUpdate

__all__ = ["BundleSubscription", "Subscription", "Subscriptions", "WorkloadView"]


class WorkloadView(Protocol):
    """What subscriptions read from the cache."""

    def ready_for(self, selectors: frozenset[Selector]) -> bool:
        """True when the state for ``selectors`` is complete (entries synced, SVIDs signed)."""
        ...

    def update_for(self, selectors: frozenset[Selector]) -> WorkloadUpdate:
        """The full state a workload with ``selectors`` should see now."""
        ...

    def trust_bundles(self) -> TrustBundles:
        """The own and federated bundles now."""
        ...


def _fingerprint(update: WorkloadUpdate) -> tuple[object, ...]:
    return (
        tuple((i.entry_id, i.svid.leaf.serial_number, i.hint) for i in update.identities),
        update.bundle,
        dict(update.federated_bundles),
        update.crls,
    )


class Subscription:
    """A workload's view: the state for its selectors, pushed again on every change."""

    def __init__(
        self, owner: Subscriptions, selectors: frozenset[Selector], wait_timeout: float
    ) -> None:
        self._owner = owner
        self.selectors = selectors
        self._wait_timeout = wait_timeout
        self._event = asyncio.Event()
        self._first = True
        self._last: tuple[object, ...] | None = None
        self.closed = False

    def notify(self) -> None:
        self._event.set()

    async def next(self) -> WorkloadUpdate:
        """The first call returns at once (after a bounded wait for pending SVIDs); later
        calls wait until what this workload would see has changed."""
        view = self._owner.view
        if self._first:
            self._first = False
            deadline = time.monotonic() + self._wait_timeout
            while not view.ready_for(self.selectors):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._event.clear()
                await wait_event(self._event, left)
            update = view.update_for(self.selectors)
            self._last = _fingerprint(update)
            return update
        while True:
            await self._event.wait()
            self._event.clear()
            if not view.ready_for(self.selectors):
                # An SVID was dropped and is being signed again (a CRL revoked its serial):
                # wait for the replacement (bounded) rather than report "no identity".
                deadline = time.monotonic() + self._wait_timeout
                while not view.ready_for(self.selectors):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._event.clear()
                    await wait_event(self._event, left)
            update = view.update_for(self.selectors)
            fingerprint = _fingerprint(update)
            if fingerprint != self._last:
                self._last = fingerprint
                return update

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._owner.discard(self)


class BundleSubscription:
    """A stream of (own bundle, federated bundles)."""

    def __init__(self, owner: Subscriptions) -> None:
        self._owner = owner
        self._event = asyncio.Event()
        self._first = True
        self._last: tuple[Bundle, dict[str, Bundle], tuple[bytes, ...]] | None = None

    def notify(self) -> None:
        self._event.set()

    async def next(self) -> tuple[Bundle, Mapping[str, Bundle]]:
        """The bundles now (first call), then again whenever they or the CRLs change."""
        if not self._first:
            while True:
                await self._event.wait()
                self._event.clear()
                if self._current() != self._last:
                    break
        self._first = False
        self._last = self._current()
        return self._last[0], self._last[1]

    def _current(self) -> tuple[Bundle, dict[str, Bundle], tuple[bytes, ...]]:
        bundles = self._owner.view.trust_bundles()
        return bundles.bundle, dict(bundles.federated), bundles.crls.der

    def close(self) -> None:
        self._owner.discard(self)


class Subscriptions:
    """The open subscriptions on one cache."""

    def __init__(self, view: WorkloadView, wait_timeout: float) -> None:
        self.view = view
        self._wait_timeout = wait_timeout
        self._svids: set[Subscription] = set()
        self._bundles: set[BundleSubscription] = set()

    def subscribe(self, selectors: frozenset[Selector]) -> Subscription:
        sub = Subscription(self, frozenset(selectors), self._wait_timeout)
        self._svids.add(sub)
        return sub

    def subscribe_bundles(self) -> BundleSubscription:
        sub = BundleSubscription(self)
        self._bundles.add(sub)
        return sub

    def discard(self, sub: Subscription | BundleSubscription) -> None:
        if isinstance(sub, Subscription):
            self._svids.discard(sub)
        else:
            self._bundles.discard(sub)

    def selectors(self) -> Iterator[frozenset[Selector]]:
        """The selectors of every open identity subscription."""
        for sub in list(self._svids):
            yield sub.selectors

    def notify(self) -> None:
        """Identities may have changed: every identity subscription looks again."""
        for sub in list(self._svids):
            sub.notify()

    def notify_bundles(self) -> None:
        """Bundles changed: every bundle subscription looks again."""
        for sub in list(self._bundles):
            sub.notify()
