"""Attacks by a hostile local user against a root-run agent and server (issue 9).

Each test runs a real ``credo-server run`` and ``credo-agent run`` as root and the attacker as
the unprivileged user ``nobody`` (``runuser``), with the system Python of the same version
(the test's own interpreter may live where nobody may read) and this checkout on its path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    credo_agent_command,
    credo_server_command,
    one_line_error,
    short_temp_dir,
    start_agent,
    start_server,
    wait_for,
)

TD = "example.org"
NOBODY = 65534
SLEEP = os.path.realpath("/usr/bin/sleep")
ATTACKER_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
HERE = Path(__file__).parent
REPO = HERE.parent.parent
SLEEP_ID = f"spiffe://{TD}/hostile/sleep"
PYTHON_ID = f"spiffe://{TD}/hostile/python"
SLEEP_SHA_ID = f"spiffe://{TD}/hostile/sleep-sha256"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the agent and runuser"),
    pytest.mark.skipif(shutil.which("runuser") is None, reason="needs runuser"),
    pytest.mark.skipif(not os.access(ATTACKER_PYTHON, os.X_OK), reason=f"needs {ATTACKER_PYTHON}"),
]


def as_nobody(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as uid/gid ``nobody`` with this checkout importable."""
    path = os.pathsep.join([sysconfig.get_paths()["purelib"], str(REPO)])
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={path}", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def attacker_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"attacker printed nothing (exit {result.returncode}): {result.stderr}"
    out: dict[str, Any] = json.loads(lines[-1])
    return out


_FETCH = """
import json, sys, grpc
from credo._proto import workload_pb2, workload_pb2_grpc
with grpc.insecure_channel("unix:" + sys.argv[1]) as channel:
    stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
        workload_pb2.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=20)
    try:
        print(json.dumps({"ids": [s.spiffe_id for s in next(stream).svids]}))
    except grpc.RpcError as err:
        print(json.dumps({"code": err.code().name, "details": err.details()}))
"""


@dataclass
class Deployment:
    server: ServerProcess
    agent: AgentProcess


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = short_temp_dir("credo-hostile-", mode=0o755)
    try:
        with (
            start_server(tmp_path_factory.mktemp("hostile-server")) as server,
            start_agent(server, root) as agent,
        ):
            uid = f"unix:uid:{NOBODY}"
            create_entry(server, agent.spiffe_id, SLEEP_ID, uid, f"unix:path:{SLEEP}")
            digest = hashlib.sha256(Path(SLEEP).read_bytes()).hexdigest()
            create_entry(server, agent.spiffe_id, SLEEP_SHA_ID, uid, f"unix:sha256:{digest}")
            python = os.path.realpath(ATTACKER_PYTHON)
            create_entry(server, agent.spiffe_id, PYTHON_ID, uid, f"unix:path:{python}")
            wait_for(
                lambda: (
                    attacker_json(as_nobody(ATTACKER_PYTHON, "-c", _FETCH, str(agent.socket))).get(
                        "ids"
                    )
                    == [PYTHON_ID]
                ),
                60,
                "nobody's python to receive its identity",
            )
            yield Deployment(server, agent)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- 1. the exec race, made reliable by a connection flood ---------------------------------


@pytest.mark.parametrize("flood", [100, 0])
def test_exec_race_does_not_get_the_exec_target_identity(
    deployment: Deployment, flood: int
) -> None:
    """nobody queues ``flood`` connects, connects, forks a child that keeps the socket and
    execs /usr/bin/sleep: the child speaking over the inherited connection is refused, never
    served the /usr/bin/sleep identity (before the fix: every time with the flood). The
    flood stays under the per-uid connection burst, so the attempt reaches attestation."""
    results = []
    for _ in range(3):
        result = as_nobody(
            ATTACKER_PYTHON,
            str(HERE / "hostile" / "exec_race.py"),
            str(deployment.agent.socket),
            str(flood),
            SLEEP,
        )
        results.append(attacker_json(result))
    # Refused either way: PERMISSION_DENIED, or the agent closed the connection at once.
    assert all(r.get("ids") is None for r in results), results
    assert all(r.get("code") in ("PERMISSION_DENIED", "UNAVAILABLE") for r in results), results
    # The agent still serves the honest caller afterwards.
    honest = attacker_json(as_nobody(ATTACKER_PYTHON, "-c", _FETCH, str(deployment.agent.socket)))
    assert honest == {"ids": [PYTHON_ID]}


def test_connection_flood_beyond_the_burst_is_shed(deployment: Deployment) -> None:
    """A flood of 300 connects (more than one uid's burst) gets the attacker's real
    connection shed, not served, and the agent logs one summary line, not one per refusal."""
    logged_before = len(deployment.agent.logs)
    result = as_nobody(
        ATTACKER_PYTHON,
        str(HERE / "hostile" / "exec_race.py"),
        str(deployment.agent.socket),
        "300",
        SLEEP,
    )
    got = attacker_json(result)
    # The real connection came after the burst: shed (UNAVAILABLE), as were queued ones.
    assert got.get("code") == "UNAVAILABLE" and "ids" not in got, got
    assert got["shed"] > 0, got

    # The summary is logged at the first refusal, or when the interval of an earlier
    # summary (10 s) is over: wait for it, then count.
    def summaries() -> list[str]:
        new = deployment.agent.logs[logged_before:]
        return [line for line in new.splitlines() if "workload connections refused" in line]

    wait_for(lambda: summaries(), 30, "the agent to log the refusals")
    assert 1 <= len(summaries()) <= 2, summaries()
    assert any("connecting too fast" in line and str(NOBODY) in line for line in summaries()), (
        summaries()
    )


# --- 2. unix:path spoofed from a user namespace --------------------------------------------


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_bind_mount_in_a_user_namespace_does_not_spoof_path_or_sha256(
    deployment: Deployment,
) -> None:
    """nobody bind-mounts Python over /usr/bin/sleep in a mount namespace of their own and
    runs it: /proc/<pid>/exe reads /usr/bin/sleep there, but the agent serves neither the
    unix:path nor the unix:sha256 identity of /usr/bin/sleep (before the fix: the path one)."""
    script = (
        f'mount --bind {os.path.realpath(ATTACKER_PYTHON)} {SLEEP} && exec {SLEEP} -c "$0" "$1"'
    )
    result = as_nobody("unshare", "-Urm", "sh", "-c", script, _FETCH, str(deployment.agent.socket))
    got = attacker_json(result)
    assert got.get("code") == "PERMISSION_DENIED", got


# --- 4. and 5. directories another user created ---------------------------------------------


@pytest.fixture
def eve_dir() -> Iterator[Path]:
    """``/tmp/credo-eve-<n>``, created by nobody (mode 0777) before root uses it."""
    path = Path(f"/tmp/credo-eve-{os.getpid()}-{os.urandom(3).hex()}")
    made = as_nobody("sh", "-c", f"mkdir -m 777 {path}")
    assert made.returncode == 0, made.stderr
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _server_run(tmp_path: Path, **flags: str) -> subprocess.CompletedProcess[str]:
    args = {"data-dir": str(tmp_path / "server"), "bind-address": "127.0.0.1:0", **flags}
    argv = [*credo_server_command(), "run"]
    for name, value in args.items():
        argv += [f"--{name}", value]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"credo-server run {flags} started; it must refuse")


def _run_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The reason ``credo-server run`` logged for failing to start (its last stderr line)."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and "server failed" in lines[-1], result.stderr
    return lines[-1]


def test_server_refuses_an_admin_socket_under_another_users_directory(
    tmp_path: Path, eve_dir: Path
) -> None:
    """nobody made the admin socket's parent (or a symlink to one of theirs): root's
    credo-server run refuses with one line naming the directory and its owner, rather than
    creating private/ inside it for nobody to rename and replace."""
    result = _server_run(tmp_path, **{"admin-socket": f"{eve_dir}/private/api.sock"})
    message = _run_failure(result)
    assert str(eve_dir) in message and "nobody" in message, message
    assert not (eve_dir / "private").exists()

    link = Path(f"{eve_dir}-link")
    made = as_nobody("ln", "-s", str(eve_dir), str(link))
    assert made.returncode == 0, made.stderr
    try:
        result = _server_run(tmp_path, **{"admin-socket": f"{link}/private/api.sock"})
        assert "nobody" in _run_failure(result)
    finally:
        link.unlink()


_BIND = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
"""


def test_cli_refuses_an_admin_socket_in_another_users_directory(eve_dir: Path) -> None:
    """nobody put a socket where root's CLI looks for the server: credo-server bundle show
    and credo-server healthcheck (a probe nobody's socket could answer SERVING) refuse
    before they connect, naming the directory's owner."""
    made = as_nobody("mkdir", "-m", "700", str(eve_dir / "private"))
    assert made.returncode == 0, made.stderr
    bound = as_nobody(ATTACKER_PYTHON, "-c", _BIND, str(eve_dir / "private" / "api.sock"))
    assert bound.returncode == 0, bound.stderr
    for command in (["bundle", "show"], ["healthcheck", "--timeout", "2"]):
        result = subprocess.run(
            [*credo_server_command(), *command, "--socket", f"{eve_dir}/private/api.sock"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0, command
        message = one_line_error(result)
        assert "nobody" in message and str(eve_dir) in message, (command, message)


def test_agent_cli_refuses_sockets_in_another_users_directory(eve_dir: Path) -> None:
    """nobody planted the agent's sockets under a directory of theirs: root's
    ``credo-agent healthcheck`` and ``credo-agent api fetch x509`` refuse before they
    connect, in one line naming the directory and its owner (before: they dialled it)."""
    for sub in ("private", "public"):
        made = as_nobody("mkdir", "-m", "755", str(eve_dir / sub))
        assert made.returncode == 0, made.stderr
    for sock in ("private/admin.sock", "public/api.sock"):
        bound = as_nobody(ATTACKER_PYTHON, "-c", _BIND, str(eve_dir / sock))
        assert bound.returncode == 0, bound.stderr
    # The admin socket's own directory is nobody's; a workload accepts the agent's socket
    # directory whoever owns it, but not nobody's directory above it.
    commands = (
        (["healthcheck", "--admin-socket", f"{eve_dir}/private/admin.sock"], eve_dir / "private"),
        (["api", "fetch", "x509", "--socket", f"unix://{eve_dir}/public/api.sock"], eve_dir),
    )
    for args, culprit in commands:
        result = subprocess.run(
            [*credo_agent_command(), *args], capture_output=True, text=True, timeout=30
        )
        assert result.returncode != 0, args
        message = one_line_error(result)
        assert f"{culprit} is owned by uid {NOBODY} (nobody)" in message, (args, message)


def test_server_refuses_a_data_directory_another_user_owns(tmp_path: Path, eve_dir: Path) -> None:
    """root pointed --data-dir at a 0777 directory nobody made: refused (before: chmod'ed
    0700 and used, still nobody's, who could swap the SQLite file)."""
    admin = short_temp_dir("credo-adm-")
    try:
        result = _server_run(
            tmp_path, **{"data-dir": str(eve_dir), "admin-socket": f"{admin}/s/api.sock"}
        )
    finally:
        shutil.rmtree(admin, ignore_errors=True)
    message = _run_failure(result)
    assert "data directory" in message and "nobody" in message, message
    assert not (eve_dir / "datastore.sqlite3").exists()


def test_agent_refuses_a_data_directory_another_user_owns(
    deployment: Deployment, eve_dir: Path
) -> None:
    """credo-agent run with a --data-dir nobody made fails at once with one line."""
    root = short_temp_dir("credo-ag-")
    try:
        result = subprocess.run(
            [
                *credo_agent_command(),
                "run",
                "--server-address",
                deployment.server.address,
                "--trust-domain",
                TD,
                "--trust-bundle",
                str(deployment.agent.bundle),
                "--join-token",
                "unused",
                "--socket",
                f"{root}/public/api.sock",
                "--admin-socket",
                f"{root}/private/admin.sock",
                "--data-dir",
                str(eve_dir),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: data directory") and "nobody" in last, result.stderr


# --- 6. selector values that can never match ------------------------------------------------

BAD_SELECTORS = [
    "unix:uid:-1",
    "unix:uid:abc",
    "unix:uid:99999999999",
    "unix:uid:ü1",
    "unix:uid:1 2",
    "unix:path:rel/path",
    "unix:sha256:zz",
    "unix:path:/usr/bin/a\nb",
    "unix:nosuchkey:1",
    "k8s:pod-image-count:two",
    "k8s_psat:agent_pod_label:nolabelvalue",
]


def _entry_count(server: ServerProcess) -> int:
    return len(server.cli_json("entry", "show").get("entries", []))


def test_entry_create_refuses_selectors_no_attestor_produces(deployment: Deployment) -> None:
    """For each bad selector the CLI says which and why in one line; the admin API itself
    (which the CLI does not guard) answers INVALID_ARGUMENT naming the field; nothing is
    stored."""
    import grpc

    from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, types_pb2

    server = deployment.server
    before = _entry_count(server)
    for selector in BAD_SELECTORS:
        args = ["entry", "create", "--parent-id", deployment.agent.spiffe_id]
        args += ["--spiffe-id", f"spiffe://{TD}/hostile/bad", "--selector", selector]
        message = one_line_error(server.cli(*args))
        assert "invalid selector" in message, (selector, message)

        kind, _, value = selector.partition(":")
        entry = types_pb2.RegistrationEntry(
            spiffe_id=f"spiffe://{TD}/hostile/bad",
            parent_id=deployment.agent.spiffe_id,
            selectors=[
                types_pb2.Selector(type="unix", value=f"uid:{NOBODY}"),
                types_pb2.Selector(type=kind, value=value),
            ],
        )
        with server.admin_channel() as channel:
            stub = admin_pb2_grpc.EntriesStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.BatchCreateEntry(
                    admin_pb2.BatchCreateEntryRequest(entries=[entry]), timeout=20
                )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, selector
        assert "selectors[1]" in (err.value.details() or ""), selector
    assert _entry_count(server) == before


def test_entry_update_refuses_a_bad_selector_and_keeps_unknown_types_opaque(
    deployment: Deployment,
) -> None:
    """Updating an entry to a bad selector fails and leaves it as it was; selectors of types
    Credo does not know (a plugin's) are stored as given."""
    server = deployment.server
    entry_id = create_entry(
        server, deployment.agent.spiffe_id, f"spiffe://{TD}/hostile/opaque", "docker:label:a b"
    )
    result = server.cli("entry", "update", "--id", entry_id, "--selector", "unix:gid:x")
    assert "unix:gid" in one_line_error(result)
    shown = server.cli_json("entry", "show", "--id", entry_id)["entries"][0]
    assert [f"{s['type']}:{s['value']}" for s in shown["selectors"]] == ["docker:label:a b"]
    server.cli("entry", "delete", "--id", entry_id)


# --- 3. one user churning connections must not lock everyone out ----------------------------

_CHURN = """
import socket, sys
path = sys.argv[1]
print("churning", flush=True)
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        pass
    s.close()
"""


def _root_fetch(agent: AgentProcess) -> str:
    """One FetchX509SVID on a fresh connection as this (root) process: the first SPIFFE ID,
    or the status code name."""
    import grpc

    from credo._proto import workload_pb2, workload_pb2_grpc

    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=20
        )
        try:
            return str(next(stream).svids[0].spiffe_id)
        except grpc.RpcError as err:
            return str(err.code().name)
        finally:
            stream.cancel()


def test_connection_churn_by_one_user_neither_locks_others_out_nor_floods_the_log(
    deployment: Deployment,
) -> None:
    """While nobody loops connect(); close() as fast as it can, root's fetches are served
    (before: 9 of 10 failed) and the agent logs a few summary lines, not one per refusal
    (before: tens of thousands of lines)."""
    agent = deployment.agent
    root_id = f"spiffe://{TD}/hostile/root"
    create_entry(deployment.server, agent.spiffe_id, root_id)  # unix:uid:0
    wait_for(lambda: _root_fetch(agent) == root_id, 60, "root's identity")
    before = agent.logs.count("workload connections refused")
    # Started as nobody directly (not through runuser, which forks: killing it would leave
    # the churner running).
    churner = subprocess.Popen(
        [ATTACKER_PYTHON, "-c", _CHURN, str(agent.socket)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert churner.stdout is not None and churner.stdout.readline() == "churning\n"
        wait_for(
            lambda: agent.logs.count("workload connections refused") > before,
            30,
            "the agent to shed the churner's connections",
        )
        results = [_root_fetch(agent) for _ in range(10)]
    finally:
        churner.kill()
        churner.wait()
    assert results.count(root_id) >= 9, results
    lines = agent.logs.count("workload connections refused") - before
    assert lines <= 5, f"{lines} refusal lines in the log"


def test_agent_refuses_a_socket_in_another_users_directory_and_leaves_nothing_behind(
    deployment: Deployment, eve_dir: Path
) -> None:
    """--socket in a directory nobody made: the agent fails at start with one line naming
    the owner, and its private directories under <data-dir>/run are gone."""
    root = short_temp_dir("credo-ag-")
    data = root / "data"
    try:
        result = subprocess.run(
            [
                *credo_agent_command(), "run",
                "--server-address", deployment.server.address,
                "--trust-domain", TD,
                "--trust-bundle", str(deployment.agent.bundle),
                "--join-token", deployment.server.cli_json("token", "generate")["token"],
                "--socket", f"{eve_dir}/api.sock",
                "--admin-socket", f"{root}/private/admin.sock",
                "--data-dir", str(data),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert result.returncode != 0
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: socket directory") and "nobody" in last, result.stderr
        run_dir = data / "run"
        left = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
        assert [name for name in left if not name.startswith(".")] == [], left
    finally:
        shutil.rmtree(root, ignore_errors=True)
