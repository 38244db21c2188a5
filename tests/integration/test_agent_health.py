"""`credo-agent healthcheck` means healthy, and internal sockets live under the data dir:
real `credo-server run` and `credo-agent run` processes, checked with the real CLI and what
the kernel says about their sockets."""

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
    credo_agent_command,
    free_port,
    start_agent,
    start_server,
    wait_for,
)

pytest.importorskip("spiffe")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with start_server(tmp_path) as running:
        yield running


def _healthcheck(agent: AgentProcess, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*credo_agent_command(), "healthcheck", "--admin-socket", str(agent.admin_socket), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _runtime_dirs(data_dir: Path) -> list[Path]:
    """The per-process internal socket directories under ``<data_dir>/run``."""
    run = data_dir / "run"
    return sorted(p for p in run.iterdir() if p.is_dir()) if run.exists() else []


def _unix_socket_paths(pid: int) -> set[str]:
    """The paths of every Unix socket process ``pid`` holds (from /proc, as ss shows them)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    paths = set()
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith("/"):
                paths.add(os.path.normpath(fields[7]))
    return paths


def test_removing_the_internal_socket_directory_makes_the_agent_unhealthy(
    server: ServerProcess, root: Path
) -> None:
    """With its internal socket directory removed (as a tmp cleaner would), the agent's
    healthcheck fails, saying the Workload API failed a call."""
    with start_agent(server, root) as agent:
        assert _healthcheck(agent).returncode == 0
        (internal,) = _runtime_dirs(agent.data_dir)
        shutil.rmtree(internal)
        result = _healthcheck(agent)
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("Error: agent is unhealthy: the Workload API on ")
        assert "failed a call: UNAVAILABLE" in line
        assert _healthcheck(agent, "--ready").returncode == 1


def test_internal_sockets_live_under_the_data_dir_and_are_removed_on_exit(
    server: ServerProcess, root: Path
) -> None:
    """Every Unix socket the agent and the server hold is under their own directories (none
    in /tmp outside them), and a clean stop removes the internal socket directories."""
    server_sockets = _unix_socket_paths(server.proc.pid if server.proc else 0)
    server_own = (str(server.data_dir.resolve()) + "/", str(server.admin_socket.parent) + "/")
    assert server_sockets and all(p.startswith(server_own) for p in server_sockets), server_sockets
    assert _runtime_dirs(server.data_dir)
    with start_agent(server, root) as agent:
        assert agent.proc is not None
        sockets = _unix_socket_paths(agent.proc.pid)
        (internal,) = _runtime_dirs(agent.data_dir)
        assert str(internal) + "/api.sock" in sockets
        assert all(p.startswith(str(root) + "/") for p in sockets), sockets
        assert agent.stop() == 0
        assert _runtime_dirs(agent.data_dir) == []
    server.stop()
    assert _runtime_dirs(server.data_dir) == []


def test_a_killed_agent_and_server_leave_nothing_after_the_next_start(
    server: ServerProcess, root: Path
) -> None:
    """After SIGKILL the internal socket directories remain; the next start removes them."""
    agent = start_agent(server, root)
    try:
        (left_by_agent,) = _runtime_dirs(agent.data_dir)
        (left_by_server,) = _runtime_dirs(server.data_dir)
        agent.kill()
        server.kill()
        assert left_by_agent.exists() and left_by_server.exists()
        server.start()
        assert not left_by_server.exists() and len(_runtime_dirs(server.data_dir)) == 1
        agent.server_address = server.address
        agent.token = None
        agent.start()  # resumes with its stored SVID
        assert not left_by_agent.exists() and len(_runtime_dirs(agent.data_dir)) == 1
    finally:
        agent.stop()


def test_ready_only_after_the_first_sync_while_live_without_a_server(
    tmp_path: Path, root: Path
) -> None:
    """An agent restarted while its server is down is live (it serves its cache) but not
    ready until its first entry sync completes once the server is back."""
    port = free_port()
    with start_server(tmp_path, bind_address=f"127.0.0.1:{port}") as server:
        agent = start_agent(server, root)
        try:
            ready = _healthcheck(agent, "--ready")
            assert ready.returncode == 0 and ready.stdout.strip() == "agent is ready"
            agent.stop()
            server.stop()
            agent.token = None
            agent.start()  # live: wait_for(healthcheck) passed
            not_ready = _healthcheck(agent, "--ready")
            assert not_ready.returncode == 1
            assert not_ready.stderr.strip() == (
                "Error: agent is not ready: the first entry sync from the server has not completed"
            )
            server.start()
            wait_for(lambda: _healthcheck(agent, "--ready").returncode == 0, 30, "readiness")
        finally:
            agent.stop()
