"""What `credo-agent` says when something is wrong, run as a user would run it: a real
`credo-server run`, real `credo-agent run` processes, and the `credo-agent` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from credo._reserved import server_spiffe_id
from credo.bundle import load_certificates
from credo.spiffe_id import TrustDomain
from node_agent.errors import ServerNotTrusted
from node_agent.server_client import verify_server_identity
from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    credo_agent_command,
    one_line_error,
    start_agent,
    start_server,
    wait_for,
    write_server_bundle,
)

pytest.importorskip("spiffe")

TD = "example.org"
TRUST = TrustDomain.parse(TD)
NOBODY = 65534


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(tmp_path_factory.mktemp("errors")) as running:
        yield running


# `credo-agent <args>` as uid/gid 65534: imported as root (the interpreter lives where
# nobody may read), then the ids are dropped before the command runs.
_AS_NOBODY = f"""
import os, sys
from node_agent.cli.main import main
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
sys.argv = ["credo-agent", *sys.argv[1:]]
main()
"""


def _agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*credo_agent_command(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_jwt_with_an_empty_audience_keeps_the_servers_invalid_argument(
    server: ServerProcess, root: Path
) -> None:
    """`api fetch jwt --audience ''` against a running agent reports the server's
    INVALID_ARGUMENT and its reason, not "is credo-agent running?"."""
    with start_agent(server, root) as agent:
        spiffe_id = f"spiffe://{TD}/errors/jwt"
        create_entry(server, agent.spiffe_id, spiffe_id)
        wait_for(lambda: spiffe_id in agent.fetch_ids(), 20, "the workload's SVID")
        line = one_line_error(
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
    line = one_line_error(_agent_cli("api", "fetch", "x509", "--socket", agent.endpoint))
    assert line.endswith("is credo-agent running?")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the CLI as another uid")
def test_healthcheck_by_a_user_who_cannot_open_the_admin_socket_says_permission_denied(
    server: ServerProcess, root: Path
) -> None:
    """`credo-agent healthcheck` run as another user says permission denied, not UNAVAILABLE."""
    with start_agent(server, root) as agent:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                _AS_NOBODY,
                "healthcheck",
                "--admin-socket",
                str(agent.admin_socket),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        line = one_line_error(result)
        assert line == (
            f"Error: agent is unhealthy: permission denied opening the agent's admin socket "
            f"{agent.admin_socket}: run the healthcheck as the agent's user or root"
        )


def test_a_bootstrap_bundle_from_before_a_ca_activation_says_to_refresh_it(
    server: ServerProcess, root: Path
) -> None:
    """An agent bootstrapped with a bundle copied before the server activated a new CA exits
    at once, saying the bundle lacks the server's current CA and how to refresh it."""
    stale = write_server_bundle(server, root / "stale.pem")
    old_authorities = tuple(load_certificates(stale.read_bytes()))
    prepared = server.cli_json("localauthority", "x509", "prepare")["authority_id"]
    server.cli_json("localauthority", "x509", "activate", "--authority-id", prepared)

    def server_presents_the_new_ca() -> bool:
        try:
            verify_server_identity(server.address, old_authorities, server_spiffe_id(TRUST))
        except ServerNotTrusted:
            return True
        return False

    wait_for(server_presents_the_new_ca, 30, "the server SVID signed by the new CA")
    agent = start_agent(server, root, bundle=stale, wait=False)
    assert agent.proc is not None
    assert agent.proc.wait(timeout=60) == 1
    errors = [line for line in agent.logs.splitlines() if line.startswith("Error: ")]
    assert errors == [
        f"Error: the bootstrap trust bundle {stale} does not contain the server's current CA "
        f"(server {server.address} presented a certificate that does not chain to the trusted "
        f"CAs (self-signed certificate in certificate chain)); the server's CA may have "
        f"rotated since it was copied: refresh it with 'credo-server bundle show --format "
        f"pem > {stale}'"
    ]
