"""`credo-agent run` as a real process, joined to a real `credo-server run`, used the way
users use it: the server CLI to register entries, py-spiffe's WorkloadApiClient to fetch,
and a config file naming the attestors in plugin tables."""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    agent_id,
    create_entry,
    free_port,
    join_token,
    short_temp_dir,
    start_server,
    wait_for,
    write_server_bundle,
)

spiffe = pytest.importorskip("spiffe")

TD = "example.org"
UID_SELECTOR = f"unix:uid:{os.getuid()}"


def _token(server: ServerProcess) -> str:
    return join_token(server)


def _agent_id(token: str) -> str:
    return agent_id(token, TD)


def _create_entry(server: ServerProcess, parent: str, spiffe_id: str, *selectors: str) -> str:
    return create_entry(server, parent, spiffe_id, *(selectors or (UID_SELECTOR,)))


def _fetch_ids(agent: AgentProcess) -> list[str]:
    return agent.fetch_ids()


@pytest.fixture
def short_root() -> Iterator[Path]:
    root = short_temp_dir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    # A fixed port, so a restarted server comes back where the agent expects it.
    with start_server(tmp_path, bind_address=f"127.0.0.1:{free_port()}") as srv:
        yield srv


@pytest.fixture
def bundle(server: ServerProcess, tmp_path: Path) -> Path:
    return write_server_bundle(server, tmp_path / "bundle.pem")


@pytest.fixture
def agent(server: ServerProcess, bundle: Path, short_root: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(short_root, server.address, bundle, _token(server)).start()
    yield proc
    proc.stop()


def test_join_and_fetch_x509_svid_with_py_spiffe(
    server: ServerProcess, agent: AgentProcess
) -> None:
    """A joined agent serves an entry's X509-SVID, JWT-SVID and bundle to py-spiffe."""
    assert agent.token is not None
    _create_entry(server, _agent_id(agent.token), f"spiffe://{TD}/workload")
    ids = wait_for(lambda: _fetch_ids(agent), 10, "the SVID")
    assert ids == [f"spiffe://{TD}/workload"]
    with agent.client() as client:
        context = client.fetch_x509_context()
        assert str(context.default_svid.spiffe_id) == f"spiffe://{TD}/workload"
        jwt_svid = client.fetch_jwt_svid(audience={"db"})
        assert str(jwt_svid.spiffe_id) == f"spiffe://{TD}/workload"
        validated = client.validate_jwt_svid(jwt_svid.token, "db")
        assert str(validated.spiffe_id) == f"spiffe://{TD}/workload"
    stat = (agent.data_dir / "agent_key.pem").stat()
    assert stat.st_mode & 0o777 == 0o600


def test_entry_changes_are_pushed_to_open_stream(
    server: ServerProcess, agent: AgentProcess
) -> None:
    """Entries created and deleted on the server reach an open FetchX509SVID stream."""
    assert agent.token is not None
    parent = _agent_id(agent.token)
    _create_entry(server, parent, f"spiffe://{TD}/first")
    wait_for(lambda: _fetch_ids(agent), 10, "the first SVID")
    updates: queue.Queue[list[str]] = queue.Queue()
    client = agent.client()
    handle = client.stream_x509_contexts(
        on_success=lambda ctx: updates.put(sorted(str(s.spiffe_id) for s in ctx.x509_svids)),
        on_error=lambda err: None,
    )
    try:
        assert updates.get(timeout=10) == [f"spiffe://{TD}/first"]
        # Latency is measured by benchmarks/propagation.py, not asserted here; the
        # generous waits only keep a broken push from hanging the suite.
        second = _create_entry(server, parent, f"spiffe://{TD}/second")
        while updates.get(timeout=30) != [f"spiffe://{TD}/first", f"spiffe://{TD}/second"]:
            pass
        server.cli_json("entry", "delete", "--id", second)
        while updates.get(timeout=30) != [f"spiffe://{TD}/first"]:
            pass
    finally:
        handle.cancel()
        client.close()


def test_server_down_svids_still_served_and_agent_reconnects(
    server: ServerProcess, agent: AgentProcess
) -> None:
    """With the server killed, workloads keep their SVIDs; when it is back, the agent resumes."""
    assert agent.token is not None
    parent = _agent_id(agent.token)
    _create_entry(server, parent, f"spiffe://{TD}/steady")
    wait_for(lambda: _fetch_ids(agent), 10, "the SVID")
    server.kill()
    time.sleep(1.0)
    assert _fetch_ids(agent) == [f"spiffe://{TD}/steady"]
    assert agent.healthy()
    server.start()
    _create_entry(server, parent, f"spiffe://{TD}/after-restart")
    wait_for(lambda: len(_fetch_ids(agent)) == 2, 20, "an entry created after the server came back")
    assert "entry sync stream lost" in agent.logs


def test_restarted_agent_resumes_without_token(
    server: ServerProcess, bundle: Path, short_root: Path
) -> None:
    """A restarted agent resumes with its stored SVID and needs no new join token."""
    token = _token(server)
    agent = AgentProcess(short_root, server.address, bundle, token).start()
    try:
        _create_entry(server, _agent_id(token), f"spiffe://{TD}/resumed")
        wait_for(lambda: _fetch_ids(agent), 10, "the SVID")
        assert agent.stop() == 0
        agent.token = None
        agent.start()
        assert wait_for(lambda: _fetch_ids(agent), 10, "the SVID after restart") == [
            f"spiffe://{TD}/resumed"
        ]
        assert "resuming with stored agent SVID" in agent.logs
    finally:
        agent.stop()


def test_agent_without_token_or_stored_svid_fails_clearly(
    server: ServerProcess, bundle: Path, short_root: Path
) -> None:
    """An agent with neither a stored SVID nor a join token exits 1 with one clear line."""
    agent = AgentProcess(short_root, server.address, bundle, None).start(wait=False)
    assert agent.proc is not None
    assert agent.proc.wait(20) == 1
    assert "no stored agent SVID and no join token" in agent.logs
    assert "Traceback" not in agent.logs


def test_banned_agent_deletes_its_svid_and_exits(
    server: ServerProcess, agent: AgentProcess
) -> None:
    """A banned agent deletes its stored SVID and key and exits non-zero with a clear message."""
    assert agent.token is not None and agent.proc is not None
    server.cli_json("agent", "ban", "--spiffe-id", _agent_id(agent.token))
    assert agent.proc.wait(20) == 1
    assert "was banned by the server; its SVID was deleted" in agent.logs
    assert not (agent.data_dir / "agent_svid.pem").exists()
    assert not (agent.data_dir / "agent_key.pem").exists()


# --- an agent configured by plugin tables ------------------------------------------------

EXE = os.readlink("/proc/self/exe")


def _configured_agent(server: ServerProcess, bundle: Path, root: Path, config: str) -> AgentProcess:
    """``credo-agent run --config <root>/agent.toml`` holding ``config``, with a fresh token."""
    path = root / "agent.toml"
    path.write_text(config)
    return AgentProcess(
        root, server.address, bundle, _token(server), flags={"config": path}
    ).start()


def _path_and_digest_entries(server: ServerProcess, agent: AgentProcess) -> tuple[str, str]:
    """An entry needing the executable's path, and one needing its digest; the digest one
    is created first, so it has reached the agent whenever the path one has."""
    digest = hashlib.sha256(Path(EXE).read_bytes()).hexdigest()
    by_digest = f"spiffe://{TD}/by-digest"
    by_path = f"spiffe://{TD}/by-path"
    _create_entry(server, agent.spiffe_id, by_digest, UID_SELECTOR, f"unix:sha256:{digest}")
    _create_entry(server, agent.spiffe_id, by_path, UID_SELECTOR, f"unix:path:{EXE}")
    return by_path, by_digest


def test_attestors_named_in_plugin_tables_are_the_ones_used(
    server: ServerProcess, bundle: Path, short_root: Path
) -> None:
    """An agent whose file names [agent.node_attestor.join_token] and
    [agent.workload_attestor.unix] (hashing off) attests with its join token and serves the
    identity its unix selectors match, and not the one needing a digest it may not compute."""
    agent = _configured_agent(
        server,
        bundle,
        short_root,
        "[agent]\n"
        'log_format = "json"\n'
        "[agent.node_attestor.join_token]\n"
        "[agent.workload_attestor.unix]\n"
        "discover_workload_path = true\n"
        "workload_size_limit = -1\n",
    )
    try:
        by_path, _ = _path_and_digest_entries(server, agent)
        assert wait_for(lambda: agent.fetch_ids(), 30, "the SVID") == [by_path]
        assert agent.fetch_ids() == [by_path]
        assert '"node_attestor": "join_token"' in agent.logs
        assert '"workload_attestors": "unix"' in agent.logs
        assert "deprecated" not in agent.logs
    finally:
        agent.stop()


def test_flat_workload_size_limit_still_applies_and_warns(
    server: ServerProcess, bundle: Path, short_root: Path
) -> None:
    """The pre-table flat key still sets the unix attestor's limit, and the agent warns at
    start where the key moved."""
    agent = _configured_agent(server, bundle, short_root, "[agent]\nworkload_size_limit = -1\n")
    try:
        by_path, _ = _path_and_digest_entries(server, agent)
        assert wait_for(lambda: agent.fetch_ids(), 30, "the SVID") == [by_path]
        assert (
            "workload_size_limit is deprecated: set it in [agent.workload_attestor.unix]"
            in agent.logs
        )
    finally:
        agent.stop()
