"""Every refusal of an agent call says why in trailing metadata ``credo-refusal``.

The codes are the contract agents act on (:mod:`credo._protocol`); the status codes and
messages stay what they were.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from credo._protocol import REFUSAL_KEY, Refusal, refusal_in
from credo.keys import generate_private_key
from tests.helpers.server import AttestedAgent, InProcessServer, make_csr
from tests.unit.server.api.test_agent_api import create_entry, get_bundle, renew, sign


def _refusal(err: grpc.RpcError) -> Refusal | None:
    return refusal_in(err.trailing_metadata())  # type: ignore[attr-defined]


def _refused(call: object) -> grpc.RpcError:
    """Run ``call()`` and return the RpcError it raised."""
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    return err.value


def test_the_contract_values_are_stable() -> None:
    """The key and the codes agents read are spelled as documented."""
    assert REFUSAL_KEY == "credo-refusal"
    assert {r.value for r in Refusal} == {
        "banned",
        "evicted",
        "svid_expired",
        "svid_not_current",
        "untrusted_authority",
        "no_agent_svid",
        "not_an_agent",
        "not_authorized",
        "rate_limited",
        "attestation_refused",
    }


def test_refusal_in_reads_only_known_codes() -> None:
    """refusal_in finds the code among other metadata, and ignores unknown codes."""
    assert refusal_in([("x", "y"), (REFUSAL_KEY, b"banned")]) is Refusal.BANNED
    assert refusal_in([(REFUSAL_KEY, "something_new")]) is None
    assert refusal_in(None) is None


@pytest.mark.parametrize("action", [Refusal.BANNED, Refusal.EVICTED], ids=["ban", "delete"])
def test_banned_or_deleted_agent_is_refused_with_banned_or_evicted(
    server: InProcessServer, action: Refusal
) -> None:
    """After a ban the agent's calls say banned; after an operator deleted it, evicted.
    (Open sync streams: tests/unit/server/api/test_sync.py.)"""
    agent = server.attest(server.create_join_token())
    agents = admin_pb2_grpc.AgentsStub(server.admin_channel())
    if action is Refusal.BANNED:
        agents.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent.agent_id))
    else:
        agents.DeleteAgent(admin_pb2.DeleteAgentRequest(spiffe_id=agent.agent_id))
    err = _refused(lambda: get_bundle(agent))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _refusal(err) is action


def test_superseded_agent_svid_is_refused_with_svid_not_current(server: InProcessServer) -> None:
    """Once a renewed agent SVID has been used, the previous one is told svid_not_current."""
    agent = server.attest(server.create_join_token())
    get_bundle(renew(agent))
    err = _refused(lambda: get_bundle(agent))
    assert _refusal(err) is Refusal.SVID_NOT_CURRENT


def test_call_without_agent_svid_is_refused_with_no_agent_svid(server: InProcessServer) -> None:
    """A call other than AttestAgent made without a client certificate is no_agent_svid."""
    stub = agent_pb2_grpc.AgentStub(server.bootstrap_channel())
    err = _refused(lambda: stub.GetBundle(agent_pb2.GetBundleRequest(), timeout=10))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _refusal(err) is Refusal.NO_AGENT_SVID


def test_workload_svid_as_client_certificate_is_refused_with_not_an_agent(
    server: InProcessServer,
) -> None:
    """A workload SVID of the trust domain (not an agent's) gets not_an_agent."""
    key = generate_private_key()
    minted = (
        admin_pb2_grpc.SvidsStub(server.admin_channel())
        .MintX509SVID(
            admin_pb2.MintX509SVIDRequest(spiffe_id="spiffe://example.org/w", csr=make_csr(key))
        )
        .svid
    )
    workload = AttestedAgent(
        "spiffe://example.org/w", key, list(minted.cert_chain), server.bundle(), server.target
    )
    err = _refused(lambda: get_bundle(workload))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _refusal(err) is Refusal.NOT_AN_AGENT


def test_other_agents_entry_is_refused_with_not_authorized(server: InProcessServer) -> None:
    """A JWT-SVID for an entry of another agent is refused with not_authorized."""
    agent = server.attest(server.create_join_token())
    other = server.attest(server.create_join_token())
    theirs = create_entry(server, "spiffe://example.org/theirs", other.agent_id)
    with agent.channel() as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        err = _refused(
            lambda: stub.NewJWTSVID(
                agent_pb2.NewJWTSVIDRequest(entry_id=theirs, audience=["db"]), timeout=10
            )
        )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == f"entry {theirs!r} is not authorized for this agent"
    assert _refusal(err) is Refusal.NOT_AUTHORIZED


def test_used_join_token_is_refused_with_attestation_refused(server: InProcessServer) -> None:
    """A join token never works twice: the second attestation is attestation_refused."""
    token = server.create_join_token()
    server.attest(token)
    err = _refused(lambda: server.attest(token))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "join token does not exist or has already been used"
    assert _refusal(err) is Refusal.ATTESTATION_REFUSED


def test_unknown_attestation_type_is_refused_with_attestation_refused(
    server: InProcessServer,
) -> None:
    """Attestation data of a type the server has no attestor for names the known ones."""
    stub = agent_pb2_grpc.AgentStub(server.bootstrap_channel())
    err = _refused(
        lambda: stub.AttestAgent(
            agent_pb2.AttestAgentRequest(
                attestation_data=agent_pb2.AttestationData(type="tpm", payload=b"x"),
                csr=make_csr(),
            ),
            timeout=10,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "attestation_data.type: unknown node attestor 'tpm'; this server supports: join_token"
    )
    assert _refusal(err) is Refusal.ATTESTATION_REFUSED


def test_rate_limits_are_refused_with_rate_limited(tmp_path: Path) -> None:
    """Over the attestation or the signing rate, the refusal is rate_limited."""
    with InProcessServer(tmp_path, attestation_rate_limit=0.01, signing_rate_limit=0.01) as server:
        agent = server.attest(server.create_join_token())
        sign(agent)  # the signing burst is one call
        err = _refused(lambda: sign(agent))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _refusal(err) is Refusal.RATE_LIMITED
        codes = []
        for _ in range(6):  # the attestation burst is five per address (one used above)
            try:
                server.attest("unknown")
            except grpc.RpcError as refused:
                codes.append(_refusal(refused))
        assert codes[-1] is Refusal.RATE_LIMITED
        assert codes[0] is Refusal.ATTESTATION_REFUSED


def test_invalid_request_is_not_a_refusal(server: InProcessServer) -> None:
    """A malformed request (too many CSRs) is INVALID_ARGUMENT without a credo-refusal."""
    agent = server.attest(server.create_join_token())
    err = _refused(lambda: sign(agent, *[("x", make_csr())] * 501))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _refusal(err) is None
