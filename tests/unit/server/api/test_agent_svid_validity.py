"""An agent SVID stops working when the authority that signed it is revoked, or it expires."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from credo._protocol import Refusal, refusal_in
from tests.helpers.server import InProcessServer
from tests.unit.server.api.test_agent_api import get_bundle


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
    assert refusal_in(err.value.trailing_metadata()) is Refusal.UNTRUSTED_AUTHORITY
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
        assert refusal_in(err.value.trailing_metadata()) is Refusal.SVID_EXPIRED
