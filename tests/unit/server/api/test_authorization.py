"""Which entries an agent may see and sign: the entry index rules, and the per-agent memo."""

from __future__ import annotations

import time

import grpc
import pytest

from credo._proto.credo.server.v1 import agent_pb2, agent_pb2_grpc
from credo.selector import Selector
from server.authorization import EntryIndex
from server.datastore.models import RegistrationEntry
from tests.helpers.server import AttestedAgent, InProcessServer, make_csr
from tests.unit.server.api.test_agent_api import create_entry, sign

AGENT = "spiffe://td/credo/agent/x"
SERVER = "spiffe://td/credo/server"
S = Selector("k8s_psat", "cluster:a")
NODE = S
UID = (Selector("unix", "uid:1"),)


def e(entry_id: str, spiffe_id: str, parent: str, **kw: object) -> RegistrationEntry:
    kw.setdefault("selectors", (Selector("unix", "uid:1"),))
    return RegistrationEntry(id=entry_id, spiffe_id=spiffe_id, parent_id=parent, **kw)  # type: ignore[arg-type]


def test_alias_needs_all_its_selectors() -> None:
    """A node alias applies only when all of its selectors are among the agent's."""
    index = EntryIndex(
        [
            e("alias1", "spiffe://td/a1", SERVER, node_alias=True, selectors=(S,)),
            e(
                "alias2",
                "spiffe://td/a2",
                SERVER,
                node_alias=True,
                selectors=(S, Selector("x", "y")),
            ),
            e("w1", "spiffe://td/w1", "spiffe://td/a1"),
            e("w2", "spiffe://td/w2", "spiffe://td/a2"),
        ]
    )
    assert set(index.authorized(AGENT, [S])) == {"w1"}
    assert set(index.authorized(AGENT, [])) == set()


def test_index_built_from_a_list_with_a_repeated_id_keeps_the_last_version() -> None:
    """Building the index from entries is put() of each in turn: a later version of the
    same id replaces the earlier one, under its own parent only."""
    index = EntryIndex(
        [
            e("w", "spiffe://td/w", AGENT),
            e("v", "spiffe://td/v", AGENT),
            e("w", "spiffe://td/w2", SERVER),
        ]
    )
    assert len(index) == 2
    assert index.get("w") == e("w", "spiffe://td/w2", SERVER)
    assert set(index.authorized(AGENT, [])) == {"v"}
    assert index.descendant_ids([SERVER]) == {"w"}


def test_update_moves_entry_between_parents_and_expired_are_skipped() -> None:
    """Re-putting an entry re-indexes it; an expired entry is never authorized."""
    index = EntryIndex([e("w", "spiffe://td/w", AGENT)])
    index.put(e("w", "spiffe://td/w", "spiffe://td/other"))
    assert index.authorized(AGENT, []) == {}
    index.put(e("old", "spiffe://td/old", AGENT, expires_at=int(time.time()) - 1))
    assert index.authorized(AGENT, []) == {}
    index.remove("old")
    assert len(index) == 1


def test_100k_entries_index_and_lookup() -> None:
    """100,000 entries index, and one agent's lookup finds exactly its own 100.

    How long this takes is measured by benchmarks/entries.py (start_100k_s), not here.
    """
    entries = [
        e(f"id{i}", f"spiffe://td/w{i}", f"spiffe://td/credo/agent/{i % 1000}")
        for i in range(100_000)
    ]
    index = EntryIndex(entries)
    found = index.authorized("spiffe://td/credo/agent/7", [])
    assert len(found) == 100
    assert all(e.parent_id == "spiffe://td/credo/agent/7" for e in found.values())


def test_expired_node_alias_grants_nothing() -> None:
    """An expired node-alias entry no longer makes its children authorized for matching agents."""
    index = EntryIndex(
        [
            RegistrationEntry(
                id="alias",
                spiffe_id="spiffe://td/alias",
                parent_id=SERVER,
                selectors=(NODE,),
                node_alias=True,
                expires_at=int(time.time()) - 1,
            ),
            RegistrationEntry(
                id="w", spiffe_id="spiffe://td/w", parent_id="spiffe://td/alias", selectors=UID
            ),
        ]
    )
    assert index.authorized(AGENT, [NODE]) == {}


def _new_jwt(agent: AttestedAgent, entry_id: str) -> agent_pb2.NewJWTSVIDResponse:
    with agent.channel() as ch:
        return agent_pb2_grpc.AgentStub(ch).NewJWTSVID(
            agent_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=["db"]), timeout=10
        )


class _AheadClock:
    """``time`` for the module under test, with a wall clock that can be moved forward."""

    monotonic = staticmethod(time.monotonic)

    def __init__(self) -> None:
        self.ahead = 0.0

    def time(self) -> float:
        return time.time() + self.ahead


def test_entry_expiring_after_first_use_is_refused(
    server: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-agent authorization memo must not outlive an entry's (or its parent's) expiry
    (the server's clock is moved past it rather than waited for)."""
    from server.agents import sync

    clock = _AheadClock()
    monkeypatch.setattr(sync, "time", clock)
    agent = server.attest(server.create_join_token())
    expires_at = int(time.time()) + 60
    parent = create_entry(
        server, "spiffe://example.org/parent", agent.agent_id, expires_at=expires_at
    )
    child = create_entry(server, "spiffe://example.org/child", "spiffe://example.org/parent")
    # Served (and memoised) while valid.
    assert _new_jwt(agent, parent).svid.token
    assert sign(agent, (child, make_csr())).results[0].svid.cert_chain
    clock.ahead = expires_at - time.time() + 1
    with pytest.raises(grpc.RpcError) as err:
        _new_jwt(agent, parent)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    result = sign(agent, (child, make_csr())).results[0]
    assert result.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert not result.svid.cert_chain
