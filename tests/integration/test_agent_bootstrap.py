"""How a new agent comes to trust the server: a bootstrap bundle, or --insecure-bootstrap."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    join_token,
    short_temp_dir,
    start_server,
    wait_for,
)

ENTRY_SELECTOR = "unix:uid:0"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with start_server(tmp_path) as srv:
        yield srv


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_temp_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _agent_log_has(agent: AgentProcess, text: str) -> bool:
    return text in agent.logs


def test_insecure_bootstrap_attests_and_warns(server: ServerProcess, root: Path) -> None:
    """Without a bundle, --insecure-bootstrap still attests, warns loudly, and serves SVIDs."""
    agent = AgentProcess(
        root, server.address, None, join_token(server), flags={"insecure_bootstrap": True}
    ).start()
    try:
        server.cli_json(
            "entry", "create", "--parent-id", agent.spiffe_id,
            "--spiffe-id", "spiffe://example.org/bootstrapped", "--selector", ENTRY_SELECTOR,
        )  # fmt: skip
        ids = wait_for(agent.fetch_ids, 30, "an SVID from the insecurely bootstrapped agent")
        assert ids == ["spiffe://example.org/bootstrapped"]
        assert "insecure" in agent.logs.lower()
    finally:
        agent.stop()


def test_wrong_bootstrap_bundle_is_refused(
    server: ServerProcess, root: Path, tmp_path: Path
) -> None:
    """An agent whose bootstrap bundle is another trust root refuses the server and exits."""
    with start_server(tmp_path / "other") as other:
        wrong = tmp_path / "other-bundle.pem"
        wrong.write_text(other.cli("bundle", "show", "--format", "pem").stdout)
    agent = AgentProcess(root, server.address, wrong, join_token(server)).start(wait=False)
    try:
        assert agent.proc is not None
        code = agent.proc.wait(timeout=60)
        assert code != 0
        assert not (agent.data_dir / "agent_svid.pem").exists()
    finally:
        agent.kill()


def test_neither_bundle_nor_insecure_bootstrap_is_a_config_error(
    server: ServerProcess, root: Path
) -> None:
    """Starting an agent with no way to trust the server fails at once with one clear line."""
    agent = AgentProcess(root, server.address, None, join_token(server)).start(wait=False)
    try:
        assert agent.proc is not None
        assert agent.proc.wait(timeout=60) != 0
        assert "Traceback" not in agent.logs
        assert "bundle" in agent.logs.lower()
    finally:
        agent.kill()
