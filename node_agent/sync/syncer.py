"""Keeps the server's ``SyncEntries`` stream open and hands each change to a listener.

The first message of a stream is the full authorized set (or, when resuming, the changes
after ``resume_after_event_id``; the server may answer a resume with a full set). On any
error the stream is reopened from the last event id after the server client's backoff
(exponential, jitter, cap), moving on to the next server address. A ban ends the agent.
The stream itself, its messages and its errors are the server client's
(:meth:`node_agent.server_client.ServerClient.sync`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from cryptography import x509

from node_agent._wait import wait_event
from node_agent.errors import ServerClientError, ServerUnreachable
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


class EntrySyncer:
    """Holds the entry stream open for the agent's whole life."""

    def __init__(self, client: SyncClient, listener: SyncListener, trust: TrustListener) -> None:
        self.client = client
        self.listener = listener
        self.trust = trust
        self.state = SyncState()
        self.synced = asyncio.Event()
        """Set once the first full set has been applied."""

    async def run(self) -> None:
        """Sync forever; only :class:`~node_agent.errors.AgentRemoved` (a ban) escapes."""
        backoff = self.client.backoff()
        while True:
            address = self.client.address
            try:
                await self._stream_once(backoff)
                error = "stream ended by the server"
                self.client.failover(error)
            except ServerUnreachable as exc:
                error = str(exc)  # the client has already moved on to the next address
            except ServerClientError as exc:
                error = str(exc)
                self.client.failover(error)
            self.listener.set_connected(False)
            delay = backoff.next()
            log.warning(
                "entry sync stream lost; reconnecting",
                extra={
                    "server": address,
                    "error": error,
                    "retry_in": round(delay, 2),
                    "last_event_id": self.state.last_event_id,
                },
            )
            changed = self.client.credentials_changed()
            # A new SVID or bundle is worth retrying at once; otherwise wait out the backoff.
            await wait_event(changed, delay)

    async def _stream_once(self, backoff: Backoff) -> None:
        first = True
        entries_pending = False
        async for message in self.client.sync(self.state.last_event_id):
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
                        "entries": len(self.state.entries),
                        "event_id": self.state.last_event_id,
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
