"""`credo-agent run` as a real process, joined to a real `credo-server run`, used the way
users use it: the server CLI to register entries, py-spiffe's WorkloadApiClient to fetch."""

from __future__ import annotations

import importlib.util
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.processes import ServerProcess, start_server

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("server.app") is None,
    reason="server.app (the `credo-server run` process) is not written yet",
)

spiffe = pytest.importorskip("spiffe")

TD = "example.org"
UID_SELECTOR = f"unix:uid:{os.getuid()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agent_command() -> list[str]:
    script = Path(sys.executable).parent / "credo-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "node_agent.cli.main"]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class AgentProcess:
    """A ``credo-agent run`` process on short temp paths."""

    def __init__(self, root: Path, server_address: str, bundle: Path, token: str | None) -> None:
        self.root = root
        self.socket = root / "public" / "api.sock"
        self.admin_socket = root / "private" / "admin.sock"
        self.data_dir = root / "data"
        self.log_path = root / "agent.log"
        self.server_address = server_address
        self.bundle = bundle
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def start(self, *, token: str | None = None, wait: bool = True) -> AgentProcess:
        cmd = [
            *_agent_command(),
            "run",
            "--server-address",
            self.server_address,
            "--trust-domain",
            TD,
            "--trust-bundle",
            str(self.bundle),
            "--socket",
            str(self.socket),
            "--admin-socket",
            str(self.admin_socket),
            "--data-dir",
            str(self.data_dir),
            "--sync-backoff-max",
            "1",
        ]
        if token or self.token:
            cmd += ["--join-token", token or self.token or ""]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            wait_for(self.healthy, 20, "the agent to become healthy")
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.logs}")
        result = subprocess.run(
            [*_agent_command(), "healthcheck", "--admin-socket", str(self.admin_socket)],
            capture_output=True,
            timeout=10,
        )
        return result.returncode == 0

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    @property
    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client(self) -> Any:
        return spiffe.WorkloadApiClient(socket_path=self.endpoint)


def _token(server: ServerProcess) -> str:
    return str(server.cli_json("token", "generate")["token"])


def _agent_id(token: str) -> str:
    return f"spiffe://{TD}/credo/agent/join_token/{token}"


def _create_entry(server: ServerProcess, parent: str, spiffe_id: str, *selectors: str) -> str:
    args = ["entry", "create", "--parent-id", parent, "--spiffe-id", spiffe_id]
    for selector in selectors or (UID_SELECTOR,):
        args += ["--selector", selector]
    out = server.cli_json(*args)
    entry = out["entries"][0] if "entries" in out else out.get("entry", out)
    return str(entry["id"])


def _fetch_ids(agent: AgentProcess) -> list[str]:
    with agent.client() as client:
        return [str(svid.spiffe_id) for svid in client.fetch_x509_svids()]


@pytest.fixture
def short_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="credo-a-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    # A fixed port, so a restarted server comes back where the agent expects it.
    with start_server(tmp_path, bind_address=f"127.0.0.1:{_free_port()}") as srv:
        yield srv


@pytest.fixture
def bundle(server: ServerProcess, tmp_path: Path) -> Path:
    result = server.cli("bundle", "show", "--format", "pem", output=None)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "bundle.pem"
    path.write_text(result.stdout)
    return path


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
    """Entries created and deleted on the server reach an open FetchX509SVID stream quickly."""
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
        started = time.monotonic()
        second = _create_entry(server, parent, f"spiffe://{TD}/second")
        created_cli = time.monotonic()
        while (ids := updates.get(timeout=10)) != [f"spiffe://{TD}/first", f"spiffe://{TD}/second"]:
            pass
        create_latency = time.monotonic() - created_cli
        server.cli_json("entry", "delete", "--id", second)
        deleted_cli = time.monotonic()
        while (ids := updates.get(timeout=10)) != [f"spiffe://{TD}/first"]:
            pass
        delete_latency = time.monotonic() - deleted_cli
        assert ids == [f"spiffe://{TD}/first"]
        assert create_latency < 2.0, create_latency
        assert delete_latency < 2.0, delete_latency
        assert time.monotonic() - started < 15
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
    assert "no stored agent SVID and no --join-token" in agent.logs
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
