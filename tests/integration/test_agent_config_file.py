"""`credo-agent run --config FILE` whose file names its attestors in plugin tables, as a real
process joined to a real `credo-server run`; the workload is this test process, fetching
with py-spiffe."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    join_token,
    short_temp_dir,
    start_server,
    wait_for,
    write_server_bundle,
)

pytest.importorskip("spiffe")

TD = "example.org"
UID = f"unix:uid:{os.geteuid()}"
EXE = os.readlink("/proc/self/exe")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with start_server(tmp_path) as srv:
        yield srv


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_temp_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _agent(server: ServerProcess, root: Path, config: str) -> AgentProcess:
    path = root / "agent.toml"
    path.write_text(config)
    bundle = write_server_bundle(server, root / "bundle.pem")
    return AgentProcess(
        root, server.address, bundle, join_token(server), flags={"config": path}
    ).start()


def _entries(server: ServerProcess, agent: AgentProcess) -> tuple[str, str]:
    """An entry needing the executable's path, and one needing its digest; the digest one
    is created first, so it has reached the agent whenever the path one has."""
    digest = hashlib.sha256(Path(EXE).read_bytes()).hexdigest()
    by_digest = f"spiffe://{TD}/by-digest"
    by_path = f"spiffe://{TD}/by-path"
    create_entry(server, agent.spiffe_id, by_digest, UID, f"unix:sha256:{digest}")
    create_entry(server, agent.spiffe_id, by_path, UID, f"unix:path:{EXE}")
    return by_path, by_digest


def test_attestors_named_in_plugin_tables_are_the_ones_used(
    server: ServerProcess, root: Path
) -> None:
    """An agent whose file names [agent.node_attestor.join_token] and
    [agent.workload_attestor.unix] (hashing off) attests with its join token and serves the
    identity its unix selectors match, and not the one needing a digest it may not compute."""
    agent = _agent(
        server,
        root,
        "[agent]\n"
        'log_format = "json"\n'
        "[agent.node_attestor.join_token]\n"
        "[agent.workload_attestor.unix]\n"
        "discover_workload_path = true\n"
        "workload_size_limit = -1\n",
    )
    try:
        by_path, _ = _entries(server, agent)
        assert wait_for(lambda: agent.fetch_ids(), 30, "the SVID") == [by_path]
        assert agent.fetch_ids() == [by_path]
        assert '"node_attestor": "join_token"' in agent.logs
        assert '"workload_attestors": "unix"' in agent.logs
        assert "deprecated" not in agent.logs
    finally:
        agent.stop()


def test_flat_workload_size_limit_still_applies_and_warns(
    server: ServerProcess, root: Path
) -> None:
    """The pre-table flat key still sets the unix attestor's limit, and the agent warns at
    start where the key moved."""
    agent = _agent(server, root, "[agent]\nworkload_size_limit = -1\n")
    try:
        by_path, _ = _entries(server, agent)
        assert wait_for(lambda: agent.fetch_ids(), 30, "the SVID") == [by_path]
        assert (
            "workload_size_limit is deprecated: set it in [agent.workload_attestor.unix]"
            in agent.logs
        )
    finally:
        agent.stop()
