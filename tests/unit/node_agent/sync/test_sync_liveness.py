"""The entry syncer stays current, not only connected (issue 8): it survives its stream's
channel being closed under it, moves to new credentials at once, syncs again when a
heartbeat shows it behind, and reopens a stream that fell silent. The agent restarts a
component that ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.request
from collections.abc import Awaitable, Callable

import pytest
from agent_fake_server import (
    FakeAgentServer,
    TrustRecorder,
    attested_client,
    make_authority,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

import node_agent.app as agent_app
import node_agent.server_client as server_client
from credo._proto.credo.server.v1 import agent_pb2
from credo._protocol import entries_digest
from node_agent import telemetry
from node_agent.errors import ServerUnreachable
from node_agent.server_client import Backoff, BackoffPolicy, ServerClient
from node_agent.sync.syncer import EntrySyncer
from node_agent.telemetry import AgentMetrics
from tests.unit.node_agent.sync.test_agent_sync import Recorder


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 20.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), timeout)

    asyncio.run(bounded())


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _digest(server: FakeAgentServer) -> bytes:
    return entries_digest((e.id, e.revision_number) for e in server.state.entries.values())


def _send(server: FakeAgentServer, message: agent_pb2.SyncEntriesResponse) -> None:
    """Put ``message`` on every open stream (not in the replayed history)."""
    for queue in server._streams:
        queue.put_nowait(message)


async def _started(
    server: FakeAgentServer,
) -> tuple[ServerClient, Recorder, EntrySyncer, asyncio.Task[None]]:
    client = attested_client(server)
    recorder = Recorder()
    syncer = EntrySyncer(client, recorder, TrustRecorder())
    task = asyncio.create_task(syncer.run())
    await asyncio.wait_for(syncer.synced.wait(), 5)
    return client, recorder, syncer, task


def test_a_closed_channel_ends_the_stream_with_an_error_not_a_cancellation() -> None:
    """gRPC cancels the calls of a closed channel; the client turns that into
    ServerUnreachable (a CancelledError here used to end the agent's sync task silently)."""

    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        client = attested_client(server)
        stream = client.sync(0)
        first = await anext(stream)
        assert first.full
        channel = client._channels[server.address]
        await channel.close(grace=None)
        with pytest.raises(ServerUnreachable, match="channel was closed"):
            await anext(stream)
        await client.close()
        await server.stop()

    run(scenario)


def test_new_credentials_move_the_stream_and_changes_keep_arriving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A renewed agent SVID moves the stream to the new channel at once (resuming), and
    the old channel closing after its grace does not end sync."""
    monkeypatch.setattr(server_client, "_CHANNEL_RETIRE_GRACE", 0.05)

    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        server.create_entry("spiffe://example.org/a", ["unix:uid:1"])
        client, recorder, _syncer, task = await _started(server)
        for round_ in range(3):
            client.set_credentials(server.agent_svid(), (server.authorities[0].cert,))
            await wait_until(lambda r=round_: len(server.state.resume_requests) == r + 2)
            await asyncio.sleep(0.1)  # the retired channel is closed by now
            server.create_entry(f"spiffe://example.org/after-{round_}", ["unix:uid:1"])
            await wait_until(lambda r=round_: len(recorder.entries) == r + 2)
        assert not task.done()
        assert server.state.resume_requests[1:] == [
            e for e in server.state.resume_requests[1:] if e > 0
        ]
        await _cancel(task)
        await client.close()
        await server.stop()

    run(scenario)


def test_a_bundle_that_only_adds_an_authority_leaves_the_stream_on_its_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CA rotation's prepared CA joins the bundle: the next call gets a channel that
    trusts it, but the stream stays where it is (no reopening, past the old channel's
    grace); dropping an authority afterwards moves it."""
    monkeypatch.setattr(server_client, "_CHANNEL_RETIRE_GRACE", 0.05)

    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        server.create_entry("spiffe://example.org/a", ["unix:uid:1"])
        client, recorder, syncer, task = await _started(server)
        svid, old = client._svid, server.authorities[0].cert
        assert svid is not None
        stream_channel = client._channels[server.address]
        client.set_credentials(svid, (old, make_authority().cert))
        await client.fetch_bundle()
        assert client._channels[server.address] is not stream_channel
        await asyncio.sleep(0.1)  # past the grace a retired channel's calls are cancelled
        server.create_entry("spiffe://example.org/after", ["unix:uid:1"])
        await wait_until(lambda: len(recorder.entries) == 2)
        assert server.state.resume_requests == [0] and syncer.streams == 1

        client.set_credentials(svid, (old,))
        await wait_until(lambda: len(server.state.resume_requests) == 2)
        assert syncer.streams == 2
        await _cancel(task)
        await client.close()
        await server.stop()

    run(scenario)


def test_heartbeat_in_sync_moves_the_event_id_without_reopening() -> None:
    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        server.create_entry("spiffe://example.org/a", ["unix:uid:1"])
        client, _recorder, syncer, task = await _started(server)
        _send(
            server,
            agent_pb2.SyncEntriesResponse(
                event_id=server.event_id + 40, entries_digest=_digest(server)
            ),
        )
        await wait_until(lambda: syncer.state.last_event_id == server.event_id + 40)
        assert server.state.resume_requests == [0] and syncer.resyncs == 0
        await _cancel(task)
        await client.close()
        await server.stop()

    run(scenario)


def test_heartbeat_showing_the_agent_behind_makes_it_sync_the_full_set(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An entry the agent never heard of (its push lost): the next heartbeat's digest
    differs, the agent says so and syncs the full set, and then holds the entry."""

    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        server.create_entry("spiffe://example.org/a", ["unix:uid:1"])
        client, recorder, syncer, task = await _started(server)
        lost = server.create_entry("spiffe://example.org/lost", ["unix:uid:1"], push=False)
        _send(
            server,
            agent_pb2.SyncEntriesResponse(event_id=server.event_id, entries_digest=_digest(server)),
        )
        await wait_until(lambda: lost in recorder.entries)
        assert server.state.resume_requests == [0, 0] and syncer.resyncs == 1
        await _cancel(task)
        await client.close()
        await server.stop()

    with caplog.at_level(logging.INFO, logger="node_agent.sync.syncer"):
        run(scenario)
    behind = [r for r in caplog.records if "behind the server" in r.getMessage()]
    assert len(behind) == 1 and behind[0].levelno == logging.WARNING
    ours, theirs = getattr(behind[0], "digest", ""), getattr(behind[0], "server_digest", "")
    assert len(ours) == len(theirs) == 16 and ours != theirs


def test_a_stream_silent_for_three_heartbeats_is_reopened() -> None:
    """The server announced heartbeats every 0.1 s and then sent nothing (a half-open
    connection): the agent gives up on the stream and opens another."""

    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        server.create_entry("spiffe://example.org/a", ["unix:uid:1"])
        client, _recorder, _syncer, task = await _started(server)
        _send(
            server,
            agent_pb2.SyncEntriesResponse(
                event_id=server.event_id, entries_digest=_digest(server), heartbeat_interval_ms=100
            ),
        )
        await wait_until(lambda: len(server.state.resume_requests) == 2, timeout=3)
        assert server.state.resume_requests[1] == server.event_id
        await _cancel(task)
        await client.close()
        await server.stop()

    run(scenario)


def test_the_agent_restarts_a_component_that_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A component cancelled from inside (as gRPC does), one that fails and one that
    returns are each logged as an error and started again."""
    monkeypatch.setattr(agent_app, "_RESTART_POLICY", BackoffPolicy(initial=0.01, cap=0.01))
    runs = 0

    async def scenario() -> None:
        finished = asyncio.Event()

        async def component() -> None:
            nonlocal runs
            runs += 1
            if runs == 1:
                raise asyncio.CancelledError()
            if runs == 2:
                raise RuntimeError("boom")
            if runs == 3:
                return
            finished.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(agent_app._supervised("entry-sync", component))
        await asyncio.wait_for(finished.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="node_agent.app"):
        run(scenario)
    assert runs == 4
    restarts = [r.getMessage() for r in caplog.records if "restarting it" in r.getMessage()]
    assert restarts == [
        "agent component was cancelled; restarting it",
        "agent component failed (RuntimeError: boom); restarting it",
        "agent component returned; restarting it",
    ]
    assert all(getattr(r, "component", None) == "entry-sync" for r in caplog.records)


def test_retry_delays_stay_inside_the_limit() -> None:
    """A limit caps the delays below the policy's cap; without one the cap holds."""
    policy = BackoffPolicy(initial=0.2, cap=30.0)
    limited = Backoff(policy, rng=lambda: 1.0, limit=lambda: 3.0)
    assert max(limited.next() for _ in range(20)) <= 3.0
    unlimited = Backoff(policy, rng=lambda: 1.0)
    assert max(unlimited.next() for _ in range(20)) == 30.0


def test_server_client_retries_well_before_its_agent_svid_expires() -> None:
    """With 12 s left on the agent SVID no retry waits more than 4 s (the policy's cap
    of 30 s would outlast the SVID: a server back from a restart would find the agent
    still waiting, and its SVID expired)."""

    async def scenario() -> None:
        server = FakeAgentServer(x509_ttl=12.0)
        client = attested_client(server, backoff=BackoffPolicy(initial=0.2, cap=30.0))
        backoff = client.backoff()
        assert max(backoff.next() for _ in range(20)) <= 4.0 + 1e-6
        await client.close()

    run(scenario)


def _scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_resync_is_counted_on_the_agents_metrics_endpoint() -> None:
    """The heartbeat that finds the agent behind raises credo_agent_sync_resyncs_total on
    the agent's real /metrics endpoint from 0 to 1."""
    metrics = AgentMetrics()
    address, stop = metrics.serve_http("127.0.0.1:0")

    async def scenario() -> None:
        server = FakeAgentServer()
        await server.start()
        server.create_entry("spiffe://example.org/a", ["unix:uid:1"])
        client, recorder, syncer, task = await _started(server)
        metrics.set_gauge_sources(
            svids_cached=lambda: 0,
            entries=lambda: len(recorder.entries),
            sync_connected=lambda: 1,
            sync_last_event_id=lambda: syncer.state.last_event_id,
            sync_resyncs=lambda: syncer.resyncs,
        )
        before = await asyncio.to_thread(_scrape, address)
        assert before[telemetry.SYNC_RESYNCS_TOTAL] == 0
        lost = server.create_entry("spiffe://example.org/lost", ["unix:uid:1"], push=False)
        _send(
            server,
            agent_pb2.SyncEntriesResponse(event_id=server.event_id, entries_digest=_digest(server)),
        )
        await wait_until(lambda: lost in recorder.entries)
        after = await asyncio.to_thread(_scrape, address)
        assert after[telemetry.SYNC_RESYNCS_TOTAL] == 1
        await _cancel(task)
        await client.close()
        await server.stop()

    try:
        run(scenario)
    finally:
        stop()
