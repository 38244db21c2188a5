"""The Agent service over real TLS: attestation, per-call agent checks, signing."""

from __future__ import annotations

import grpc
import jwt
import pytest
from cryptography import x509

from credo._proto.credo.server.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    types_pb2,
)
from credo.keys import generate_private_key
from tests.helpers.server import AttestedAgent, InProcessServer, make_csr


def create_entry(server: InProcessServer, spiffe_id: str, parent_id: str, **kw: object) -> str:
    pb = types_pb2.RegistrationEntry(
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=[types_pb2.Selector(type="unix", value="uid:1000")],
        **kw,  # type: ignore[arg-type]
    )
    stub = admin_pb2_grpc.EntriesStub(server.admin_channel())
    return stub.BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=[pb])).entries[0].id


def sign(agent: AttestedAgent, *params: tuple[str, bytes]) -> agent_pb2.BatchNewX509SVIDResponse:
    with agent.channel() as ch:
        return agent_pb2_grpc.AgentStub(ch).BatchNewX509SVID(
            agent_pb2.BatchNewX509SVIDRequest(
                params=[agent_pb2.NewX509SVIDParams(entry_id=e, csr=c) for e, c in params]
            ),
            timeout=10,
        )


def get_bundle(agent: AttestedAgent) -> agent_pb2.GetBundleResponse:
    with agent.channel() as ch:
        return agent_pb2_grpc.AgentStub(ch).GetBundle(agent_pb2.GetBundleRequest(), timeout=10)


def renew(agent: AttestedAgent) -> AttestedAgent:
    """RenewAgent with a new key; the agent as it is with the renewed SVID."""
    key = generate_private_key()
    with agent.channel() as ch:
        svid = (
            agent_pb2_grpc.AgentStub(ch)
            .RenewAgent(agent_pb2.RenewAgentRequest(csr=make_csr(key)), timeout=10)
            .svid
        )
    return AttestedAgent(agent.agent_id, key, list(svid.cert_chain), agent.bundle, agent.target)


def test_attest_returns_agent_svid_and_bundle(server: InProcessServer) -> None:
    """A join token yields an agent SVID for .../credo/agent/join_token/<token> and the bundle."""
    token = server.create_join_token()
    agent = server.attest(token)
    assert agent.agent_id == f"spiffe://example.org/credo/agent/join_token/{token}"
    leaf = x509.load_der_x509_certificate(agent.chain[0])
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [agent.agent_id]
    assert agent.bundle.x509_authorities
    nodes = admin_pb2_grpc.AgentsStub(server.admin_channel())
    node = nodes.GetAgent(admin_pb2.GetAgentRequest(spiffe_id=agent.agent_id))
    assert node.cert_serial == agent.serial and node.attestation_type == "join_token"


def test_calls_without_client_certificate_are_unauthenticated(server: InProcessServer) -> None:
    """Only AttestAgent works without the agent's SVID as client certificate."""
    stub = agent_pb2_grpc.AgentStub(server.bootstrap_channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.GetBundle(agent_pb2.GetBundleRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_csr_signature_is_refused_and_keeps_token(server: InProcessServer) -> None:
    """A CSR whose signature does not verify is INVALID_ARGUMENT and does not burn the token."""
    csr = bytearray(make_csr())
    csr[-1] ^= 0x01  # last byte of the ECDSA signature's s value
    token = server.create_join_token()
    stub = agent_pb2_grpc.AgentStub(server.bootstrap_channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.AttestAgent(
            agent_pb2.AttestAgentRequest(
                attestation_data=agent_pb2.AttestationData(
                    type="join_token", payload=token.encode()
                ),
                csr=bytes(csr),
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "signature" in err.value.details()
    server.attest(token)  # still usable


def test_unknown_token_is_permission_denied(server: InProcessServer) -> None:
    """An unknown join token is refused with a message saying so."""
    with pytest.raises(grpc.RpcError) as err:
        server.attest("no-such-token")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "join token does not exist or has already been used"


def test_spiffe_id_comes_from_entry_not_csr(server: InProcessServer) -> None:
    """The SVID has the entry's SPIFFE ID, DNS names and TTL whatever the CSR claims."""
    agent = server.attest(server.create_join_token())
    entry_id = create_entry(
        server,
        "spiffe://example.org/web",
        agent.agent_id,
        dns_names=["web.local"],
        x509_svid_ttl=120,
    )
    key = generate_private_key()
    result = sign(agent, (entry_id, make_csr(key, uri="spiffe://example.org/admin"))).results[0]
    assert result.status.code == 0, result.status.message
    leaf = x509.load_der_x509_certificate(result.svid.cert_chain[0])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/web"]
    assert san.get_values_for_type(x509.DNSName) == ["web.local"]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 120 <= lifetime.total_seconds() <= 131
    assert leaf.public_key() == key.public_key()


def test_unauthorized_entry_is_refused_per_item(server: InProcessServer) -> None:
    """An entry parented to another agent gets a per-item PERMISSION_DENIED; others are signed."""
    agent = server.attest(server.create_join_token())
    other = server.attest(server.create_join_token())
    mine = create_entry(server, "spiffe://example.org/mine", agent.agent_id)
    theirs = create_entry(server, "spiffe://example.org/theirs", other.agent_id)
    results = sign(agent, (mine, make_csr()), (theirs, make_csr()), ("missing", make_csr())).results
    assert [r.status.code for r in results] == [
        0,
        grpc.StatusCode.PERMISSION_DENIED.value[0],
        grpc.StatusCode.PERMISSION_DENIED.value[0],
    ]
    assert not results[1].svid.cert_chain


def test_bad_csr_in_batch_is_per_item_invalid(server: InProcessServer) -> None:
    """A CSR with a broken signature fails only its own item, with INVALID_ARGUMENT."""
    agent = server.attest(server.create_join_token())
    entry_id = create_entry(server, "spiffe://example.org/web", agent.agent_id)
    bad = bytearray(make_csr())
    bad[-1] ^= 0x01
    results = sign(agent, (entry_id, bytes(bad)), (entry_id, make_csr())).results
    assert results[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results[1].status.code == 0


def test_more_than_500_csrs_is_invalid(server: InProcessServer) -> None:
    """A batch of 501 CSRs is refused as a whole."""
    agent = server.attest(server.create_join_token())
    csr = make_csr()
    with pytest.raises(grpc.RpcError) as err:
        sign(agent, *[("x", csr)] * 501)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "params: too many CSRs: 501 > 500"


def test_banned_agent_is_refused_on_next_call(server: InProcessServer) -> None:
    """After a ban the agent's very next call is PERMISSION_DENIED."""
    agent = server.attest(server.create_join_token())
    get_bundle(agent)
    admin_pb2_grpc.AgentsStub(server.admin_channel()).BanAgent(
        admin_pb2.BanAgentRequest(spiffe_id=agent.agent_id)
    )
    with pytest.raises(grpc.RpcError) as err:
        get_bundle(agent)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "agent is banned"


def test_evicted_agent_can_attest_with_new_token(server: InProcessServer) -> None:
    """An evicted agent is refused with its old SVID and can attest again with a new token."""
    agent = server.attest(server.create_join_token())
    admin_pb2_grpc.AgentsStub(server.admin_channel()).DeleteAgent(
        admin_pb2.DeleteAgentRequest(spiffe_id=agent.agent_id)
    )
    with pytest.raises(grpc.RpcError) as err:
        get_bundle(agent)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    again = server.attest(server.create_join_token(), key=agent.key)
    assert get_bundle(again).bundle.x509_authorities


def test_renewal_retires_the_old_svid_once_the_new_one_is_used(server: InProcessServer) -> None:
    """RenewAgent issues a new SVID; both work until the new one is used, then only it."""
    agent = server.attest(server.create_join_token())
    renewed = renew(agent)
    get_bundle(agent)  # the old one still works until the new one is used
    get_bundle(renewed)
    with pytest.raises(grpc.RpcError) as err:
        get_bundle(agent)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "agent SVID is not current"


def test_jwt_svid_for_authorized_entry(server: InProcessServer) -> None:
    """NewJWTSVID signs for the entry's SPIFFE ID and audience; no audience is INVALID_ARGUMENT."""
    agent = server.attest(server.create_join_token())
    entry_id = create_entry(server, "spiffe://example.org/web", agent.agent_id)
    with agent.channel() as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        svid = stub.NewJWTSVID(
            agent_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=["db"]), timeout=10
        ).svid
        claims = jwt.decode(svid.token, options={"verify_signature": False})
        assert claims["sub"] == "spiffe://example.org/web" and claims["aud"] in ("db", ["db"])
        assert svid.expires_at == claims["exp"]
        with pytest.raises(grpc.RpcError) as err:
            stub.NewJWTSVID(agent_pb2.NewJWTSVIDRequest(entry_id=entry_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_attestation_rate_limit(tmp_path: object) -> None:
    """Attestations beyond the per-address burst are RESOURCE_EXHAUSTED."""
    from pathlib import Path

    with InProcessServer(Path(str(tmp_path)), attestation_rate_limit=0.01) as server:
        codes = []
        for _ in range(7):
            try:
                server.attest("unknown")
            except grpc.RpcError as err:
                codes.append(err.code())
        assert codes[:5] == [grpc.StatusCode.PERMISSION_DENIED] * 5
        assert codes[5:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


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


def _spki(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_batch_new_wit_svid_signs_authorized_entries_per_item(server: InProcessServer) -> None:
    """BatchNewWITSVID binds each item's public key to its entry's SPIFFE ID; an entry of
    another agent or a malformed key fails only its own item; the WIT key is in GetBundle."""
    agent = server.attest(server.create_join_token())
    mine = create_entry(server, "spiffe://example.org/wit/mine", agent.agent_id)
    other = create_entry(server, "spiffe://example.org/wit/other", "spiffe://example.org/x")
    key = generate_private_key()
    with agent.channel() as ch:
        response = agent_pb2_grpc.AgentStub(ch).BatchNewWITSVID(
            agent_pb2.BatchNewWITSVIDRequest(
                params=[
                    agent_pb2.NewWITSVIDParams(entry_id=mine, public_key=_spki(key.public_key())),
                    agent_pb2.NewWITSVIDParams(entry_id=other, public_key=_spki(key.public_key())),
                    agent_pb2.NewWITSVIDParams(entry_id=mine, public_key=b"junk"),
                ]
            ),
            timeout=10,
        )
    good, foreign, junk = response.results
    assert good.status.code == 0 and good.svid.spiffe_id == "spiffe://example.org/wit/mine"
    header = jwt.get_unverified_header(good.svid.token)
    assert header["typ"] == "wit+jwt"
    wit_keys = {k.key_id: k for k in get_bundle(agent).bundle.wit_authorities}
    assert header["kid"] in wit_keys
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    claims = jwt.decode(
        good.svid.token, load_der_public_key(wit_keys[header["kid"]].public_key), ["ES256"]
    )
    assert claims["exp"] == good.svid.expires_at
    assert jwt.PyJWK(claims["cnf"]["jwk"]).key.public_numbers() == key.public_key().public_numbers()
    assert foreign.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert junk.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "params[2].public_key" in junk.status.message
