"""SPIFFE IDs under /credo belong to the server and its agents: no one else may hold them."""

from __future__ import annotations

import grpc
import pytest

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from tests.helpers.server import InProcessServer, make_csr


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


@pytest.mark.parametrize("path", ["/credo/server", "/credo/agent/join_token/x", "/credo"])
def test_entries_and_join_token_aliases_cannot_name_reserved_ids(
    server: InProcessServer, path: str
) -> None:
    """An entry, or a join token alias, for a SPIFFE ID under /credo is INVALID_ARGUMENT."""
    spiffe_id = f"spiffe://example.org{path}"
    entries = admin_pb2_grpc.EntriesStub(server.admin_channel())
    with pytest.raises(grpc.RpcError) as err:
        entries.BatchCreateEntry(
            admin_pb2.BatchCreateEntryRequest(
                entries=[
                    types_pb2.RegistrationEntry(
                        spiffe_id=spiffe_id,
                        parent_id="spiffe://example.org/parent",
                        selectors=[types_pb2.Selector(type="unix", value="uid:1")],
                    )
                ]
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reserved" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        admin_pb2_grpc.AgentsStub(server.admin_channel()).CreateJoinToken(
            admin_pb2.CreateJoinTokenRequest(spiffe_id=spiffe_id)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reserved" in err.value.details()
