"""SyncEntries heartbeats (issue 8): a quiet stream carries the server's current event id
and the digest of the agent's entries; a stream that ends leaves no pending task behind."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from credo._protocol import entries_digest
from server.agents.errors import ServerStopping
from server.agents.sync import SyncView
from server.authorization import Subscription
from server.config import ConfigError, ServerConfig
from tests.helpers.server import InProcessServer
from tests.unit.server.api.test_sync import create, delete, entry, sync


def _heartbeat(stream: Any, timeout: float = 5.0) -> Any:
    """The next heartbeat on ``stream`` (changes before it are skipped)."""
    while True:
        message = stream.next(timeout=timeout)
        if message.entries_digest:
            return message


def test_quiet_stream_carries_heartbeats_with_event_id_and_digest(tmp_path: Path) -> None:
    """A heartbeat holds no changes, the server's current event id (moved by another
    agent's entry too) and the digest of exactly the agent's entries."""
    with InProcessServer(tmp_path, sync_heartbeat_interval=0.3) as server:
        agent = server.attest(server.create_join_token())
        other = server.attest(server.create_join_token())
        [web] = create(server, entry("spiffe://example.org/web", agent.agent_id))
        with sync(agent) as stream:
            first = stream.next()
            assert first.full and first.heartbeat_interval_ms == 300 and not first.entries_digest
            beat = _heartbeat(stream)
            assert not beat.entries and not beat.deleted_entry_ids and not beat.full
            assert beat.heartbeat_interval_ms == 300
            revision = first.entries[0].revision_number
            assert beat.entries_digest == entries_digest([(web, revision)])
            assert beat.event_id == first.event_id

            # Another agent's entry: nothing to send, but the heartbeat's event id moves on.
            create(server, entry("spiffe://example.org/theirs", other.agent_id))
            moved = _heartbeat(stream)
            while moved.event_id == first.event_id:
                moved = _heartbeat(stream)
            assert moved.event_id > first.event_id
            assert moved.entries_digest == beat.entries_digest

            delete(server, web)
            gone = stream.next()
            assert list(gone.deleted_entry_ids) == [web]
            assert _heartbeat(stream).entries_digest == entries_digest([])


def test_heartbeats_can_be_turned_off(tmp_path: Path) -> None:
    with InProcessServer(tmp_path, sync_heartbeat_interval=0) as server:
        agent = server.attest(server.create_join_token())
        with sync(agent) as stream:
            assert stream.next().heartbeat_interval_ms == 0
            try:
                extra = stream.next(timeout=1.0)
            except Exception:  # queue.Empty: nothing came
                extra = None
            assert extra is None


def _view(stopping: asyncio.Event) -> SyncView:
    return SyncView(None, None, None, stopping)  # type: ignore[arg-type]


def test_waiting_for_events_leaves_no_pending_task_when_the_stream_is_cancelled() -> None:
    """The stream's wait for the next events is cancelled (the agent went away): its
    helper tasks are gone too, not left pending to be "destroyed but pending"."""

    async def scenario() -> None:
        view = _view(asyncio.Event())
        before = asyncio.all_tasks()
        waiting = asyncio.create_task(view._next_events(Subscription(), 60.0))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        left = asyncio.all_tasks() - before
        assert not left, f"tasks left pending: {left}"

    asyncio.run(scenario())


def test_waiting_for_events_times_out_and_stops() -> None:
    async def scenario() -> None:
        stopping = asyncio.Event()
        view = _view(stopping)
        sub = Subscription()
        assert await view._next_events(sub, 0.05) is None
        sub._push([])
        assert await view._next_events(sub, 5.0) == []
        asyncio.get_running_loop().call_later(0.05, stopping.set)
        before = asyncio.all_tasks()
        try:
            await view._next_events(sub, 5.0)
        except ServerStopping:
            pass
        else:
            raise AssertionError("expected ServerStopping")
        assert asyncio.all_tasks() <= before

    asyncio.run(scenario())


def test_heartbeat_interval_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sync_heartbeat_interval"):
        ServerConfig(data_dir=tmp_path, sync_heartbeat_interval=-1).validate()
