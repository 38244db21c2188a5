"""k8s workload attestation end to end, on a real process in real cgroups.

Root creates the cgroups the kubelet and a container runtime would (under a unique
``credo-k8s-test-*`` parent, in the cgroup v2 hierarchy and in v1 ones), moves a real
workload process into them, and a local HTTPS "kubelet" (tests/helpers/kube.py) lists the
pod. The workload fetches its X509-SVID with py-spiffe from a real `credo-agent run`
configured with [agent.workload_attestor.unix] and [agent.workload_attestor.k8s], joined to
a real `credo-server run`. The cgroups are removed afterwards, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.kube import FakeKubelet, TestCa, container_status, pod_json
from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    join_token,
    short_temp_dir,
    start_server,
    write_server_bundle,
)

pytest.importorskip("spiffe")
pytestmark = pytest.mark.slow

TD = "example.org"
CGROUP_ROOT = Path("/sys/fs/cgroup")
WORKLOAD_ID = f"spiffe://{TD}/ns/shop/sa/checkout"

# The workload: waits for "go" on stdin (so the test can move it into its cgroups first),
# then fetches its X509-SVIDs over the Workload API with py-spiffe, and prints the result.
WORKLOAD = """
import json, sys, time
import grpc
from spiffe import WorkloadApiClient
from spiffe.workloadapi.errors import WorkloadApiError
sys.stdin.readline()
deadline = time.monotonic() + 60
while True:
    try:
        with WorkloadApiClient(socket_path=sys.argv[1]) as client:
            ids = [str(s.spiffe_id) for s in client.fetch_x509_svids(timeout=60)]
        print(json.dumps({"ids": ids}))
        break
    except WorkloadApiError as err:
        cause = err.__cause__
        code = cause.code().name if isinstance(cause, grpc.Call) else "UNKNOWN"
        details = cause.details() if isinstance(cause, grpc.Call) else str(err)
        # "no identity": the entry may not have reached the agent yet; anything else is final.
        if code == "PERMISSION_DENIED" and "refused" not in details and time.monotonic() < deadline:
            time.sleep(0.2)
            continue
        print(json.dumps({"code": code, "details": details}))
        break
"""


# --- cgroups --------------------------------------------------------------------------------


def _unified() -> Path | None:
    """The cgroup v2 hierarchy: /sys/fs/cgroup itself, or /sys/fs/cgroup/unified (hybrid)."""
    for path in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        if (path / "cgroup.procs").exists() and (path / "cgroup.controllers").exists():
            return path
    return None


def _v1(hierarchy: str) -> Path | None:
    path = CGROUP_ROOT / hierarchy
    if (path / "cgroup.procs").exists() and not (path / "cgroup.controllers").exists():
        return path
    return None


@dataclass
class Cgroups:
    """The cgroups one test made: created under ``credo-k8s-test-<id>``, removed in ``close``."""

    prefix: str = field(default_factory=lambda: f"credo-k8s-test-{uuid.uuid4().hex[:12]}")
    leaves: list[Path] = field(default_factory=list)
    made: list[tuple[Path, Path]] = field(default_factory=list)  # (hierarchy root, directory)

    def create(self, hierarchy: Path, path: str) -> None:
        """Make ``<hierarchy>/<prefix>/<path>``; skip the test if this machine does not allow it."""
        current = hierarchy
        for part in [self.prefix, *path.strip("/").split("/")]:
            current = current / part
            try:
                current.mkdir()
            except FileExistsError:
                continue
            except OSError as err:
                pytest.skip(f"cannot create cgroups here ({current}: {err.strerror})")
            self.made.append((hierarchy, current))
        self.leaves.append(current)

    def move(self, pid: int) -> None:
        for leaf in self.leaves:
            (leaf / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        """Move any process left back to its hierarchy's root, then remove every cgroup."""
        for hierarchy, directory in reversed(self.made):
            with contextlib.suppress(OSError):
                for pid in (directory / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (hierarchy / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                directory.rmdir()


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    made = Cgroups()
    try:
        yield made
    finally:
        made.close()
        leftovers = [str(d) for _, d in made.made if d.exists()]
        assert not leftovers, f"cgroups left behind: {leftovers}"


# --- server, kubelet, agent -----------------------------------------------------------------


@dataclass
class Node:
    """A server, a kubelet and an agent attesting workloads with unix and k8s."""

    server: ServerProcess
    kubelet: FakeKubelet
    agent: AgentProcess


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("k8s-node")
    root = short_temp_dir()
    ca = TestCa(tmp / "pki", "kubelet-ca")
    try:
        with (
            FakeKubelet(ca) as kubelet,
            start_server(tmp) as server,
        ):
            token = root / "token"
            token.write_text(kubelet.token)
            config = root / "agent.toml"
            config.write_text(
                "[agent]\n[agent.workload_attestor.unix]\n[agent.workload_attestor.k8s]\n"
                f"kubelet_secure_port = {kubelet.port}\n"
                'node_name = "localhost"\n'
                f'token_path = "{token}"\n'
                f'kubelet_ca_path = "{ca.path}"\n'
                "max_poll_attempts = 10\n"
                "poll_retry_interval = 0.1\n"
            )
            bundle = write_server_bundle(server, root / "bundle.pem")
            agent = AgentProcess(
                root, server.address, bundle, join_token(server), flags={"config": config}
            ).start()
            try:
                create_entry(server, agent.spiffe_id, WORKLOAD_ID, "k8s:ns:shop", "k8s:sa:checkout")
                yield Node(server, kubelet, agent)
            finally:
                agent.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _checkout_pod(pod_uid: str, container_id: str, runtime: str) -> dict[str, Any]:
    return pod_json(
        "shop",
        "checkout-5d8f9c7b6-x2x7q",
        uid=pod_uid,
        node="node-a",
        service_account="checkout",
        containers=[container_status("app", "shop/checkout:1.4.2", container_id, runtime=runtime)],
    )


def _run_workload(node: Node, cgroups: Cgroups, tmp_path: Path) -> dict[str, Any]:
    """Start the workload, move it into ``cgroups``, let it fetch; its JSON answer."""
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    proc = subprocess.Popen(
        [sys.executable, str(script), node.agent.endpoint],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        cgroups.move(proc.pid)
        out, err = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    answer: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return answer


def _uid_systemd(uid: str) -> str:
    return uid.replace("-", "_")


LAYOUTS = {
    # name: (hierarchies, path template, runtime); {uid}, {uid_}, {id} are filled in
    "v2-systemd-containerd-burstable": (
        ("unified",),
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/"
        "cri-containerd-{id}.scope",
        "containerd",
    ),
    "v2-cgroupfs-crio-besteffort": (
        ("unified",),
        "kubepods/besteffort/pod{uid}/crio-{id}",
        "cri-o",
    ),
    "v1-cgroupfs-docker-guaranteed": (
        ("pids", "systemd"),
        "kubepods/pod{uid}/{id}",
        "docker",
    ),
    "v1-systemd-crio-burstable": (
        ("pids", "systemd"),
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/"
        "crio-{id}.scope",
        "cri-o",
    ),
    "v1-systemd-docker-besteffort": (
        ("pids", "cpu"),
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/"
        "docker-{id}.scope",
        "docker",
    ),
}


def _place(cgroups: Cgroups, layout: str) -> tuple[str, str, str]:
    """Create the cgroups of ``layout`` for a new pod and container; (uid, id, runtime)."""
    hierarchies, template, runtime = LAYOUTS[layout]
    pod_uid, container_id = str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex
    path = template.format(uid=pod_uid, uid_=_uid_systemd(pod_uid), id=container_id)
    for name in hierarchies:
        hierarchy = _unified() if name == "unified" else _v1(name)
        if hierarchy is None:
            pytest.skip(f"this machine has no {name} cgroup hierarchy to create cgroups in")
        cgroups.create(hierarchy, path)
    return pod_uid, container_id, runtime


@pytest.mark.parametrize("layout", LAYOUTS)
def test_workload_in_a_pod_gets_the_svid_of_its_namespace_and_service_account(
    node: Node, cgroups: Cgroups, tmp_path: Path, layout: str
) -> None:
    """A process in a pod's container cgroup, whose pod the kubelet lists, gets the SVID of
    the entry with k8s:ns and k8s:sa selectors, for each cgroup version, driver and runtime."""
    pod_uid, container_id, runtime = _place(cgroups, layout)
    with node.kubelet.lock:
        node.kubelet.pods = [_checkout_pod(pod_uid, container_id, runtime)]
    assert _run_workload(node, cgroups, tmp_path) == {"ids": [WORKLOAD_ID]}


def test_workload_whose_pod_the_kubelet_does_not_list_is_refused(
    node: Node, cgroups: Cgroups, tmp_path: Path
) -> None:
    """When the kubelet lists another pod, the workload gets PermissionDenied saying that
    its container is not on the kubelet's list, after the bounded attempts."""
    pod_uid, container_id, runtime = _place(cgroups, "v2-systemd-containerd-burstable")
    with node.kubelet.lock:
        node.kubelet.pods = [_checkout_pod(str(uuid.uuid4()), container_id, runtime)]
    answer = _run_workload(node, cgroups, tmp_path)
    assert answer["code"] == "PERMISSION_DENIED"
    assert (
        f"the kubelet of node localhost does not list the caller's container {container_id} "
        f"of pod {pod_uid} after 10 attempts"
    ) in answer["details"]
    assert "workload attestation refused" in node.agent.logs
