"""Real log lines of ``credo-server`` and ``credo-agent``, in both formats: the fields of a
refused Workload API call are there, and no join token, private key or whole JWT is."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from credo._proto import workload_pb2, workload_pb2_grpc
from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    short_temp_dir,
    start_agent,
    start_server,
    wait_for,
)

HEADER = (("workload.spiffe.io", "true"),)
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


@dataclass
class Logged:
    fmt: str
    server: ServerProcess
    agent: AgentProcess
    token: str
    jwt: str


def _stub(agent: AgentProcess) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"unix:{agent.socket}")
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module", params=["text", "json"])
def logged(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Logged]:
    """A server and an agent logging in one format, after a refused call and a JWT fetch."""
    fmt = request.param
    root = short_temp_dir("credo-logs-")
    try:
        with (
            start_server(tmp_path_factory.mktemp(f"logs-{fmt}"), log_format=fmt) as server,
            start_agent(server, root, log_format=fmt) as agent,
        ):
            channel, stub = _stub(agent)
            with channel:
                # 1. no entry yet: refused
                with pytest.raises(grpc.RpcError) as refused:
                    next(
                        stub.FetchX509SVID(
                            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=30
                        )
                    )
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                # 2. an entry for this uid: X.509 and JWT-SVIDs are issued
                create_entry(server, agent.spiffe_id, "spiffe://example.org/logs/w")
                wait_for(lambda: agent.fetch_ids(), 30, "the SVID")
                reply = stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(audience=["db"]), metadata=HEADER, timeout=30
                )
            assert agent.joined_token is not None
            yield Logged(fmt, server, agent, agent.joined_token, reply.svids[0].svid)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _lines(text: str, fmt: str) -> list[dict[str, Any]]:
    """Parse log lines; text lines become {"msg": ..., field: value} by their key=value pairs."""
    out = []
    for line in text.splitlines():
        if fmt == "json":
            if line.startswith("{"):
                out.append(json.loads(line))
            continue
        fields: dict[str, Any] = {"line": line}
        for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line):
            fields[key] = json.loads(value) if value.startswith('"') else value
        out.append(fields)
    return out


def test_refused_workload_call_is_logged_with_its_fields(logged: Logged) -> None:
    """The agent logs the refused call with the method, the caller's pid and uid, its
    selectors and the reason, as fields of one line."""
    lines = _lines(logged.agent.logs, logged.fmt)
    refused = [r for r in lines if "workload call refused" in str(r.get("msg", r.get("line")))]
    assert refused, logged.agent.logs
    record = refused[0]
    assert str(record["pid"]) == str(os.getpid())
    assert str(record["uid"]) == str(os.getuid())
    assert record["method"] == "FetchX509SVID"
    selectors = record["selectors"]
    if isinstance(selectors, str):
        selectors = selectors.split(",")
    assert f"unix:uid:{os.getuid()}" in selectors
    assert "no registration entry matches" in record["reason"]


@pytest.mark.parametrize("process", ["server", "agent"])
def test_no_join_token_key_or_jwt_in_any_log_line(logged: Logged, process: str) -> None:
    """Neither process writes the join token, a private key or a whole JWT; the agent ID
    appears only shortened."""
    text = logged.server.logs if process == "server" else logged.agent.logs
    assert text.strip()
    assert logged.token not in text
    assert "PRIVATE KEY" not in text
    assert logged.jwt not in text and logged.jwt.split(".")[2] not in text
    assert not JWT_SHAPE.search(text)
    if process == "agent":
        assert f"join_token/{logged.token[:8]}..." in text
