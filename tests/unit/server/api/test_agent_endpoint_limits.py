"""Limits on the agent endpoint: per-agent signing rates, and the size of requests."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from credo._proto.credo.server.v1 import agent_pb2, agent_pb2_grpc
from credo.keys import generate_private_key
from tests.helpers.server import InProcessServer, make_csr


def _sign_once(channel: grpc.Channel) -> grpc.StatusCode:
    csr = make_csr(generate_private_key())
    try:
        agent_pb2_grpc.AgentStub(channel).BatchNewX509SVID(
            agent_pb2.BatchNewX509SVIDRequest(
                params=[agent_pb2.NewX509SVIDParams(entry_id="no-such-entry", csr=csr)]
            ),
            timeout=10,
        )
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_signing_calls_beyond_the_agent_rate_are_resource_exhausted(tmp_path: Path) -> None:
    """An agent over its signing-call budget is told RESOURCE_EXHAUSTED; another agent is not."""
    with InProcessServer(tmp_path, signing_rate_limit=0.01) as server:
        noisy = server.attest(server.create_join_token())
        quiet = server.attest(server.create_join_token())
        with noisy.channel() as ch:
            codes = [_sign_once(ch) for _ in range(3)]
        assert codes[0] == grpc.StatusCode.OK  # per-item refusal, the call itself succeeds
        assert codes[1:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        with quiet.channel() as ch:
            assert _sign_once(ch) == grpc.StatusCode.OK


@pytest.mark.parametrize("value", [0, -1], ids=["zero", "negative"])
def test_non_positive_rate_limit_is_a_config_error(value: float) -> None:
    """A rate limit of zero or less is refused when the configuration is loaded."""
    from server.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rate"):
        load_config(None, {"signing_rate_limit": value})


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
