"""Handing the bundle publishers the trust bundle whenever it changes.

:class:`BundlePublishing` runs beside the server's other loops. It publishes once at
start, then again whenever the trust domain's bundle changes. It learns of changes from
the server's change feed (:class:`~server.authorization.EntryCache`, which sees
``bundle_updated`` events of this server at once and of other servers sharing the
database within its poll interval), and it always publishes the bundle as stored *now*,
not the one an event announced, so servers racing to publish converge on the newest.

A plugin that fails (:class:`~server.bundle_publisher.errors.PublishFailed`: the
Kubernetes API unreachable, RBAC missing) is logged and tried again after an exponential
backoff with jitter (:data:`RETRY_INITIAL` doubling up to :data:`RETRY_CAP`); the other
plugins and the server carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from credo.bundle import Bundle
from credo.errors import CredoError
from server.authorization import EntryCache, Subscription
from server.bundle_publisher.errors import PublishFailed
from server.bundle_publisher.protocol import BundlePublisherPlugin
from server.datastore.models import EventKind

__all__ = ["RETRY_CAP", "RETRY_INITIAL", "BundlePublishing"]

log = logging.getLogger(__name__)

RETRY_INITIAL = 1.0
"""Seconds before the first retry of a failed publication."""
RETRY_CAP = 60.0
"""The longest wait between retries."""
_JITTER = 0.2


@dataclass
class _Plugin:
    publisher: BundlePublisherPlugin
    due_at: float | None = 0.0
    """When to publish next (monotonic); None when the copy is current."""
    failures: int = 0


class BundlePublishing:
    """Publishes the bundle with every configured plugin, at start and on every change."""

    def __init__(
        self,
        publishers: Sequence[BundlePublisherPlugin],
        current_bundle: Callable[[], Bundle],
        feed: EntryCache,
        trust_domain: str,
        *,
        retry_initial: float = RETRY_INITIAL,
        retry_cap: float = RETRY_CAP,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._plugins = [_Plugin(p) for p in publishers]
        self._current_bundle = current_bundle
        self._feed = feed
        self._trust_domain = trust_domain
        self._retry_initial = retry_initial
        self._retry_cap = retry_cap
        self._rng = rng

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``; never raises for a plugin's failure."""
        if not self._plugins:
            return
        subscription = self._feed.subscribe()
        try:
            while not stop.is_set():
                await self._publish_due()
                if await self._wait(subscription, stop):
                    now = time.monotonic()
                    for plugin in self._plugins:
                        plugin.due_at = now
        finally:
            self._feed.unsubscribe(subscription)

    async def _publish_due(self) -> None:
        now = time.monotonic()
        due = [p for p in self._plugins if p.due_at is not None and p.due_at <= now]
        if not due:
            return
        try:
            bundle = await asyncio.to_thread(self._current_bundle)
        except (CredoError, OSError) as err:
            for plugin in due:
                self._failed(plugin, f"cannot read the bundle: {err}")
            return
        for plugin in due:
            try:
                written = await asyncio.to_thread(plugin.publisher.publish, bundle)
            except PublishFailed as err:
                self._failed(plugin, err.reason)
                continue
            plugin.due_at = None
            fields = {
                "publisher": plugin.publisher.name,
                "destination": plugin.publisher.destination,
                "sequence_number": bundle.sequence_number,
            }
            if plugin.failures:
                fields["failures"] = plugin.failures
                log.info("bundle publishing recovered", extra=fields)
            elif written:
                log.info("published bundle", extra=fields)
            plugin.failures = 0

    def _failed(self, plugin: _Plugin, reason: str) -> None:
        base = min(self._retry_cap, self._retry_initial * 2.0 ** min(plugin.failures, 32))
        delay = min(self._retry_cap, base * (1.0 + _JITTER * (2.0 * self._rng() - 1.0)))
        plugin.failures += 1
        plugin.due_at = time.monotonic() + delay
        log.warning(
            "bundle publishing failed; retrying",
            extra={
                "publisher": plugin.publisher.name,
                "destination": plugin.publisher.destination,
                "error": reason,
                "retry_in": round(delay, 1),
                "failures": plugin.failures,
            },
        )

    async def _wait(self, subscription: Subscription, stop: asyncio.Event) -> bool:
        """Wait for a change of this trust domain's bundle, the next retry, or ``stop``;
        True when the bundle changed."""
        due = [p.due_at for p in self._plugins if p.due_at is not None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        changed = asyncio.ensure_future(subscription.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {changed, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (changed, stopped):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not changed.done() or changed.cancelled():
            return False
        return any(
            e.kind is EventKind.BUNDLE_UPDATED and e.subject == self._trust_domain
            for e in changed.result()
        )
