"""The agent's keepalive pings and what the agent endpoint accepts agree (issue 8: a server
that allowed fewer pings answered the agent's with GOAWAY too_many_pings)."""

from __future__ import annotations

from credo._protocol import AGENT_CHANNEL_KEEPALIVE, AGENT_SERVER_KEEPALIVE
from node_agent import server_client
from server import app


def test_the_server_accepts_the_agents_pings() -> None:
    client, server = dict(AGENT_CHANNEL_KEEPALIVE), dict(AGENT_SERVER_KEEPALIVE)
    assert server["grpc.http2.min_ping_interval_without_data_ms"] < client["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0  # idle sync streams get pings


def test_both_ends_use_the_shared_options() -> None:
    assert set(AGENT_CHANNEL_KEEPALIVE) <= set(server_client._CHANNEL_OPTIONS)
    assert set(AGENT_SERVER_KEEPALIVE) <= set(app._AGENT_GRPC_OPTIONS)
    keys = [k for k, _ in server_client._CHANNEL_OPTIONS]
    assert len(keys) == len(set(keys)), "an option set twice"
