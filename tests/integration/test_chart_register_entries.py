"""The chart's register-entries.sh (the server pods' postStart hook) against a real server.

The script is rendered by Helm's own engine from charts/credo and run with ``sh``, as the
server container runs it, against a real ``credo-server`` on its admin socket.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.helpers.processes import ServerProcess, start_server

CHART = Path(__file__).resolve().parents[2] / "charts" / "credo"
ALIAS = "spiffe://example.org/k8s-cluster/example-cluster"
TEST_ID = "spiffe://example.org/ns/identity/sa/credo-test"


def render_script(tmp_path: Path, values: dict[str, Any] | None = None) -> Path:
    """register-entries.sh as `helm install credo charts/credo -n identity` renders it."""
    helm.disable_logging()
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name="credo", namespace="identity", is_install=True)
    configmap = yaml.safe_load(out["credo/templates/server-configmap.yaml"])
    path = tmp_path / "register-entries.sh"
    path.write_text(configmap["data"]["register-entries.sh"])
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with start_server(tmp_path) as running:
        yield running


def run_script(script: Path, socket: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "CREDO_SERVER_SOCKET": str(socket),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return subprocess.Popen(
        ["sh", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def entries(server: ServerProcess) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = server.cli_json("entry", "show")["entries"]
    return found


def test_script_registers_the_node_alias_and_the_test_entry(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The node alias (k8s_psat:cluster) and the helm test's entry under it are created."""
    code, out, err = finish(run_script(render_script(tmp_path), server.admin_socket))
    assert code == 0, err
    assert f"register-entries: {ALIAS} created" in out
    by_id = {e["spiffe_id"]: e for e in entries(server)}
    assert set(by_id) == {ALIAS, TEST_ID}
    alias = by_id[ALIAS]
    assert alias["node_alias"] is True
    assert alias["parent_id"] == "spiffe://example.org/credo/server"
    assert alias["selectors"] == [{"type": "k8s_psat", "value": "cluster:example-cluster"}]
    test = by_id[TEST_ID]
    assert test["parent_id"] == ALIAS
    assert sorted((s["type"], s["value"]) for s in test["selectors"]) == [
        ("k8s", "ns:identity"),
        ("k8s", "sa:credo-test"),
    ]


def test_running_the_script_again_changes_nothing(server: ServerProcess, tmp_path: Path) -> None:
    """A restart or `helm upgrade` runs the hook again: the entries exist and are left alone."""
    script = render_script(tmp_path)
    assert finish(run_script(script, server.admin_socket))[0] == 0
    before = entries(server)
    code, out, err = finish(run_script(script, server.admin_socket))
    assert code == 0, err
    assert f"register-entries: {ALIAS} exists" in out
    assert f"register-entries: {TEST_ID} exists" in out
    assert entries(server) == before


def test_two_replicas_registering_at_once_make_one_entry_each(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Two server pods running the hook at the same moment both succeed; no entry is doubled."""
    script = render_script(tmp_path)
    procs = [run_script(script, server.admin_socket) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    assert sorted(e["spiffe_id"] for e in entries(server)) == sorted([ALIAS, TEST_ID])


def test_script_gives_up_when_the_server_never_answers(tmp_path: Path) -> None:
    """With no server on the socket the hook fails after waitSeconds, saying why."""
    script = render_script(tmp_path, {"server": {"nodeAlias": {"waitSeconds": 2}}})
    code, _, err = finish(run_script(script, tmp_path / "no-server" / "api.sock"))
    assert code == 1
    assert err.strip() == "register-entries: the server did not become healthy"
