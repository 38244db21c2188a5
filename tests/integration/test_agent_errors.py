"""What `credo-agent` says when something is wrong, run as a user would run it: a real
`credo-server run`, real `credo-agent run` processes, and the `credo-agent` CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    credo_agent_command,
    short_temp_dir,
    start_agent,
    start_server,
    wait_for,
)

pytest.importorskip("spiffe")

TD = "example.org"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(tmp_path_factory.mktemp("errors")) as running:
        yield running


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_temp_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*credo_agent_command(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_jwt_with_an_empty_audience_keeps_the_servers_invalid_argument(
    server: ServerProcess, root: Path
) -> None:
    """`api fetch jwt --audience ''` against a running agent reports the server's
    INVALID_ARGUMENT and its reason, not "is credo-agent running?"."""
    with start_agent(server, root) as agent:
        spiffe_id = f"spiffe://{TD}/errors/jwt"
        create_entry(server, agent.spiffe_id, spiffe_id)
        wait_for(lambda: spiffe_id in agent.fetch_ids(), 20, "the workload's SVID")
        line = _one_line_error(
            _agent_cli("api", "fetch", "jwt", "--audience", "", "--socket", agent.endpoint)
        )
        assert "INVALID_ARGUMENT" in line
        assert "non-empty audience is required" in line
        assert "is credo-agent running" not in line
        ok = _agent_cli("api", "fetch", "jwt", "--audience", "db", "--socket", agent.endpoint)
        assert ok.returncode == 0, ok.stderr


def test_stopped_agent_is_reported_as_not_running(server: ServerProcess, root: Path) -> None:
    """After the agent stopped, `api fetch x509` asks whether credo-agent is running."""
    agent: AgentProcess = start_agent(server, root)
    agent.stop()
    line = _one_line_error(_agent_cli("api", "fetch", "x509", "--socket", agent.endpoint))
    assert line.endswith("is credo-agent running?")
