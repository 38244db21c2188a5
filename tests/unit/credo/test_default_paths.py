"""Default socket paths (under /run as root, per user under /tmp otherwise) and the check a
CLI makes before it dials a socket (issue 9 item 4)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from credo._paths import UnsafePath
from node_agent.config import AgentConfig
from node_agent.paths import check_socket_to_dial, workload_socket_to_dial
from server.config import ServerConfig

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, seteuid)")
OTHER = 4242


@contextlib.contextmanager
def effective_uid(uid: int) -> Iterator[None]:
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


@needs_root
def test_root_defaults_are_under_run() -> None:
    """As root every socket defaults under /run, where nobody else can create directories."""
    assert ServerConfig().admin_socket == Path("/run/credo-server/private/api.sock")
    agent = AgentConfig()
    assert agent.socket_path == Path("/run/credo-agent/public/api.sock")
    assert agent.admin_socket == Path("/run/credo-agent/private/admin.sock")


@needs_root
def test_other_users_default_to_tmp_with_a_per_user_admin_socket() -> None:
    """Not root: the server's admin socket is per user; the agent's stay where workloads of
    every user look for them."""
    with effective_uid(OTHER):
        assert ServerConfig().admin_socket == Path(f"/tmp/credo-server-{OTHER}/private/api.sock")
        agent = AgentConfig()
        assert agent.socket_path == Path("/tmp/credo-agent/public/api.sock")
        assert agent.admin_socket == Path("/tmp/credo-agent/private/admin.sock")


def test_the_server_cli_dials_the_socket_the_server_serves_by_default(tmp_path: Path) -> None:
    """``credo-server bundle show`` without --socket dials ServerConfig's default."""
    env = {k: v for k, v in os.environ.items() if k != "CREDO_SERVER_SOCKET"}
    result = subprocess.run(
        [sys.executable, "-m", "server.cli.main", "bundle", "show"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    if result.returncode == 0:
        pytest.skip("a server serves the default admin socket on this machine")
    assert f"at {ServerConfig().admin_socket}" in result.stderr, result.stderr


def test_a_workload_dials_run_only_when_a_root_agent_serves_there() -> None:
    expected = "/run/credo-agent/public/api.sock"
    if not os.path.exists(expected):
        expected = "/tmp/credo-agent/public/api.sock"
    assert str(workload_socket_to_dial()) == expected


def _tree(root: Path, owner_of_parent: int, owner_of_dir: int) -> Path:
    parent = root / "credo-agent"
    directory = parent / "public"
    directory.mkdir(parents=True, mode=0o755)
    os.chown(parent, owner_of_parent, owner_of_parent)
    os.chown(directory, owner_of_dir, owner_of_dir)
    return directory / "api.sock"


@needs_root
def test_a_workload_accepts_the_agents_socket_directory_under_roots_directories(
    tmp_path: Path,
) -> None:
    """A socket directory of another user (the agent's) under directories of root's passes;
    the admin socket (dialled by the agent's user or root) accepts no third owner."""
    tmp_path.chmod(0o755)
    sock = _tree(tmp_path, 0, OTHER)
    check_socket_to_dial(sock, "Workload API socket directory", agent_owned=True)
    with pytest.raises(UnsafePath, match=f"owned by uid {OTHER}"):
        check_socket_to_dial(sock, "admin socket directory")


@needs_root
def test_a_directory_of_another_user_above_the_socket_directory_is_refused(
    tmp_path: Path,
) -> None:
    """/tmp/credo-agent made by someone else: its owner can rename public/ and plant a socket
    of their own, so even a workload refuses it, in one line naming the directory and owner."""
    tmp_path.chmod(0o755)
    sock = _tree(tmp_path, OTHER, 0)
    with pytest.raises(UnsafePath) as caught:
        check_socket_to_dial(sock, "Workload API socket directory", agent_owned=True)
    message = str(caught.value)
    assert f"{tmp_path}/credo-agent is owned by uid {OTHER}" in message
    assert "\n" not in message


def test_a_missing_socket_directory_passes(tmp_path: Path) -> None:
    """Nothing there yet: connecting says the socket is missing, not the path check."""
    check_socket_to_dial(tmp_path / "none" / "api.sock", "x", agent_owned=True)
    check_socket_to_dial(tmp_path / "none" / "api.sock", "x")


@needs_root
def test_a_directory_this_user_may_not_look_into_is_left_to_connect(tmp_path: Path) -> None:
    """A caller who cannot search the path gets connect's permission denied, not a
    traceback from the check."""
    tmp_path.chmod(0o700)
    with effective_uid(OTHER):
        check_socket_to_dial(tmp_path / "private" / "admin.sock", "admin socket directory")
