"""``credo-agent api ...`` against a real Workload API server."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

from click.testing import CliRunner
from workload_api_fakes import MY_UID, Api

from credo.x509svid import X509Svid
from node_agent.cache.errors import JwtSvidUnavailable
from node_agent.cli.api import api as api_cli


def test_fetch_x509_write(api: Api, tmp_path: Path) -> None:
    """``api fetch x509 --write DIR`` prints the IDs and writes PEM files, keys 0600."""
    api.manager.add([MY_UID], "spiffe://example.org/workload", hint="main")
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(
        api_cli, ["fetch", "x509", "--socket", api.endpoint, "--write", str(out_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "spiffe://example.org/workload" in result.output
    assert "main" in result.output
    names = sorted(os.listdir(out_dir))
    assert names == ["bundle.0.pem", "federated_bundle.0.0.pem", "svid.0.key", "svid.0.pem"]
    assert stat.S_IMODE(os.stat(out_dir / "svid.0.key").st_mode) == 0o600
    svid = X509Svid.parse(
        (out_dir / "svid.0.pem").read_bytes(), (out_dir / "svid.0.key").read_bytes()
    )
    assert str(svid.spiffe_id) == "spiffe://example.org/workload"


def test_fetch_jwt_and_validate(api: Api) -> None:
    """``api fetch jwt`` prints a token that ``api validate jwt`` accepts."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    runner = CliRunner()
    result = runner.invoke(
        api_cli,
        ["fetch", "jwt", "--socket", api.endpoint, "--audience", "db", "--output", "json"],
    )
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)
    assert entry["spiffe_id"] == "spiffe://example.org/workload"
    result = runner.invoke(
        api_cli,
        ["validate", "jwt", "--socket", api.endpoint, "--audience", "db", "--svid", entry["svid"]],
    )
    assert result.exit_code == 0, result.output
    assert "SVID is valid." in result.output
    result = runner.invoke(api_cli, ["fetch", "jwt-bundle", "--socket", api.endpoint])
    assert result.exit_code == 0 and "spiffe://example.org" in result.output


def test_bad_socket_is_one_line_error() -> None:
    """A malformed --socket prints one line on stderr and exits 1, without a traceback."""
    result = CliRunner().invoke(api_cli, ["fetch", "x509", "--socket", "tcp://localhost"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: invalid Workload API endpoint")
    assert "Traceback" not in result.output


def test_no_identity_is_one_line_error(api: Api) -> None:
    """A caller with no identity gets a one-line PERMISSION_DENIED error and exit 1."""
    result = CliRunner().invoke(api_cli, ["fetch", "x509", "--socket", api.endpoint])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    assert "no identity for this process" in result.stderr
    assert "registration entry" in result.stderr


def test_agent_not_running_is_one_line_error(tmp_path: Path) -> None:
    """With no socket, or a socket nobody listens on, the CLI asks whether the agent runs."""
    missing = tmp_path / "missing.sock"
    result = CliRunner().invoke(
        api_cli, ["fetch", "x509", "--socket", f"unix://{missing}", "--timeout", "5"]
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: no Workload API socket at {missing}: is credo-agent running?"
    )
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_behind:
        left_behind.bind(str(stale))
    result = CliRunner().invoke(
        api_cli, ["fetch", "jwt", "--audience", "a", "--socket", f"unix://{stale}"]
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: nothing listens on the Workload API socket {stale}: is credo-agent running?"
    )


def test_agent_unavailable_answer_is_not_called_not_running(api: Api) -> None:
    """When the agent answers UNAVAILABLE (its server is unreachable), the CLI prints the
    agent's reason, not "is credo-agent running?"."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    api.manager.jwt_error = JwtSvidUnavailable("server 10.0.0.1:8081: UNAVAILABLE: down")
    result = CliRunner().invoke(
        api_cli, ["fetch", "jwt", "--audience", "db", "--socket", api.endpoint]
    )
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "server 10.0.0.1:8081: UNAVAILABLE: down" in line and "\n" not in line
    assert "is credo-agent running" not in line


def test_watch_prints_updates_until_interrupted(api: Api) -> None:
    """``api watch`` prints the current context, then each update, and exits 0 on Ctrl-C."""
    import signal
    import subprocess
    import sys

    api.manager.add([MY_UID], "spiffe://example.org/workload")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from node_agent.cli.api import api; api()",
            "watch",
            "--socket",
            api.endpoint,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("Received 1 svid(s)")
        api.manager.add([MY_UID], "spiffe://example.org/second")
        api.loop.run(api.manager.push())
        while not (line := proc.stdout.readline()).startswith("Received"):
            assert line, "watch ended early"
        assert line.startswith("Received 2 svid(s)")
        proc.send_signal(signal.SIGINT)
        # Generous: interpreter and gRPC shutdown take seconds on a loaded 2-core machine.
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in err
