"""What each agent sees: its authorized entries (memoised) and its ``SyncEntries`` stream.

:class:`AuthorizedEntries` answers "which entries may this agent sign for" (signing calls
and ``GetBundle`` ask it), memoised per agent until the entry cache moves, the agent's node
selectors change, or the first entry (or node alias) it relied on expires. See
:mod:`server.authorization` for the rule itself.

:class:`SyncView` computes an agent's entry stream (the API turns each
:class:`SyncMessage` into a ``SyncEntriesResponse``):

* the first message has ``full=True`` and the whole authorized set (split over several
  messages above :data:`SYNC_CHUNK` entries: the first has ``full=True`` and
  ``event_id=0``, the following ones ``full=False``, and only the last carries the event
  id; an agent must not resume from a message with ``event_id=0``);
* with ``resume_after_event_id=N`` the server replays what changed after ``N`` instead of
  the full set, when it still has that history; otherwise it sends the full set;
* then, whenever the change feed moves, what changed for this agent: created or updated
  entries, ``deleted_entry_ids`` for entries deleted, revoked or no longer authorized, the
  bundles when a bundle changed or the set of federated trust domains did, and the CRLs
  (all of them) when one changed, and the revoked JWT-SVIDs' ``jti``s when one was
  revoked; the first message always carries the CRLs and the revoked ``jti``s;
* when the stream has been quiet for ``heartbeat_interval`` seconds, a heartbeat: no
  changes, the server's current event id and the digest of every entry authorized for
  the agent (:func:`credo._protocol.entries_digest`; a change whose wake-up was lost goes
  out just before it), so that an agent can tell that it is behind and that the stream
  is alive;
* the stream ends (an :class:`~server.agents.errors.AgentRefused`) when the agent SVID it
  was opened with expires, its authority is revoked, or the agent is evicted or banned;
  and (:class:`~server.agents.errors.ServerStopping`) when the server shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Final

from credo._protocol import entries_digest
from server.agents.authn import AgentAuthenticator, Caller
from server.agents.errors import (
    AgentBanned,
    AgentEvicted,
    AgentSvidExpired,
    EntryNotAuthorized,
    ServerStopping,
    UntrustedAuthority,
)
from server.authorization import EntryCache, Subscription
from server.datastore.models import Authority, Event, EventKind, RegistrationEntry
from server.datastore.protocol import DataStore

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "SYNC_CHUNK",
    "AuthorizedEntries",
    "SyncMessage",
    "SyncView",
    "federated_names",
]

log = logging.getLogger(__name__)

SYNC_CHUNK: Final = 5000
DEFAULT_HEARTBEAT_INTERVAL: Final = 5.0
_MAX_MEMO: Final = 1024
_BUNDLE_EVENTS = frozenset({EventKind.BUNDLE_UPDATED, EventKind.BUNDLE_DELETED})
_NODE_EVENTS = frozenset({EventKind.NODE_CREATED, EventKind.NODE_UPDATED, EventKind.NODE_DELETED})


def federated_names(entries: Iterable[RegistrationEntry]) -> frozenset[str]:
    """The trust domains the entries federate with."""
    names: set[str] = set()
    for entry in entries:
        names.update(entry.federates_with)
    return frozenset(names)


class AuthorizedEntries:
    """Each agent's authorized entries, memoised per cache version and node selectors."""

    def __init__(self, cache: EntryCache) -> None:
        self._cache = cache
        self._memo: OrderedDict[
            str, tuple[int, tuple[object, ...], dict[str, RegistrationEntry], float]
        ] = OrderedDict()

    def of(self, caller: Caller) -> dict[str, RegistrationEntry]:
        """The caller's authorized entries, by id.

        A memo is good only until the first expiry among the entries (and node aliases)
        it relied on: an entry that expires later is no longer authorized, nor its children.
        """
        key = (caller.node.selectors,)
        now = time.time()
        cached = self._memo.get(caller.agent_id)
        if (
            cached is not None
            and cached[0] == self._cache.version
            and cached[1] == key
            and now < cached[3]
        ):
            self._memo.move_to_end(caller.agent_id)
            return cached[2]
        index = self._cache.index
        found = index.authorized(caller.agent_id, caller.node.selectors, now)
        valid_until = min(
            [e.expires_at for e in found.values() if e.expires_at]
            + [
                a.expires_at
                for a in index.matching_aliases(caller.node.selectors)
                if a.expires_at > now
            ],
            default=float("inf"),
        )
        self._memo[caller.agent_id] = (self._cache.version, key, found, valid_until)
        while len(self._memo) > _MAX_MEMO:
            self._memo.popitem(last=False)
        return found

    async def including(
        self, caller: Caller, entry_ids: Iterable[str]
    ) -> dict[str, RegistrationEntry]:
        """:meth:`of`, after catching the cache up once if an id in ``entry_ids`` is missing
        (the entry may be newer than the cache)."""
        authorized = self.of(caller)
        if any(i not in authorized for i in entry_ids):
            await self._cache.catch_up()
            authorized = self.of(caller)
        return authorized

    async def entry(self, caller: Caller, entry_id: str) -> RegistrationEntry:
        """The authorized entry ``entry_id``; :class:`EntryNotAuthorized` if it is not one."""
        entry = (await self.including(caller, [entry_id])).get(entry_id)
        if entry is None:
            raise EntryNotAuthorized(entry_id)
        return entry


@dataclass(frozen=True)
class SyncMessage:
    """One message of an agent's entry stream.

    ``bundles``: None when the message carries no bundle; otherwise the trust domains
    whose federated bundles go with the trust domain's own bundle.
    """

    event_id: int
    full: bool
    entries: list[RegistrationEntry]
    deleted_entry_ids: list[str]
    bundles: frozenset[str] | None
    crls: bool = False
    """True: the message carries every X.509 authority's current CRL."""
    revoked_jwts: bool = False
    """True: the message carries every revoked, unexpired JWT-SVID's ``jti``."""
    digest: bytes = b""
    """Set on heartbeats only (no changes): :func:`credo._protocol.entries_digest` of every
    entry authorized for the agent, as of ``event_id``."""


def _full_messages(
    entries: list[RegistrationEntry], event_id: int, federated: frozenset[str]
) -> list[SyncMessage]:
    chunks = [entries[i : i + SYNC_CHUNK] for i in range(0, len(entries), SYNC_CHUNK)] or [[]]
    messages = []
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        messages.append(
            SyncMessage(
                event_id=event_id if last else 0,
                full=n == 0,
                entries=chunk,
                deleted_entry_ids=[],
                bundles=federated if n == 0 else None,
                crls=n == 0,
                revoked_jwts=n == 0,
            )
        )
    return messages


class SyncView:
    """Computes the ``SyncEntries`` stream of each agent from the entry cache."""

    def __init__(
        self,
        cache: EntryCache,
        datastore: DataStore,
        authn: AgentAuthenticator,
        stopping: asyncio.Event | None = None,
        *,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    ) -> None:
        self._cache = cache
        self._ds = datastore
        self._authn = authn
        self._stopping = stopping or asyncio.Event()
        self.heartbeat_interval = heartbeat_interval
        """Seconds of quiet after which a stream carries a heartbeat; 0: never."""
        self._journal: tuple[int, asyncio.Future[list[Authority]]] | None = None

    @property
    def feed_position(self) -> int:
        """The last event id the entry cache applied (what the streams have been told of)."""
        return self._cache.event_id

    async def stream(
        self, caller: Caller, resume_after_event_id: int
    ) -> AsyncGenerator[SyncMessage, None]:
        """The messages for ``caller``'s stream, until it must end (see the module doc)."""
        agent_id = caller.agent_id
        sub = self._cache.subscribe(agent_id)
        started = time.monotonic()
        sent_messages = 0
        reason = "closed by the agent"
        try:
            messages = self._messages(caller, sub, resume_after_event_id)
            async with contextlib.aclosing(messages):
                async for message in messages:
                    sent_messages += 1
                    yield message
        except (AgentSvidExpired, UntrustedAuthority, AgentEvicted, AgentBanned) as exc:
            reason = str(exc)
            raise
        except ServerStopping:
            reason = "server stopping"
            raise
        except asyncio.CancelledError:
            reason = "cancelled (the agent went away)"
            raise
        except Exception as exc:
            reason = f"failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._cache.unsubscribe(sub)
            log.info(
                "agent sync ended",
                extra={
                    "agent_id": agent_id,
                    "reason": reason,
                    "messages": sent_messages,
                    "event_id": self._cache.event_id,
                    "seconds": round(time.monotonic() - started, 1),
                },
            )

    async def _messages(
        self, caller: Caller, sub: Subscription, resume_after_event_id: int
    ) -> AsyncGenerator[SyncMessage, None]:
        agent_id, node = caller.agent_id, caller.node
        heartbeat = self.heartbeat_interval
        # Read-your-writes: an entry committed just before this call is in the first
        # message, not only in the push that follows the cache's next wake-up.
        await self._cache.catch_up()
        authorized = self._cache.index.authorized(agent_id, node.selectors)
        event_id = self._cache.event_id
        federated = federated_names(authorized.values())
        resume = resume_after_event_id
        candidates = self._cache.changed_since(resume, agent_id) if resume > 0 else None
        if candidates is not None:
            yield SyncMessage(
                event_id=event_id,
                full=False,
                entries=[authorized[i] for i in sorted(candidates) if i in authorized],
                deleted_entry_ids=sorted(i for i in candidates if i not in authorized),
                bundles=federated,
                crls=True,
                revoked_jwts=True,
            )
        else:
            for message in _full_messages(list(authorized.values()), event_id, federated):
                yield message
        log.info(
            "agent sync started",
            extra={
                "agent_id": agent_id,
                "entries": len(authorized),
                "event_id": event_id,
                "resume_after_event_id": resume,
                "resumed": candidates is not None,
                "heartbeat_interval": heartbeat,
            },
        )
        sent = {i: e.revision_number for i, e in authorized.items()}
        # The cache version and event id ``sent`` was computed at (they move together).
        seen_version, seen_event_id = self._cache.version, event_id
        cert = caller.certificate
        expires = cert.not_valid_after_utc.timestamp()
        last_sent = time.monotonic()
        while True:
            wait = expires - time.time()
            if heartbeat > 0:
                wait = min(wait, heartbeat - (time.monotonic() - last_sent))
            events = await self._next_events(sub, wait)
            if time.time() >= expires:
                # The stream outlived the SVID it was opened with: the agent must come
                # back with its renewed one (its next call would be refused anyway).
                raise AgentSvidExpired("agent SVID expired; reconnect")
            events = events or []
            if any(e.kind in _BUNDLE_EVENTS for e in events) and not self._authn.issued_by_one_of(
                cert, await self._x509_journal()
            ):
                raise UntrustedAuthority(
                    "agent SVID was signed by an authority that is no longer trusted"
                )
            if any(e.kind in _NODE_EVENTS and e.subject == agent_id for e in events):
                fresh = await asyncio.to_thread(self._ds.fetch_attested_node, agent_id)
                if fresh is None:
                    raise AgentEvicted("agent was evicted")
                if fresh.banned:
                    raise AgentBanned()
                node = fresh
            if events or self._cache.version != seen_version:
                # Also on a heartbeat round when the cache moved: a change whose wake-up
                # was lost still goes out, at the latest with the next heartbeat.
                authorized = self._cache.index.authorized(agent_id, node.selectors)
                seen_version, seen_event_id = self._cache.version, self._cache.event_id
                changed = [e for i, e in authorized.items() if sent.get(i) != e.revision_number]
                deleted = sorted(i for i in sent if i not in authorized)
                names = federated_names(authorized.values())
                bundle_changed = any(e.kind in _BUNDLE_EVENTS for e in events)
                crls_changed = any(e.kind is EventKind.CRL_UPDATED for e in events)
                jwts_changed = any(e.kind is EventKind.JWT_SVIDS_REVOKED for e in events)
                bundles: frozenset[str] | None = None
                if bundle_changed or names != federated:
                    bundles = federated = names
                if changed or deleted or bundles is not None or crls_changed or jwts_changed:
                    sent = {i: e.revision_number for i, e in authorized.items()}
                    last_sent = time.monotonic()
                    yield SyncMessage(
                        event_id=seen_event_id,
                        full=False,
                        entries=changed,
                        deleted_entry_ids=deleted,
                        bundles=bundles,
                        crls=crls_changed,
                        revoked_jwts=jwts_changed,
                    )
            if heartbeat > 0 and time.monotonic() - last_sent >= heartbeat:
                last_sent = time.monotonic()
                # The event id ``sent`` is current for, not the cache's latest: the cache
                # may have moved while the last message was sent (its changes go next).
                yield SyncMessage(
                    event_id=seen_event_id,
                    full=False,
                    entries=[],
                    deleted_entry_ids=[],
                    bundles=None,
                    digest=entries_digest(sent.items()),
                )

    async def _x509_journal(self) -> list[Authority]:
        """The X.509 authorities of the CA journal, read once per feed position.

        A bundle change wakes every stream at once, and each checks its agent's SVID
        against the journal: they share one read made at (or past) the position that woke
        them, as fresh as a read of each stream's own.
        """
        position = self._cache.event_id
        held = self._journal
        if (
            held is None
            or held[0] != position
            or (held[1].done() and (held[1].cancelled() or held[1].exception() is not None))
        ):
            held = (
                position,
                asyncio.ensure_future(asyncio.to_thread(self._ds.list_authorities, "x509")),
            )
            self._journal = held
        return await asyncio.shield(held[1])

    async def _next_events(self, sub: Subscription, timeout: float) -> list[Event] | None:
        """The next events for ``sub``; None when none came within ``timeout`` seconds.

        Raises :class:`ServerStopping` once the server stops. Both helper tasks are
        cancelled *and awaited* however this ends (the stream cancelled by the agent going
        away included): a task left pending is destroyed with the stream ("Task was
        destroyed but it is pending!") instead of being cleaned up.
        """
        if self._stopping.is_set():
            raise ServerStopping()
        waiter = asyncio.ensure_future(sub.wait())
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, stopper}, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
            stopper.cancel()
            await asyncio.gather(waiter, stopper, return_exceptions=True)
        if waiter in done:
            return waiter.result()
        if stopper in done:
            raise ServerStopping()
        return None
