"""Keeps the server's ``SyncEntries`` stream open and hands each change to a listener.

The first message of a stream is the full authorized set (or, when resuming, the changes
after ``resume_after_event_id``; the server may answer a resume with a full set). On any
error the stream is reopened from the last event id after an exponential backoff with
jitter, failing over round-robin between the server addresses. A ban ends the agent.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from cryptography import x509

from credo._proto.credo.server.v1 import agent_pb2
from node_agent.attestation.errors import ServerUnreachable
from node_agent.sync.entries import Entry, SyncState, TrustBundles

__all__ = ["Backoff", "EntrySyncer", "SyncListener", "SyncSession", "SyncerConfig", "wait_event"]

log = logging.getLogger(__name__)


class SyncSession(Protocol):
    """What the syncer needs from the agent's session with the servers."""

    @property
    def address(self) -> str:
        """The server address calls currently go to."""
        ...

    async def stub(self) -> Any:
        """An ``Agent`` stub on a channel to the current server."""
        ...

    def failover(self) -> str:
        """Move to the next server address."""
        ...

    def raise_if_banned(self, err: BaseException) -> None:
        """Raise AgentBanned when ``err`` says the agent is banned."""
        ...

    def set_authorities(
        self, authorities: tuple[x509.Certificate, ...], tainted: frozenset[bytes] = ...
    ) -> None:
        """Trust these X.509 authorities for the server from now on (DER of tainted ones)."""
        ...

    def credentials_changed(self) -> asyncio.Event:
        """An event set the next time the agent SVID or trust bundle is replaced."""
        ...


class SyncListener(Protocol):
    """Receives the synced state (the SVID cache)."""

    def update_entries(self, entries: Mapping[str, Entry]) -> None:
        """The full current entry set (a copy the listener may keep)."""
        ...

    def update_bundles(self, bundles: TrustBundles) -> None:
        """The current own bundle, its tainted authorities and the federated bundles."""
        ...

    def set_connected(self, connected: bool) -> None:
        """Whether the sync stream is currently up."""
        ...


@dataclass(frozen=True)
class SyncerConfig:
    """Backoff bounds of the reconnect loop, in seconds."""

    backoff_min: float = 0.2
    backoff_max: float = 30.0


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; True if it was set.

    Uses :func:`asyncio.timeout`, not :func:`asyncio.wait_for`: on Python 3.11 ``wait_for``
    can swallow a cancellation that arrives as the event fires, and the task never stops.
    """
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return False
    return True


class Backoff:
    """Exponential backoff with full jitter between ``low`` and ``high`` seconds."""

    def __init__(self, low: float, high: float) -> None:
        self.low = low
        self.high = high
        self._attempt = 0

    def next(self) -> float:
        """The delay before the next attempt (grows x2 per failure, ±20% jitter, capped)."""
        base = min(self.high, self.low * 2.0 ** min(self._attempt, 64))
        self._attempt += 1
        return float(min(self.high, base * random.uniform(0.8, 1.2)))

    def reset(self) -> None:
        """Start again from ``low`` (after a success)."""
        self._attempt = 0


class EntrySyncer:
    """Holds the entry stream open for the agent's whole life."""

    def __init__(
        self, session: SyncSession, listener: SyncListener, config: SyncerConfig | None = None
    ) -> None:
        self.session = session
        self.listener = listener
        self.config = config or SyncerConfig()
        self.state = SyncState()
        self.synced = asyncio.Event()
        """Set once the first full set has been applied."""

    async def run(self) -> None:
        """Sync forever; only :class:`~node_agent.attestation.errors.AgentBanned` escapes."""
        backoff = Backoff(self.config.backoff_min, self.config.backoff_max)
        while True:
            try:
                await self._stream_once(backoff)
                error = "stream ended by the server"
            except grpc.aio.AioRpcError as exc:
                self.session.raise_if_banned(exc)
                error = f"{exc.code().name}: {exc.details()}"
            except ServerUnreachable as exc:
                error = str(exc)
            self.listener.set_connected(False)
            delay = backoff.next()
            log.warning(
                "entry sync stream lost; reconnecting",
                extra={
                    "server": self.session.address,
                    "error": error,
                    "retry_in": round(delay, 2),
                    "last_event_id": self.state.last_event_id,
                },
            )
            self.session.failover()
            changed = self.session.credentials_changed()
            # A new SVID or bundle is worth retrying at once; otherwise wait out the backoff.
            await wait_event(changed, delay)

    async def _stream_once(self, backoff: Backoff) -> None:
        stub = await self.session.stub()
        call = stub.SyncEntries(
            agent_pb2.SyncEntriesRequest(resume_after_event_id=self.state.last_event_id)
        )
        first = True
        entries_pending = False
        async for message in call:
            entries_changed, bundles_changed = self.state.apply(message)
            if bundles_changed and self.state.bundles is not None:
                self.session.set_authorities(
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
                        "server": self.session.address,
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
