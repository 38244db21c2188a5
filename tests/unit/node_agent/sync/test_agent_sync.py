"""The entry syncer against a fake signing server (a real in-process gRPC Agent service)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping

import pytest
from agent_fake_server import (
    FakeAgentServer,
    TrustRecorder,
    attested_client,
    wait_until,
)

from credo.bundle import Bundle
from credo.selector import Selector
from credo.spiffe_id import SpiffeId, TrustDomain
from node_agent.errors import AgentBanned
from node_agent.server_client import ServerClient
from node_agent.sync.entries import Crls, RegistrationEntry, SyncMessage, SyncState, TrustBundles
from node_agent.sync.syncer import EntrySyncer


class Recorder:
    """A SyncListener that keeps what it was handed."""

    def __init__(self) -> None:
        self.entry_sets: list[dict[str, RegistrationEntry]] = []
        self.bundles: list[TrustBundles] = []
        self.connected = False

    def update_entries(self, entries: Mapping[str, RegistrationEntry]) -> None:
        self.entry_sets.append(dict(entries))

    def update_bundles(self, bundles: TrustBundles) -> None:
        self.bundles.append(bundles)

    def set_connected(self, connected: bool) -> None:
        self.connected = connected

    @property
    def entries(self) -> dict[str, RegistrationEntry]:
        return self.entry_sets[-1] if self.entry_sets else {}


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 20.0) -> None:
    """Run an async scenario with a deadline."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario(), timeout)

    asyncio.run(bounded())


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _syncer(client: ServerClient, recorder: Recorder) -> EntrySyncer:
    return EntrySyncer(client, recorder, TrustRecorder())


def test_full_set_then_incremental_changes() -> None:
    """The first message replaces the entry set; later ones add and delete entries."""

    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        client = attested_client(server)
        keep = server.create_entry("spiffe://example.org/a", ["unix:uid:1"])
        recorder = Recorder()
        syncer = _syncer(client, recorder)
        task = asyncio.create_task(syncer.run())
        await asyncio.wait_for(syncer.synced.wait(), 5)
        assert set(recorder.entries) == {keep}
        assert recorder.connected
        assert [list(b.bundle.x509_authorities) for b in recorder.bundles] == [
            [server.authorities[0].cert]
        ]
        added = server.create_entry("spiffe://example.org/b", ["unix:uid:2"])
        await wait_until(lambda: set(recorder.entries) == {keep, added})
        server.delete_entry(keep)
        await wait_until(lambda: set(recorder.entries) == {added})
        assert recorder.entries[added].spiffe_id.path == "/b"
        await _cancel(task)
        await client.close()
        await server.stop()

    run(scenario)


def test_reconnect_resumes_from_last_event_id() -> None:
    """After the stream drops, the syncer reopens it from the last event id it applied."""

    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        client = attested_client(server)
        server.create_entry("spiffe://example.org/a", ["unix:uid:1"])
        recorder = Recorder()
        syncer = _syncer(client, recorder)
        task = asyncio.create_task(syncer.run())
        await asyncio.wait_for(syncer.synced.wait(), 5)
        server.create_entry("spiffe://example.org/b", ["unix:uid:2"])
        await wait_until(lambda: len(recorder.entries) == 2)
        last = syncer.state.last_event_id
        assert last == server.event_id
        server.drop_streams()
        await wait_until(lambda: len(server.state.resume_requests) == 2)
        assert server.state.resume_requests == [0, last]
        server.create_entry("spiffe://example.org/c", ["unix:uid:3"])
        await wait_until(lambda: len(recorder.entries) == 3)
        await _cancel(task)
        await client.close()
        await server.stop()

    run(scenario)


def test_full_resync_when_server_cannot_resume() -> None:
    """When the server answers a resume with a full set, entries deleted meanwhile disappear."""

    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        client = attested_client(server)
        a = server.create_entry("spiffe://example.org/a", ["unix:uid:1"])
        b = server.create_entry("spiffe://example.org/b", ["unix:uid:2"])
        recorder = Recorder()
        syncer = _syncer(client, recorder)
        task = asyncio.create_task(syncer.run())
        await asyncio.wait_for(syncer.synced.wait(), 5)
        assert set(recorder.entries) == {a, b}
        server.can_resume = False
        # Deleted while no stream is open: only a full set can tell the agent.
        await _cancel(task)
        del server.state.entries[a]
        task = asyncio.create_task(syncer.run())
        await wait_until(lambda: set(recorder.entries) == {b})
        await _cancel(task)
        await client.close()
        await server.stop()

    run(scenario)


def test_fails_over_to_the_next_server_address(caplog: pytest.LogCaptureFixture) -> None:
    """When the first address does not answer, the syncer moves on to the next one."""

    async def scenario() -> None:
        dead = FakeAgentServer()
        dead_address = await dead.start()
        await dead.stop()
        server = FakeAgentServer()
        live_address = await server.start()
        server.create_entry("spiffe://example.org/a", ["unix:uid:1"])
        client = attested_client(server, dead_address, live_address)
        recorder = Recorder()
        syncer = _syncer(client, recorder)
        task = asyncio.create_task(syncer.run())
        await asyncio.wait_for(syncer.synced.wait(), 5)
        assert client.address == live_address
        assert len(recorder.entries) == 1
        await _cancel(task)
        await client.close()
        await server.stop()

    caplog.set_level("INFO", logger="node_agent.server_client")
    run(scenario)
    assert "failing over to next server" in caplog.text


def test_ban_ends_sync_with_agent_banned() -> None:
    """A PERMISSION_DENIED 'agent is banned' answer ends the sync loop with AgentBanned."""

    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        client = attested_client(server)
        server.banned = True
        syncer = _syncer(client, Recorder())
        with pytest.raises(AgentBanned, match="banned by the server"):
            await syncer.run()
        await client.close()
        await server.stop()

    run(scenario)


def _entry(entry_id: str) -> RegistrationEntry:
    return RegistrationEntry(
        id=entry_id,
        spiffe_id=SpiffeId.parse(f"spiffe://example.org/{entry_id}"),
        parent_id="spiffe://example.org/agent",
        selectors=frozenset({Selector("unix", "uid:1")}),
    )


def test_split_full_set_is_complete_only_at_its_last_message() -> None:
    """A full set split over messages is resumable only once its last part arrives."""
    state = SyncState()
    state.last_event_id = 7
    state.apply(SyncMessage(event_id=0, full=True, entries=(_entry("a"),)))
    assert not state.complete
    assert state.last_event_id == 0
    state.apply(SyncMessage(event_id=0, entries=(_entry("b"),)))
    assert not state.complete
    state.apply(SyncMessage(event_id=12, entries=(_entry("c"),)))
    assert state.complete
    assert state.last_event_id == 12
    assert set(state.entries) == {"a", "b", "c"}


def test_crls_replace_the_held_ones_and_count_as_a_bundle_change() -> None:
    """A message with CRLs replaces the CRLs held (also before any bundle arrived); the same
    CRLs again change nothing; a message without CRLs keeps them."""
    state = SyncState()
    first = Crls((b"crl-1",), frozenset({1}))
    assert state.apply(SyncMessage(event_id=1, crls=first)) == (False, False)
    bundle = Bundle(TrustDomain("example.org"))
    assert state.apply(SyncMessage(event_id=2, full=True, bundle=bundle)) == (False, True)
    assert state.bundles is not None and state.bundles.crls == first
    second = Crls((b"crl-2",), frozenset({1, 2}))
    assert state.apply(SyncMessage(event_id=3, crls=second)) == (False, True)
    assert state.bundles.crls == second
    assert state.apply(SyncMessage(event_id=4, crls=second)) == (False, False)
    assert state.apply(SyncMessage(event_id=5, bundle=bundle)) == (False, False)
    assert state.bundles.crls == second
