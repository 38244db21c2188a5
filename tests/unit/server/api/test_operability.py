"""Logs never carry secrets; metrics and health answer on their endpoints."""

from __future__ import annotations

import io
import logging
import urllib.request
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from credo._logging import StructuredFormatter
from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc
from tests.helpers.server import InProcessServer


def test_logs_hold_no_token_key_or_jwt(tmp_path: Path) -> None:
    """Across attestation and minting, no join token, private key or JWT reaches a log line."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(StructuredFormatter("json"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        with InProcessServer(tmp_path) as server:
            token = server.create_join_token()
            server.attest(token)
            jwt = (
                admin_pb2_grpc.SvidsStub(server.admin_channel())
                .MintJWTSVID(
                    admin_pb2.MintJWTSVIDRequest(spiffe_id="spiffe://example.org/w", audience=["a"])
                )
                .svid.token
            )
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    logs = out.getvalue()
    assert "attested agent" in logs
    assert token not in logs
    assert jwt not in logs and jwt.split(".")[2] not in logs
    assert "PRIVATE KEY" not in logs


def test_health_and_metrics(tmp_path: Path) -> None:
    """Both endpoints answer gRPC health checks; /metrics exposes the credo_* metrics."""
    with InProcessServer(tmp_path, metrics_address="127.0.0.1:0") as server:
        server.attest(server.create_join_token())
        for channel in (server.admin_channel(), server.bootstrap_channel()):
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        port = server.metrics_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'credo_svids_signed_total{kind="agent"} 1.0' in body
    assert 'credo_node_attestations_total{result="success"} 1.0' in body
    assert "credo_agents 1.0" in body
    assert "credo_ca_expiry_seconds" in body
