"""Which registration entries an agent may see and sign for: an in-memory entry index.

Authorized for an agent (as SPIRE):

* entries whose ``parent_id`` is the agent's SPIFFE ID;
* entries whose ``parent_id`` is the SPIFFE ID of a node-alias entry whose selectors
  are a subset of the agent's node selectors;
* every descendant of those: entries whose ``parent_id`` is the SPIFFE ID of an
  authorized entry, transitively (cycles are harmless: each SPIFFE ID is expanded once).

Expired entries (``expires_at`` in the past) and revoked entries (``entry revoke``, the
kill switch) are never authorized; the descendants of a revoked entry still are.

:class:`EntryIndex` is the synchronous data structure. :class:`EntryCache` keeps one
loaded from the datastore and current with its change feed: the datastore listener
only wakes the cache, which then reads ``list_events`` after the last applied id (so
batches arriving out of order, or writes by another server on the same database, which
a slower poll finds, are applied once and in order). Applied entry changes are kept in
a bounded history so a sync stream can resume from an event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from credo._reserved import AGENT_PATH_PREFIX
from credo.selector import Selector
from server.datastore.models import Event, EventKind, RegistrationEntry
from server.datastore.protocol import DataStore

__all__ = ["EntryCache", "EntryChange", "EntryIndex", "Subscription"]

log = logging.getLogger(__name__)

_ENTRY_EVENTS = frozenset(
    {EventKind.ENTRY_CREATED, EventKind.ENTRY_UPDATED, EventKind.ENTRY_DELETED}
)
_NODE_EVENTS = frozenset({EventKind.NODE_CREATED, EventKind.NODE_UPDATED, EventKind.NODE_DELETED})


def _names_agent(spiffe_id: str) -> bool:
    """Whether ``spiffe_id`` (``spiffe://<td>/<path>``) has a node agent's path."""
    parts = spiffe_id.split("/", 3)
    return len(parts) == 4 and f"/{parts[3]}".startswith(AGENT_PATH_PREFIX)


def _concerns(agents: set[str] | None, *versions: RegistrationEntry | None) -> set[str] | None:
    """``agents`` plus the agents a change of an entry (its ``versions``, old and new) may
    concern; None when that may be any agent.

    An entry whose parent is a node agent's SPIFFE ID is authorized for that agent only,
    and so are the descendants it brings: they are reached through the entry's SPIFFE ID,
    which other agents reach (or not) through entries of their own, unchanged. (No entry
    can have an agent's SPIFFE ID as its own: the ``/credo/`` paths are reserved.) Any
    other change — a node alias, an entry under another entry or under the server — may
    concern every agent.
    """
    if agents is None:
        return None
    for entry in versions:
        if entry is None:
            continue
        if entry.node_alias or not _names_agent(entry.parent_id):
            return None
        agents.add(entry.parent_id)
    return agents


class EntryIndex:
    """All registration entries, indexed by id, by parent and (node aliases) by selector."""

    def __init__(self, entries: Iterable[RegistrationEntry] = ()) -> None:
        self._entries: dict[str, RegistrationEntry] = {}
        self._by_parent: dict[str, set[str]] = {}
        self._alias_by_selector: dict[Selector, set[str]] = {}
        self.revoked: set[str] = set()
        """Ids of revoked entries (never authorized); kept only for entries in the index."""
        # put() inlined for entries not yet in the index (a load: a million of them).
        by_id, by_parent, put = self._entries, self._by_parent, self.put
        for entry in entries:
            if entry.node_alias or entry.id in by_id:
                put(entry)
                continue
            by_id[entry.id] = entry
            siblings = by_parent.get(entry.parent_id)
            if siblings is None:
                by_parent[entry.parent_id] = {entry.id}
            else:
                siblings.add(entry.id)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, entry_id: str) -> RegistrationEntry | None:
        return self._entries.get(entry_id)

    def revoke(self, entry_id: str) -> None:
        """Mark the entry revoked (ignored when it is not in the index)."""
        if entry_id in self._entries:
            self.revoked.add(entry_id)

    def put(self, entry: RegistrationEntry) -> RegistrationEntry | None:
        """Add or replace ``entry``; return the version it replaced."""
        was_revoked = entry.id in self.revoked
        old = self.remove(entry.id)
        if was_revoked:
            self.revoked.add(entry.id)
        self._entries[entry.id] = entry
        self._by_parent.setdefault(entry.parent_id, set()).add(entry.id)
        if entry.node_alias:
            for selector in entry.selectors:
                self._alias_by_selector.setdefault(selector, set()).add(entry.id)
        return old

    def remove(self, entry_id: str) -> RegistrationEntry | None:
        """Drop the entry; return it (None if it was not there)."""
        old = self._entries.pop(entry_id, None)
        if old is None:
            return None
        self.revoked.discard(entry_id)
        siblings = self._by_parent.get(old.parent_id)
        if siblings is not None:
            siblings.discard(entry_id)
            if not siblings:
                del self._by_parent[old.parent_id]
        if old.node_alias:
            for selector in old.selectors:
                ids = self._alias_by_selector.get(selector)
                if ids is not None:
                    ids.discard(entry_id)
                    if not ids:
                        del self._alias_by_selector[selector]
        return old

    def matching_aliases(self, node_selectors: Iterable[Selector]) -> list[RegistrationEntry]:
        """Node-alias entries whose selectors are all among ``node_selectors``."""
        have = set(node_selectors)
        candidates: set[str] = set()
        for selector in have:
            candidates |= self._alias_by_selector.get(selector, set())
        found = []
        for entry_id in candidates:
            entry = self._entries[entry_id]
            if entry.selectors and set(entry.selectors) <= have:
                found.append(entry)
        return found

    def authorized(
        self, agent_id: str, node_selectors: Iterable[Selector], now: float | None = None
    ) -> dict[str, RegistrationEntry]:
        """The entries authorized for the agent, by id."""
        now = time.time() if now is None else now
        roots = [agent_id]
        roots.extend(
            alias.spiffe_id
            for alias in self.matching_aliases(node_selectors)
            if not (alias.expires_at and alias.expires_at <= now)
        )
        return self._descendants(roots, now)

    def descendant_ids(self, parent_ids: Iterable[str]) -> set[str]:
        """Ids of every entry below any of ``parent_ids`` (expired ones included)."""
        return set(self._descendants(parent_ids, None))

    def _descendants(
        self, parent_ids: Iterable[str], now: float | None
    ) -> dict[str, RegistrationEntry]:
        found: dict[str, RegistrationEntry] = {}
        queue = deque(parent_ids)
        expanded = set(queue)
        by_parent, entries = self._by_parent, self._entries
        revoked = self.revoked if now is not None else set()
        while queue:
            for entry_id in by_parent.get(queue.popleft(), ()):
                if entry_id in found:
                    continue
                entry = entries[entry_id]
                if now is not None and entry.expires_at and entry.expires_at <= now:
                    continue
                if entry_id not in revoked:
                    found[entry_id] = entry
                if entry.spiffe_id not in expanded:
                    expanded.add(entry.spiffe_id)
                    queue.append(entry.spiffe_id)
        return found


@dataclass(frozen=True)
class EntryChange:
    """One applied entry change: its event, and the entry before and after (None: absent)."""

    event_id: int
    entry_id: str
    old: RegistrationEntry | None
    new: RegistrationEntry | None


@dataclass(eq=False)
class Subscription:
    """A sync stream's view of the feed: ``wait`` returns the events applied since.

    With an ``agent_id`` it is woken only by events that may change what that agent is
    authorized for or must be told (:meth:`EntryCache.subscribe`); without one, by all.
    """

    agent_id: str = ""
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _events: list[Event] = field(default_factory=list)

    def _push(self, events: Sequence[Event]) -> None:
        self._events.extend(events)
        self._wake.set()

    async def wait(self) -> list[Event]:
        """Block until the cache applied new events; return them (entry, node, bundle)."""
        await self._wake.wait()
        self._wake.clear()
        events, self._events = self._events, []
        return events


class EntryCache:
    """An :class:`EntryIndex` loaded from the datastore and kept current with its events."""

    def __init__(
        self,
        datastore: DataStore,
        *,
        poll_interval: float = 1.0,
        history_limit: int = 100_000,
    ) -> None:
        self._ds = datastore
        self._poll_interval = poll_interval
        self.index = EntryIndex()
        self.event_id = 0
        # Entry changes applied since the cache loaded; resume works after _history_start.
        self._history: deque[EntryChange] = deque()
        self._node_events: deque[Event] = deque()
        self._history_limit = history_limit
        self._history_start = 0
        self._subscribers: set[Subscription] = set()
        self._by_agent: dict[str, set[Subscription]] = {}
        self.bundle_events = 0
        """Bundle events applied so far (the server identity re-reads the bundle when moved)."""
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._remove_listener: object = None
        self.version = 0

    # --- lifecycle ----------------------------------------------------------------

    def load(self) -> None:
        """Read every entry; events written while loading are applied by the next catch-up."""
        started = time.perf_counter()
        latest = self._ds.fetch_latest_event_id()
        entries = self._ds.list_registration_entries().entries
        revoked = self._ds.list_revoked_entry_ids()
        # The index adds a few million containers; a generation-2 collection while it
        # grows walks them all again (the datastore pauses it the same way for its load).
        collecting = gc.isenabled()
        gc.disable()
        try:
            self.index = EntryIndex(entries)
        finally:
            if collecting:
                gc.enable()
        for entry_id in revoked:
            self.index.revoke(entry_id)
        self.event_id = self._history_start = latest
        log.info(
            "loaded registration entries",
            extra={"entries": len(entries), "seconds": round(time.perf_counter() - started, 3)},
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Apply the change feed until ``stop``: woken by the datastore, polled as a fallback."""
        loop = asyncio.get_running_loop()
        wake = self._ensure_wake()

        def on_commit(_events: list[Event]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(wake.set)

        remove = self._ds.add_listener(on_commit)
        try:
            while not stop.is_set():
                waiter = asyncio.ensure_future(wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait(
                        {waiter, stopper},
                        timeout=self._poll_interval,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    # Cancelled and awaited however the wait ends: none is left pending.
                    waiter.cancel()
                    stopper.cancel()
                    await asyncio.gather(waiter, stopper, return_exceptions=True)
                if stop.is_set():
                    break
                wake.clear()
                try:
                    await self.catch_up()
                except Exception:
                    # A datastore hiccup must not end the feed; the next wake or poll retries.
                    log.exception("applying registration entry changes failed")
        finally:
            remove()

    def _ensure_wake(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    def _ensure_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # --- feed -----------------------------------------------------------------------

    async def catch_up(self) -> int:
        """Apply every event after :attr:`event_id`; return the new event id."""
        async with self._ensure_lock():
            while True:
                events = await asyncio.to_thread(self._ds.list_events, self.event_id, 5000)
                if not events:
                    return self.event_id
                await self._apply(events)

    async def _apply(self, events: list[Event]) -> None:
        entry_ids = {e.subject for e in events if e.kind in _ENTRY_EVENTS}
        fetched = (
            await asyncio.to_thread(self._ds.fetch_registration_entries, entry_ids)
            if entry_ids
            else {}
        )
        done: set[str] = set()
        # The agents these events concern; None: possibly every agent (see _concerns).
        agents: set[str] | None = set()
        for event in events:
            if event.kind in _ENTRY_EVENTS:
                if event.subject in done:
                    continue
                done.add(event.subject)
                new = fetched.get(event.subject)
                old = self.index.put(new) if new is not None else self.index.remove(event.subject)
                self._remember(EntryChange(event.id, event.subject, old, new))
                agents = _concerns(agents, old, new)
            elif event.kind is EventKind.ENTRY_REVOKED:
                revoked = self.index.get(event.subject)
                if revoked is not None:
                    self.index.revoke(event.subject)
                    self._remember(EntryChange(event.id, event.subject, revoked, revoked))
                    agents = _concerns(agents, revoked, revoked)
            elif event.kind in _NODE_EVENTS:
                self._node_events.append(event)
                if len(self._node_events) > self._history_limit:
                    dropped = self._node_events.popleft()
                    self._history_start = max(self._history_start, dropped.id)
                if agents is not None:
                    agents.add(event.subject)
            else:
                agents = None  # bundles, CRLs, revoked JWT-SVIDs: every agent is told
                if event.kind in (EventKind.BUNDLE_UPDATED, EventKind.BUNDLE_DELETED):
                    self.bundle_events += 1
        self.event_id = events[-1].id
        self.version += 1
        if agents is None:
            woken: Iterable[Subscription] = list(self._subscribers)
        else:
            woken = [sub for a in agents for sub in self._by_agent.get(a, ())]
            woken += [sub for sub in self._subscribers if not sub.agent_id]
        for sub in woken:
            sub._push(events)

    def _remember(self, change: EntryChange) -> None:
        self._history.append(change)
        while len(self._history) > self._history_limit:
            dropped = self._history.popleft()
            self._history_start = dropped.event_id
        while self._node_events and self._node_events[0].id <= self._history_start:
            self._node_events.popleft()

    def subscribe(self, agent_id: str = "") -> Subscription:
        """A subscription to the feed: for the stream of ``agent_id``, woken only by the
        events that concern that agent; without it, by every event."""
        sub = Subscription(agent_id)
        self._subscribers.add(sub)
        if agent_id:
            self._by_agent.setdefault(agent_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        subs = self._by_agent.get(sub.agent_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_agent[sub.agent_id]

    # --- resume -----------------------------------------------------------------------

    def changed_since(self, event_id: int, agent_id: str) -> set[str] | None:
        """Ids of entries whose authorization or content may differ since ``event_id``.

        ``None`` when that cannot be worked out (the event is older than the history,
        newer than what was applied, or the agent's own node record changed since): the
        caller then sends the full set.
        """
        if event_id < self._history_start or event_id > self.event_id:
            return None
        if any(e.id > event_id and e.subject == agent_id for e in self._node_events):
            return None
        touched: set[str] = set()
        spiffe_ids: set[str] = set()
        for change in reversed(self._history):
            if change.event_id <= event_id:
                break
            touched.add(change.entry_id)
            for version in (change.old, change.new):
                if version is not None:
                    spiffe_ids.add(version.spiffe_id)
        return touched | self.index.descendant_ids(spiffe_ids)
