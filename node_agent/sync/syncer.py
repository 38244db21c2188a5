"""Keeps the server's ``SyncEntries`` stream open and hands each change to a listener.

The first message of a stream is the full authorized set (or, when resuming, the changes
after ``resume_after_event_id``; the server may answer a resume with a full set). On any
error the stream is reopened from the last event id after the server client's backoff
(exponential, jitter, cap), moving on to the next server address. A ban ends the agent;
nothing else does (not even a bug in one message).

Staying current, not only connected:

* a new agent SVID, or a trust bundle that no longer trusts an authority (the server
  client rebuilds its channels and retires the old ones, cancelling their calls after a
  grace) moves the stream to the new channel at once, resuming from the last event id; a
  bundle that only adds authorities (a CA rotation's prepared CA) leaves the stream where
  it is (its connection was verified against authorities all still trusted);
* the server sends a heartbeat when the stream has been quiet for its heartbeat
  interval, with its current event id and the digest of the entries it holds for the
  agent: equal digests move the agent's event id up; different ones mean the agent is
  behind, and it syncs the full set again (once per differing digest);
* a stream that carries nothing, not even a heartbeat, for three heartbeat intervals is
  dead (a half-open connection): it is closed and reopened after the backoff.
The stream itself, its messages and its errors are the server client's
(:meth:`node_agent.server_client.ServerClient.sync`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from cryptography import x509

from node_agent._wait import wait_event
from node_agent.errors import AgentRemoved, ServerClientError, ServerUnreachable
from node_agent.server_client import Backoff
from node_agent.sync.entries import RegistrationEntry, SyncMessage, SyncState, TrustBundles

__all__ = ["EntrySyncer", "SyncClient", "SyncListener", "TrustListener"]

log = logging.getLogger(__name__)


class SyncClient(Protocol):
    """What the syncer needs from the server client."""

    @property
    def address(self) -> str:
        """The server address calls currently go to."""
        ...

    def sync(self, resume_after_event_id: int = 0) -> AsyncIterator[SyncMessage]:
        """The stream of sync messages from the current server."""
        ...

    def failover(self, error: str = "") -> str:
        """Move to the next server address."""
        ...

    def backoff(self) -> Backoff:
        """A fresh backoff for one retry loop."""
        ...

    def credentials_changed(self) -> asyncio.Event:
        """An event set the next time the agent SVID or trust bundle is replaced."""
        ...

    def channels_replaced(self) -> asyncio.Event:
        """An event set the next time open streams must move to new channels."""
        ...


class SyncListener(Protocol):
    """Receives the synced state (the SVID cache)."""

    def update_entries(self, entries: Mapping[str, RegistrationEntry]) -> None:
        """The full current entry set (a copy the listener may keep)."""
        ...

    def update_bundles(self, bundles: TrustBundles) -> None:
        """The current own bundle, its tainted authorities and the federated bundles."""
        ...

    def set_connected(self, connected: bool) -> None:
        """Whether the sync stream is currently up."""
        ...


class TrustListener(Protocol):
    """Receives the X.509 authorities to trust for the server (the agent session)."""

    def set_authorities(
        self, authorities: tuple[x509.Certificate, ...], tainted: frozenset[bytes] = ...
    ) -> None:
        """Trust these X.509 authorities for the server from now on (DER of tainted ones)."""
        ...


class _Reopen(Exception):
    """Why the syncer ends a healthy-looking stream itself and opens another."""

    def __init__(self, reason: str, *, full: bool = False, backoff: bool = False) -> None:
        super().__init__(reason)
        self.full = full
        """Ask for the full set (not a resume): the agent is behind."""
        self.backoff = backoff
        """Wait out the backoff first (the stream looked dead) rather than reopen at once."""


class EntrySyncer:
    """Holds the entry stream open for the agent's whole life."""

    def __init__(self, client: SyncClient, listener: SyncListener, trust: TrustListener) -> None:
        self.client = client
        self.listener = listener
        self.trust = trust
        self.state = SyncState()
        self.synced = asyncio.Event()
        """Set once the first full set has been applied."""
        self.streams = 0
        """Streams opened so far."""
        self.resyncs = 0
        """Times a heartbeat showed the agent behind and it synced the full set again."""
        self._last_message = 0.0
        self._interval = 0.0
        self._mismatch_after_full: bytes | None = None

    async def run(self) -> None:
        """Sync forever; only :class:`~node_agent.errors.AgentRemoved` (a ban) escapes.

        Any other failure of a stream (the server unreachable or refusing, the stream's
        channel closed under it, a bug) is logged and the stream reopened; a new agent
        SVID or trust bundle moves the stream to the new channel at once.
        """
        backoff = self.client.backoff()
        while True:
            address = self.client.address
            changed = self.client.channels_replaced()
            opened = time.monotonic()
            wait = True
            level = logging.WARNING
            try:
                await self._stream_once(backoff, changed)
                error = "stream ended by the server"
                self.client.failover(error)
            except _Reopen as exc:
                error = str(exc)
                wait = exc.backoff
                if not exc.backoff:
                    level = logging.INFO  # routine: new credentials, or a resync (logged)
                if exc.full:
                    self.state.last_event_id = 0
            except ServerUnreachable as exc:
                error = str(exc)  # the client has already moved on, if the server is at fault
            except ServerClientError as exc:
                error = str(exc)
                self.client.failover(error)
            except AgentRemoved:
                raise
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the agent is stopping
                error = "stream cancelled"  # not us being cancelled: keep syncing
            except Exception as exc:  # a bug must not end entry sync for the agent's life
                log.exception("entry sync stream failed", extra={"server": address})
                error = f"{type(exc).__name__}: {exc}"
            self.listener.set_connected(False)
            delay = backoff.next() if wait else 0.0
            log.log(
                level,
                "entry sync stream lost; reconnecting"
                if level == logging.WARNING
                else "entry sync stream reopening",
                extra={
                    "server": address,
                    "error": error,
                    "retry_in": round(delay, 2),
                    "last_event_id": self.state.last_event_id,
                    "entries": len(self.state.entries),
                    "open_seconds": round(time.monotonic() - opened, 1),
                },
            )
            if delay:
                # A new SVID or bundle is worth retrying at once; otherwise wait out the backoff.
                await wait_event(self.client.credentials_changed(), delay)

    async def _stream_once(self, backoff: Backoff, changed: asyncio.Event) -> None:
        """One stream, until it fails, the credentials change or it falls silent."""
        self._last_message = time.monotonic()
        self._interval = 0.0
        consume = asyncio.ensure_future(self._consume(backoff))
        moved = asyncio.ensure_future(changed.wait())
        try:
            while True:
                # Until the server announces its heartbeat interval, look again each second.
                timeout = 1.0
                if self._interval > 0:
                    timeout = max(0.0, self._last_message + 3 * self._interval - time.monotonic())
                await asyncio.wait(
                    {consume, moved}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if consume.done():
                    consume.result()  # its error, or it ended
                    return
                if moved.done():
                    raise _Reopen(
                        "agent SVID or trusted authorities replaced; moving to the new channel"
                    )
                silent = time.monotonic() - self._last_message
                if self._interval > 0 and silent >= 3 * self._interval:
                    raise _Reopen(
                        f"no message or heartbeat from the server for {silent:.1f}s "
                        f"(heartbeat every {self._interval:g}s): the stream is dead",
                        backoff=True,
                    )
        finally:
            for task in (consume, moved):
                task.cancel()
            await asyncio.gather(consume, moved, return_exceptions=True)

    async def _consume(self, backoff: Backoff) -> None:
        first = True
        entries_pending = False
        resume = self.state.last_event_id
        self.streams += 1
        async for message in self.client.sync(resume):
            self._last_message = time.monotonic()
            self._interval = message.heartbeat_interval
            if message.heartbeat:
                self._heartbeat(message)
                continue
            entries_changed, bundles_changed = self.state.apply(message)
            if bundles_changed and self.state.bundles is not None:
                self.trust.set_authorities(
                    self.state.bundles.bundle.x509_authorities, self.state.bundles.tainted_x509
                )
                self.listener.update_bundles(self.state.bundles)
            entries_pending = entries_pending or entries_changed or message.full
            if entries_pending and self.state.complete:
                # Hand over only whole sets: never the first chunk of a split full set.
                self.listener.update_entries(dict(self.state.entries))
                entries_pending = False
            if first and self.state.complete:
                first = False
                backoff.reset()
                self.listener.set_connected(True)
                self.synced.set()
                log.info(
                    "entry sync stream open",
                    extra={
                        "server": self.client.address,
                        "full": message.full,
                        "resume_after_event_id": resume,
                        "entries": len(self.state.entries),
                        "event_id": self.state.last_event_id,
                        "heartbeat_interval": message.heartbeat_interval,
                    },
                )
            log.debug(
                "sync message applied",
                extra={
                    "event_id": message.event_id,
                    "full": message.full,
                    "upserted": len(message.entries),
                    "deleted": len(message.deleted_entry_ids),
                },
            )

    def _heartbeat(self, message: SyncMessage) -> None:
        """Check a heartbeat against what the agent holds; :class:`_Reopen` if behind."""
        if not self.state.complete:
            return
        ours = self.state.digest()
        if ours == message.digest:
            # Up to date: events the server skipped for this agent need no replay.
            self.state.last_event_id = max(self.state.last_event_id, message.event_id)
            self._mismatch_after_full = None
            log.debug("sync heartbeat", extra={"event_id": message.event_id, "in_sync": True})
            return
        fields = {
            "server": self.client.address,
            "event_id": self.state.last_event_id,
            "server_event_id": message.event_id,
            "entries": len(self.state.entries),
            "digest": ours.hex()[:16],
            "server_digest": message.digest.hex()[:16],
        }
        if self._mismatch_after_full == message.digest:
            # Still different right after a full sync: syncing again would not help.
            log.debug("sync heartbeat differs again after a full sync", extra=fields)
            return
        self._mismatch_after_full = message.digest
        self.resyncs += 1
        log.warning("entry sync behind the server; syncing the full set again", extra=fields)
        raise _Reopen("the agent's entries differ from the server's: syncing again", full=True)
