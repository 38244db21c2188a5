"""Join tokens and JWT-SVIDs given without putting them in `ps`: a real `credo-server run`,
real `credo-agent run` processes, and `credo-agent api validate jwt` as a subprocess."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    credo_agent_command,
    join_token,
    start_server,
    wait_for,
    write_server_bundle,
)

pytest.importorskip("spiffe")

TD = "example.org"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(tmp_path_factory.mktemp("secrets")) as running:
        yield running


def _cmdline(agent: AgentProcess) -> str:
    """What `ps` shows of the agent's command line."""
    assert agent.proc is not None
    return Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _joined_without_the_token_in_ps(agent: AgentProcess, token: str) -> None:
    """The agent attested with ``token`` (its SPIFFE ID says so) and ``ps`` does not show it."""
    assert token not in _cmdline(agent)
    assert f"join_token/{token[:8]}" in agent.logs  # "node attested spiffe_id=..."


def _agent(server: ServerProcess, root: Path, token: str, **flags: object) -> AgentProcess:
    agent = AgentProcess(
        root, server.address, write_server_bundle(server, root / "bundle.pem"), None, flags=flags
    )
    agent.joined_token = token
    return agent


def test_join_token_from_a_file(server: ServerProcess, root: Path) -> None:
    """`--join-token-file FILE` attests with the token in FILE; `ps` does not show it."""
    token = join_token(server)
    path = root / "token"
    path.write_text(token + "\n")
    with _agent(server, root, token, join_token_file=path).start() as agent:
        _joined_without_the_token_in_ps(agent, token)


def test_join_token_from_the_environment(
    server: ServerProcess, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no join-token flag, `$CREDO_JOIN_TOKEN` is the token."""
    token = join_token(server)
    monkeypatch.setenv("CREDO_JOIN_TOKEN", token)
    with _agent(server, root, token).start() as agent:
        _joined_without_the_token_in_ps(agent, token)


def test_join_token_from_stdin(server: ServerProcess, root: Path) -> None:
    """`--join-token -` reads the token from standard input."""
    token = join_token(server)
    with _agent(server, root, token, join_token="-").start(stdin=token.encode()) as agent:
        _joined_without_the_token_in_ps(agent, token)


def test_both_join_token_flags_is_one_line_error(server: ServerProcess, root: Path) -> None:
    """`--join-token` and `--join-token-file` together are refused in one line."""
    result = subprocess.run(
        [*credo_agent_command(), "run", "--server-address", server.address,
         "--join-token", "x", "--join-token-file", str(root / "t")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: give --join-token or --join-token-file, not both"


def test_validate_jwt_reads_the_svid_from_a_file_stdin_or_the_environment(
    server: ServerProcess, root: Path
) -> None:
    """`api validate jwt` takes the token from --svid-file, `--svid -` or $CREDO_JWT_SVID."""
    token = join_token(server)
    with _agent(server, root, token, join_token_file=_write(root / "t", token)).start() as agent:
        spiffe_id = f"spiffe://{TD}/secrets/validator"
        create_entry(server, agent.spiffe_id, spiffe_id)
        wait_for(lambda: spiffe_id in agent.fetch_ids(), 20, "the workload's SVID")
        fetched = subprocess.run(
            [*credo_agent_command(), "api", "fetch", "jwt", "--audience", "db",
             "--socket", agent.endpoint, "--output", "json"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        svid = fetched.stdout.split('"svid": "')[1].split('"')[0]
        validate = [*credo_agent_command(), "api", "validate", "jwt", "--audience", "db",
                    "--socket", agent.endpoint]  # fmt: skip
        runs = {
            "file": subprocess.run(
                [*validate, "--svid-file", str(_write(root / "svid", svid))],
                capture_output=True, text=True, timeout=60,
            ),
            "stdin": subprocess.run(
                [*validate, "--svid", "-"], input=svid + "\n",
                capture_output=True, text=True, timeout=60,
            ),
            "env": subprocess.run(
                validate, env={**os.environ, "CREDO_JWT_SVID": svid},
                capture_output=True, text=True, timeout=60,
            ),
        }  # fmt: skip
        for how, result in runs.items():
            assert result.returncode == 0, (how, result.stderr)
            assert f"SPIFFE ID : {spiffe_id}" in result.stdout, how
        missing = subprocess.run(validate, capture_output=True, text=True, timeout=60)
        assert missing.returncode == 1
        assert missing.stderr.strip() == (
            "Error: no JWT-SVID given: pass --svid-file FILE, --svid - (stdin) or set "
            "$CREDO_JWT_SVID"
        )


def test_help_says_where_secrets_may_come_from() -> None:
    """`--help` names the file, stdin and environment ways, and warns that arguments show
    in `ps`."""
    run_help = subprocess.run(
        [*credo_agent_command(), "run", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    validate_help = subprocess.run(
        [*credo_agent_command(), "api", "validate", "jwt", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for text, env in ((run_help, "$CREDO_JOIN_TOKEN"), (validate_help, "$CREDO_JWT_SVID")):
        flat = " ".join(text.split())
        assert "-file FILE" in flat and "'-' reads it from stdin" in flat and env in flat
        assert "visible to every local user in `ps`" in flat


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
