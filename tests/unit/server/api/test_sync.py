"""SyncEntries: the full authorized set, pushed changes, resume, and node aliases."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from credo._proto.credo.server.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    types_pb2,
)
from credo._protocol import Refusal, refusal_in
from credo.selector import Selector
from server.datastore.sql import SqlDataStore
from tests.helpers.server import AttestedAgent, InProcessServer, make_csr

UID = [types_pb2.Selector(type="unix", value="uid:1000")]


def create(server: InProcessServer, *entries: types_pb2.RegistrationEntry) -> list[str]:
    stub = admin_pb2_grpc.EntriesStub(server.admin_channel())
    resp = stub.BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=list(entries)))
    return [e.id for e in resp.entries]


def delete(server: InProcessServer, *ids: str) -> None:
    admin_pb2_grpc.EntriesStub(server.admin_channel()).BatchDeleteEntry(
        admin_pb2.BatchDeleteEntryRequest(ids=list(ids))
    )


def entry(spiffe_id: str, parent_id: str, **kw: Any) -> types_pb2.RegistrationEntry:
    kw.setdefault("selectors", UID)
    return types_pb2.RegistrationEntry(spiffe_id=spiffe_id, parent_id=parent_id, **kw)


class Stream:
    """A SyncEntries stream read by a thread, so tests can wait with a timeout."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.messages: queue.Queue[Any] = queue.Queue()
        self.error: grpc.RpcError | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.put(message)
        except grpc.RpcError as err:
            self.error = err
            self.messages.put(err)

    def next(self, timeout: float = 5.0) -> Any:
        item = self.messages.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item


@contextmanager
def sync(agent: AttestedAgent, resume_after: int = 0) -> Iterator[Stream]:
    with agent.channel() as ch:
        call = agent_pb2_grpc.AgentStub(ch).SyncEntries(
            agent_pb2.SyncEntriesRequest(resume_after_event_id=resume_after)
        )
        stream = Stream(call)
        try:
            yield stream
        finally:
            call.cancel()


def ids(message: Any) -> set[str]:
    return {e.spiffe_id for e in message.entries}


def test_full_set_then_pushed_create_and_delete(server: InProcessServer) -> None:
    """The first message is the full set; an admin create and delete are pushed to the stream.

    Push latency is measured by benchmarks/propagation.py, not asserted here.
    """
    agent = server.attest(server.create_join_token())
    [web] = create(server, entry("spiffe://example.org/web", agent.agent_id))
    with sync(agent) as stream:
        first = stream.next()
        assert first.full and ids(first) == {"spiffe://example.org/web"}
        assert first.bundle.x509_authorities and first.event_id > 0
        [db] = create(server, entry("spiffe://example.org/db", agent.agent_id))
        pushed = stream.next(timeout=30.0)
        assert not pushed.full and ids(pushed) == {"spiffe://example.org/db"}
        assert pushed.event_id > first.event_id
        delete(server, web)
        gone = stream.next(timeout=1.0)
        assert list(gone.deleted_entry_ids) == [web] and not gone.entries
        assert db


def test_other_agents_entries_are_not_pushed(server: InProcessServer) -> None:
    """Changes to another agent's entries never reach this agent's stream."""
    agent = server.attest(server.create_join_token())
    other = server.attest(server.create_join_token())
    with sync(agent) as stream:
        assert stream.next().entries == []
        create(server, entry("spiffe://example.org/theirs", other.agent_id))
        create(server, entry("spiffe://example.org/mine", agent.agent_id))
        assert ids(stream.next(timeout=1.0)) == {"spiffe://example.org/mine"}


def test_descendants_are_authorized(server: InProcessServer) -> None:
    """Entries parented to an authorized entry's SPIFFE ID are authorized, transitively."""
    agent = server.attest(server.create_join_token())
    create(
        server,
        entry("spiffe://example.org/a", agent.agent_id),
        entry("spiffe://example.org/b", "spiffe://example.org/a"),
        entry("spiffe://example.org/c", "spiffe://example.org/b"),
        entry("spiffe://example.org/a", "spiffe://example.org/c"),  # a cycle back to a
        entry("spiffe://example.org/x", "spiffe://example.org/unrelated"),
    )
    with sync(agent) as stream:
        assert ids(stream.next()) == {
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            "spiffe://example.org/c",
        }


def test_join_token_alias_authorizes_entries_under_the_alias(server: InProcessServer) -> None:
    """A token made with a SPIFFE ID makes the agent that uses it a parent of that alias."""
    token = server.create_join_token(spiffe_id="spiffe://example.org/node/group-a")
    agent = server.attest(token)
    [child] = create(server, entry("spiffe://example.org/w", "spiffe://example.org/node/group-a"))
    with sync(agent) as stream:
        got = ids(stream.next())
    assert got == {"spiffe://example.org/node/group-a", "spiffe://example.org/w"}
    with agent.channel() as ch:
        result = (
            agent_pb2_grpc.AgentStub(ch)
            .BatchNewX509SVID(
                agent_pb2.BatchNewX509SVIDRequest(
                    params=[agent_pb2.NewX509SVIDParams(entry_id=child, csr=make_csr())]
                )
            )
            .results[0]
        )
    assert result.status.code == 0 and result.svid.spiffe_id == "spiffe://example.org/w"


def test_node_alias_by_selector_subset(server: InProcessServer) -> None:
    """A node-alias entry whose selectors are a subset of the agent's node selectors
    authorizes the entries under it (and their descendants); a non-subset alias does not."""
    agent = server.attest(server.create_join_token())
    create(
        server,
        entry(
            "spiffe://example.org/cluster/a",
            "",
            node_alias=True,
            selectors=[types_pb2.Selector(type="k8s_psat", value="cluster:a")],
        ),
        entry(
            "spiffe://example.org/cluster/b",
            "",
            node_alias=True,
            selectors=[
                types_pb2.Selector(type="k8s_psat", value="cluster:a"),
                types_pb2.Selector(type="k8s_psat", value="agent_node_label:zone:b"),
            ],
        ),
        entry("spiffe://example.org/in-a", "spiffe://example.org/cluster/a"),
        entry("spiffe://example.org/below-a", "spiffe://example.org/in-a"),
        entry("spiffe://example.org/in-b", "spiffe://example.org/cluster/b"),
    )
    # Node selectors come from node attestation; set them the way an attestor's record would.
    ds = SqlDataStore.open(server.config.datastore_url)
    try:
        ds.set_node_selectors(agent.agent_id, [Selector("k8s_psat", "cluster:a")])
    finally:
        ds.close()
    with sync(agent) as stream:
        assert ids(stream.next()) == {"spiffe://example.org/in-a", "spiffe://example.org/below-a"}


def test_resume_replays_only_changes(server: InProcessServer) -> None:
    """Resuming after an event id sends only what changed since (not the full set)."""
    agent = server.attest(server.create_join_token())
    [keep, drop] = create(
        server,
        entry("spiffe://example.org/keep", agent.agent_id),
        entry("spiffe://example.org/drop", agent.agent_id),
    )
    with sync(agent) as stream:
        position = stream.next().event_id
    delete(server, drop)
    create(server, entry("spiffe://example.org/new", agent.agent_id))
    time.sleep(0.3)  # let the cache apply the change feed
    with sync(agent, resume_after=position) as stream:
        resumed = stream.next()
    assert not resumed.full
    assert ids(resumed) == {"spiffe://example.org/new"}
    assert list(resumed.deleted_entry_ids) == [drop]
    assert keep
    with sync(agent, resume_after=10**9) as stream:  # unknown position: full set
        assert stream.next().full


@pytest.mark.parametrize("action", [Refusal.BANNED, Refusal.EVICTED], ids=["ban", "delete"])
def test_ban_ends_open_stream(server: InProcessServer, action: Refusal) -> None:
    """Banning (or deleting) an agent terminates its open sync stream with PERMISSION_DENIED
    and credo-refusal banned (or evicted)."""
    agent = server.attest(server.create_join_token())
    agents = admin_pb2_grpc.AgentsStub(server.admin_channel())
    with sync(agent) as stream:
        stream.next()
        if action is Refusal.BANNED:
            agents.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent.agent_id))
        else:
            agents.DeleteAgent(admin_pb2.DeleteAgentRequest(spiffe_id=agent.agent_id))
        with pytest.raises(grpc.RpcError) as err:
            stream.next(timeout=2.0)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refusal_in(err.value.trailing_metadata()) is action
