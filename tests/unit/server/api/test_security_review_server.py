"""Security review of the signing server: regressions for authorization and agent checks."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from credo.selector import Selector
from server.authorization import EntryIndex
from server.datastore.models import RegistrationEntry
from tests.helpers.server import AttestedAgent, InProcessServer, make_csr
from tests.unit.server.api.test_agent_api import create_entry, get_bundle, sign

AGENT = "spiffe://td/credo/agent/x"
SERVER = "spiffe://td/credo/server"
NODE = Selector("k8s_psat", "cluster:a")
UID = (Selector("unix", "uid:1"),)


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


def test_entry_expiring_after_first_use_is_refused(server: InProcessServer) -> None:
    """The per-agent authorization memo must not outlive an entry's (or its parent's) expiry."""
    agent = server.attest(server.create_join_token())
    expires_at = int(time.time()) + 3
    parent = create_entry(
        server, "spiffe://example.org/parent", agent.agent_id, expires_at=expires_at
    )
    child = create_entry(server, "spiffe://example.org/child", "spiffe://example.org/parent")
    # Served (and memoised) while valid.
    assert _new_jwt(agent, parent).svid.token
    assert sign(agent, (child, make_csr())).results[0].svid.cert_chain
    time.sleep(max(0.0, expires_at - time.time()) + 1.1)
    with pytest.raises(grpc.RpcError) as err:
        _new_jwt(agent, parent)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    result = sign(agent, (child, make_csr())).results[0]
    assert result.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert not result.svid.cert_chain


def test_agent_svid_of_revoked_authority_is_refused_on_open_connection(
    server: InProcessServer,
) -> None:
    """Revoking the authority that signed an agent's SVID ends its service, even on a
    TLS connection established before the revocation."""
    agent = server.attest(server.create_join_token())
    authorities = admin_pb2_grpc.LocalAuthorityStub(server.admin_channel())
    old = authorities.GetAuthorityState(admin_pb2.AuthorityRequest(kind="x509")).active
    with agent.channel() as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        stub.GetBundle(agent_pb2.GetBundleRequest(), timeout=10)  # connection now open
        new = authorities.PrepareAuthority(admin_pb2.AuthorityRequest(kind="x509"))
        authorities.ActivateAuthority(
            admin_pb2.AuthorityRequest(kind="x509", authority_id=new.authority_id)
        )
        authorities.TaintAuthority(
            admin_pb2.AuthorityRequest(kind="x509", authority_id=old.authority_id)
        )
        stub.GetBundle(agent_pb2.GetBundleRequest(), timeout=10)  # tainted: still trusted
        authorities.RevokeAuthority(
            admin_pb2.AuthorityRequest(kind="x509", authority_id=old.authority_id)
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.GetBundle(agent_pb2.GetBundleRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no longer trusted" in err.value.details()
    # A fresh agent (SVID from the new authority) is served, once the server's own SVID
    # has been re-signed by the new authority (checked every second).
    deadline = time.monotonic() + 10
    while True:
        try:
            fresh = server.attest(server.create_join_token())
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert get_bundle(fresh).bundle.x509_authorities


def test_agent_endpoint_refuses_oversized_unauthenticated_requests(
    server: InProcessServer,
) -> None:
    """The agent endpoint (reachable before any authentication) does not buffer 64 MiB
    requests: a 5 MiB attestation is refused by the message size limit."""
    stub = agent_pb2_grpc.AgentStub(server.bootstrap_channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.AttestAgent(
            agent_pb2.AttestAgentRequest(
                attestation_data=agent_pb2.AttestationData(
                    type="join_token", payload=b"x" * (5 * 1024 * 1024)
                ),
                csr=make_csr(),
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stale_node_update_does_not_lift_a_ban(tmp_path: Path) -> None:
    """RenewAgent and the renewed-serial switch write back a node read before a concurrent
    ban (read, ban, write): the ban must survive; only eviction clears it."""
    from dataclasses import replace

    from server.datastore.models import AttestedNode
    from server.datastore.sql import SqlDataStore

    ds = SqlDataStore.open(f"sqlite:///{tmp_path / 'ds.sqlite'}")
    try:
        agent = "spiffe://example.org/credo/agent/join_token/t"
        ds.create_attested_node(AttestedNode(agent, "join_token", (), "a1", 1))
        stale = ds.fetch_attested_node(agent)
        assert stale is not None and not stale.banned
        fresh = ds.fetch_attested_node(agent)
        assert fresh is not None
        ds.update_attested_node(replace(fresh, banned=True))  # admin BanAgent
        ds.update_attested_node(replace(stale, new_cert_serial="b2", new_cert_not_after=2))
        node = ds.fetch_attested_node(agent)
        assert node is not None and node.banned
    finally:
        ds.close()


def test_csr_for_a_weak_curve_is_refused(server: InProcessServer) -> None:
    """A CSR whose key is on a curve other than P-256/384/521 gets a per-item INVALID_ARGUMENT."""
    from cryptography.hazmat.primitives.asymmetric import ec

    agent = server.attest(server.create_join_token())
    entry_id = create_entry(server, "spiffe://example.org/weak", agent.agent_id)
    weak = make_csr(ec.generate_private_key(ec.SECP256K1()))  # type: ignore[arg-type]
    good = make_csr()
    results = sign(agent, (entry_id, weak), (entry_id, good)).results
    assert results[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "curve secp256k1 is not supported" in results[0].status.message
    assert results[1].status.code == 0


def test_admin_socket_in_a_shared_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    """An admin socket in a directory others can enter fails start, and the mode is untouched."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    server = InProcessServer(tmp_path, admin_socket=shared / "api.sock")
    with pytest.raises(OSError, match="open to other users"):
        server.start()
    assert shared.stat().st_mode & 0o7777 == 0o1777


@pytest.mark.parametrize("path", ["/credo/server", "/credo/agent/join_token/x", "/credo"])
def test_admin_cannot_mint_reserved_ids(server: InProcessServer, path: str) -> None:
    """Minting an SVID for the server's or an agent's reserved ID is INVALID_ARGUMENT."""
    stub = admin_pb2_grpc.SvidsStub(server.admin_channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.MintJWTSVID(
            admin_pb2.MintJWTSVIDRequest(spiffe_id=f"spiffe://example.org{path}", audience=["a"])
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reserved" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.MintX509SVID(
            admin_pb2.MintX509SVIDRequest(spiffe_id=f"spiffe://example.org{path}", csr=make_csr())
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sync_stream_ends_when_the_agent_svid_expires(tmp_path: Path) -> None:
    """An entry stream opened with an agent SVID ends (UNAUTHENTICATED) once that SVID expires."""
    with InProcessServer(tmp_path, agent_svid_ttl=3) as server:
        agent = server.attest(server.create_join_token())
        with agent.channel() as ch:
            stream = agent_pb2_grpc.AgentStub(ch).SyncEntries(
                agent_pb2.SyncEntriesRequest(), timeout=60
            )
            first = next(stream)
            assert first.full
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in err.value.details()
