"""A small simulated fleet against one real ``credo-server run``: correctness under concurrency.

Twenty agents (:mod:`tests.helpers.fleet`: the node agent's own server client, session,
syncer and signer, one process, one mTLS stream each) attest together with their own join
tokens against one server shared by the module. The tests run in file order: every agent
gets exactly its entries; entries created while every agent is signing reach exactly their
agent; another agent's entry is never signed; a ban of one agent under load stops that
agent only.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import pytest

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc
from node_agent.errors import AgentBanned, ServerRefused
from tests.helpers.fleet import Fleet, SimAgent, create_join_tokens, workload_entries
from tests.helpers.processes import ServerProcess, short_temp_dir, start_server, write_server_bundle

TD = "example.org"
AGENTS = 20
PER_AGENT = 3
WAIT = 60.0


class FleetUnderTest:
    def __init__(self, server: ServerProcess, fleet: Fleet, wanted: dict[str, set[str]]) -> None:
        self.server = server
        self.fleet = fleet
        self.wanted = wanted
        """Agent SPIFFE ID -> the SPIFFE IDs of every entry created for it so far."""

    @property
    def agents(self) -> list[SimAgent]:
        return self.fleet.agents


@pytest.fixture(scope="module")
def fleet() -> Iterator[FleetUnderTest]:
    root = short_temp_dir("credo-fleet-")
    server = start_server(root, trust_domain=TD, log_level="warning", attestation_rate_limit=1000)
    try:
        bundle = write_server_bundle(server, root / "bundle.pem")
        with server.admin_channel() as admin:
            tokens = create_join_tokens(admin, AGENTS)
            parents = [f"spiffe://{TD}/credo/agent/join_token/{t}" for t in tokens]
            wanted = workload_entries(admin, parents, PER_AGENT, "initial")
        with Fleet(server.address, bundle, TD, root / "agents") as sim:
            sim.call(sim.attest_all(tokens))
            sim.call(sim.wait_synced(WAIT))
            yield FleetUnderTest(server, sim, wanted)
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def _holds_exactly(agent: SimAgent, wanted: set[str]) -> bool:
    return agent.recorder.spiffe_ids == wanted


def test_every_agent_gets_exactly_its_entries(fleet: FleetUnderTest) -> None:
    """All twenty agents attest at once and each syncs exactly the entries under it."""
    assert len(fleet.agents) == AGENTS
    assert len({a.spiffe_id for a in fleet.agents}) == AGENTS
    for agent in fleet.agents:
        assert str(agent.session.agent_id) == agent.spiffe_id
        assert agent.recorder.spiffe_ids == fleet.wanted[agent.spiffe_id], agent.name
        assert agent.failure is None and agent.removed is None


def test_entries_created_under_load_reach_exactly_their_agent(fleet: FleetUnderTest) -> None:
    """While every agent signs its SVIDs and renews its own SVID, entries created for all of
    them in concurrent admin calls reach each agent, and no agent sees another's."""
    sim = fleet.fleet

    async def load(agent: SimAgent) -> int:
        initial = [e for e in agent.workload_entries() if "/initial/" in str(e.spiffe_id)]
        signed = await agent.sign(initial)
        await agent.renew()
        again = await agent.sign(initial)
        return len(signed.issued) + len(again.issued)

    # The load runs on the fleet's loop while this thread (and a second one) create entries.
    load_done = sim.call_soon(sim.each(load))
    parents = [a.spiffe_id for a in fleet.agents]
    created: list[dict[str, set[str]]] = []

    def create(tag: str) -> None:
        with fleet.server.admin_channel() as admin:
            created.append(workload_entries(admin, parents, 2, tag, batch=7))

    writers = [threading.Thread(target=create, args=(f"load{n}",)) for n in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(WAIT)
    issued = load_done.result(WAIT)
    assert len(created) == 2
    for more in created:
        for parent, ids in more.items():
            fleet.wanted[parent] |= ids

    for agent in fleet.agents:
        sim.call(
            sim.wait_for(
                agent,
                lambda a: _holds_exactly(a, fleet.wanted[a.spiffe_id]),
                WAIT,
                "its entries after the concurrent creates",
            )
        )
    assert issued == [2 * PER_AGENT] * AGENTS
    for agent in fleet.agents:
        assert agent.renewals == 1
        signed_ids = {str(svid.spiffe_id) for svid in agent.svids.values()}
        assert signed_ids == {s for s in fleet.wanted[agent.spiffe_id] if "/initial/" in s}


def test_an_agent_cannot_sign_another_agents_entry(fleet: FleetUnderTest) -> None:
    """An agent asking for an SVID of an entry under another agent is refused for it."""
    sim = fleet.fleet
    thief, victim = fleet.agents[1], fleet.agents[2]
    stolen = victim.workload_entries()[0]
    signed = sim.call(thief.sign([stolen]))
    assert signed.issued == []
    assert signed.refused == [stolen.id]


def test_a_ban_under_load_stops_only_that_agent(fleet: FleetUnderTest) -> None:
    """Banning one agent while all of them sign ends that agent's stream and signing (its
    stored SVID is deleted); every other agent still gets new entries and SVIDs."""
    sim = fleet.fleet
    banned, others = fleet.agents[0], fleet.agents[1:]

    async def keep_signing(agent: SimAgent) -> str:
        try:
            for _ in range(5):
                await agent.sign()
        except AgentBanned:
            return "banned"
        except ServerRefused as exc:
            return f"refused: {exc.message}"
        return "signed"

    load = sim.call_soon(sim.each(keep_signing))
    with fleet.server.admin_channel() as admin:
        admin_pb2_grpc.AgentsStub(admin).BanAgent(
            admin_pb2.BanAgentRequest(spiffe_id=banned.spiffe_id, reason="fleet test"), timeout=30
        )
    outcomes = load.result(WAIT)
    sim.call(sim.wait_for(banned, lambda a: a.removed is not None, WAIT, "the ban"))
    assert isinstance(banned.removed, AgentBanned)
    assert banned.store.load() is None  # the stored SVID was forgotten
    assert outcomes[1:] == ["signed"] * len(others)
    with pytest.raises((AgentBanned, ServerRefused)):
        sim.call(banned.sign())

    with fleet.server.admin_channel() as admin:
        after = workload_entries(admin, [a.spiffe_id for a in fleet.agents], 1, "after-ban")
    for agent in others:
        fleet.wanted[agent.spiffe_id] |= after[agent.spiffe_id]
        sim.call(
            sim.wait_for(
                agent,
                lambda a: _holds_exactly(a, fleet.wanted[a.spiffe_id]),
                WAIT,
                "the entry created after the ban",
            )
        )
        assert agent.removed is None and agent.failure is None
    signed = sim.call(sim.each(lambda a: a.sign(), others))
    assert all(
        len(s.issued) == len(fleet.wanted[a.spiffe_id]) for a, s in zip(others, signed, strict=True)
    )
    # the banned agent's stream is gone: the entry created under it never reached it
    assert not after[banned.spiffe_id] & banned.recorder.spiffe_ids
