"""The k8s workload attestor: cgroups (a procfs copy on disk) plus a local HTTPS kubelet.

The kubelet is a real HTTPS server answering ``GET /pods`` like one (tests/helpers/kube.py),
reached through the attestor's own client with a bearer token and a CA. Real cgroups and a
real agent: tests/integration/test_k8s_workload.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from credo.errors import ConfigError
from node_agent.config import load_config
from node_agent.workload.errors import AttestationFailed, AttestationRefused
from node_agent.workload.k8s import K8sAttestor, K8sAttestorConfig
from tests.helpers.kube import FakeKubelet, TestCa, container_status, pod_json

PID = 4242
POD_UID = "6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b"
CID = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899"
CGROUP = (
    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
    f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n"
)


@pytest.fixture
def ca(tmp_path: Path) -> TestCa:
    return TestCa(tmp_path / "pki", "fake-kubelet-ca")


@pytest.fixture
def kubelet(ca: TestCa) -> Iterator[FakeKubelet]:
    with FakeKubelet(ca) as running:
        yield running


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    (root / str(PID)).mkdir(parents=True)
    (root / str(PID) / "cgroup").write_text(CGROUP)
    return root


@pytest.fixture
def config(tmp_path: Path, kubelet: FakeKubelet, ca: TestCa, proc: Path) -> K8sAttestorConfig:
    token = tmp_path / "token"
    token.write_text(kubelet.token + "\n")
    return K8sAttestorConfig(
        kubelet_secure_port=kubelet.port,
        node_name="localhost",
        token_path=token,
        kubelet_ca_path=ca.path,
        max_poll_attempts=5,
        poll_retry_interval=0.05,
        proc_root=str(proc),
    )


def _web_pod(uid: str = POD_UID, container_id: str = CID, **fields: Any) -> dict[str, Any]:
    return pod_json(
        "shop",
        "checkout-5d8f9c7b6-x2x7q",
        uid=uid,
        node="node-a",
        service_account="checkout",
        labels={"app": "checkout", "pod-template-hash": "5d8f9c7b6"},
        owners=[("ReplicaSet", "checkout-5d8f9c7b6", "0e9d8c7b-6a5f-4e3d-2c1b-0a9f8e7d6c5b")],
        containers=[
            container_status(
                "app",
                "registry.example.com/shop/checkout:1.4.2",
                container_id,
                image_id="registry.example.com/shop/checkout@sha256:" + "a" * 64,
            ),
            container_status(
                "envoy",
                "envoyproxy/envoy:v1.31.0",
                "e" * 64,
                image_id="docker.io/envoyproxy/envoy@sha256:" + "b" * 64,
            ),
        ],
        init_containers=[
            container_status(
                "migrate",
                "registry.example.com/shop/migrate:1.4.2",
                "c" * 64,
                image_id="registry.example.com/shop/migrate@sha256:" + "d" * 64,
            )
        ],
        **fields,
    )


def _attest(attestor: K8sAttestor, pid: int = PID) -> list[str]:
    return [str(s) for s in asyncio.run(attestor.attest(pid))]


def test_selectors_of_a_container_in_a_listed_pod(
    kubelet: FakeKubelet, config: K8sAttestorConfig
) -> None:
    """A process in a listed pod's container gets SPIRE's k8s selectors, in SPIRE's order:
    namespace, service account, node, pod, container, images, labels and owners."""
    kubelet.pods = [_web_pod(), pod_json("kube-system", "coredns-1", node="node-a")]
    assert _attest(K8sAttestor(config)) == [
        "k8s:sa:checkout",
        "k8s:ns:shop",
        "k8s:node-name:node-a",
        f"k8s:pod-uid:{POD_UID}",
        "k8s:pod-name:checkout-5d8f9c7b6-x2x7q",
        "k8s:container-name:app",
        "k8s:pod-image-count:2",
        "k8s:pod-init-image-count:1",
        "k8s:container-image:registry.example.com/shop/checkout@sha256:" + "a" * 64,
        "k8s:container-image:registry.example.com/shop/checkout:1.4.2",
        "k8s:pod-image:registry.example.com/shop/checkout@sha256:" + "a" * 64,
        "k8s:pod-image:registry.example.com/shop/checkout:1.4.2",
        "k8s:pod-image:docker.io/envoyproxy/envoy@sha256:" + "b" * 64,
        "k8s:pod-image:envoyproxy/envoy:v1.31.0",
        "k8s:pod-init-image:registry.example.com/shop/migrate@sha256:" + "d" * 64,
        "k8s:pod-init-image:registry.example.com/shop/migrate:1.4.2",
        "k8s:pod-label:app:checkout",
        "k8s:pod-label:pod-template-hash:5d8f9c7b6",
        "k8s:pod-owner:ReplicaSet:checkout-5d8f9c7b6",
        "k8s:pod-owner-uid:ReplicaSet:0e9d8c7b-6a5f-4e3d-2c1b-0a9f8e7d6c5b",
    ]


def test_static_pod_is_found_by_its_mirror_annotation(
    kubelet: FakeKubelet, config: K8sAttestorConfig, proc: Path
) -> None:
    """A static pod's cgroup names its manifest hash; the kubelet lists its mirror pod, whose
    kubernetes.io/config.mirror annotation is that hash."""
    manifest_hash = "6d8ccb9b4dbbc3a9c3a7b0b3c8d2a1f0"
    (proc / str(PID) / "cgroup").write_text(f"0::/kubepods/burstable/pod{manifest_hash}/{CID}\n")
    kubelet.pods = [_web_pod(annotations={"kubernetes.io/config.mirror": manifest_hash})]
    assert f"k8s:pod-uid:{POD_UID}" in _attest(K8sAttestor(config))


def test_process_outside_any_pod_gets_no_k8s_selectors(
    kubelet: FakeKubelet, config: K8sAttestorConfig, proc: Path
) -> None:
    """A host process gets no k8s selectors, without an error and without asking the kubelet."""
    (proc / str(PID) / "cgroup").write_text("0::/system.slice/sshd.service\n")
    assert _attest(K8sAttestor(config)) == []
    assert kubelet.pod_list_requests == 0


def test_two_pods_in_the_cgroups_are_refused(
    kubelet: FakeKubelet, config: K8sAttestorConfig, proc: Path
) -> None:
    """A process whose cgroup file names two pods is refused, without asking the kubelet."""
    other = "7f3e1b2a-0c4d-4e5f-8a9b-1c2d3e4f5a6b"
    (proc / str(PID) / "cgroup").write_text(
        f"1:name=systemd:/kubepods/burstable/pod{other}/{CID}\n"
        f"0::/kubepods/burstable/pod{POD_UID}/{CID}\n"
    )
    with pytest.raises(AttestationRefused) as info:
        _attest(K8sAttestor(config))
    assert f"name two pods: {other} and {POD_UID}" in str(info.value)
    assert kubelet.pod_list_requests == 0


def test_new_pod_is_found_once_the_kubelet_lists_it(
    kubelet: FakeKubelet, config: K8sAttestorConfig
) -> None:
    """A pod the kubelet does not list yet is looked up again on fresh lists until it is."""
    kubelet.pods = [pod_json("kube-system", "coredns-1", node="node-a")]
    listed = threading.Event()

    def list_it_after_the_first_request() -> None:
        kubelet.wait_for_requests(1)
        with kubelet.lock:
            kubelet.pods = [*kubelet.pods, _web_pod()]
        listed.set()

    threading.Thread(target=list_it_after_the_first_request, daemon=True).start()
    attestor = K8sAttestor(replace(config, max_poll_attempts=200))
    assert "k8s:ns:shop" in _attest(attestor)
    assert listed.is_set()
    assert kubelet.pod_list_requests >= 2


def test_pod_never_listed_is_refused_after_the_bounded_attempts(
    kubelet: FakeKubelet, config: K8sAttestorConfig
) -> None:
    """When the kubelet lists another pod, the call is refused after max_poll_attempts fresh
    lists, saying which container of which pod the kubelet does not know."""
    kubelet.pods = [_web_pod(uid="11111111-2222-4333-8444-555555555555")]
    with pytest.raises(AttestationRefused) as info:
        _attest(K8sAttestor(config))
    assert str(info.value) == (
        f"workload attestation refused (pid {PID}): the kubelet of node localhost does not "
        f"list the caller's container {CID} of pod {POD_UID} after 5 attempts (no pod with "
        f"UID {POD_UID} on the list)"
    )
    assert kubelet.pod_list_requests == 5


def test_pod_listed_without_the_container_is_refused(
    kubelet: FakeKubelet, config: K8sAttestorConfig
) -> None:
    """A listed pod that has no container with the caller's ID is refused, naming the pod."""
    kubelet.pods = [_web_pod(container_id="f" * 64)]
    with pytest.raises(AttestationRefused) as info:
        _attest(K8sAttestor(config))
    assert f"pod shop/checkout-5d8f9c7b6-x2x7q lists no container {CID}" in str(info.value)


def test_pod_list_is_cached_briefly(kubelet: FakeKubelet, config: K8sAttestorConfig) -> None:
    """Calls within poll_retry_interval share one pod list."""
    kubelet.pods = [_web_pod()]
    attestor = K8sAttestor(replace(config, poll_retry_interval=60))

    async def three_calls() -> None:
        await asyncio.gather(*(attestor.attest(PID) for _ in range(3)))
        await attestor.attest(PID)

    asyncio.run(three_calls())
    assert kubelet.pod_list_requests == 1


def test_token_is_read_at_each_request(
    kubelet: FakeKubelet, config: K8sAttestorConfig, tmp_path: Path
) -> None:
    """A rotated service account token is used from the next pod list on."""
    kubelet.pods = [_web_pod()]
    attestor = K8sAttestor(replace(config, poll_retry_interval=0.01))
    assert _attest(attestor)
    kubelet.token = "rotated-token"
    config.token_path.write_text("rotated-token")
    time.sleep(0.02)  # the cached list (10 ms) is stale: no event marks that, only the clock
    assert _attest(attestor)
    assert kubelet.pod_list_requests == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda k, c: replace(c, kubelet_secure_port=1),
            "workload attestation failed: cannot list pods from the kubelet at "
            "https://localhost:1/pods: ",
        ),
        (
            lambda k, c: (setattr(k, "token", "another"), c)[1],
            "the kubelet at https://localhost:{port}/pods answered 401 Unauthorized; the "
            "agent's service account needs get on nodes/proxy",
        ),
        (
            lambda k, c: replace(c, token_path=c.token_path.with_name("missing")),
            "cannot read the kubelet token {tmp}/missing: No such file or directory",
        ),
        (
            lambda k, c: replace(c, kubelet_ca_path=TestCa(c.token_path.parent / "other").path),
            "certificate verify failed",
        ),
        (
            lambda k, c: replace(c, kubelet_ca_path=c.token_path.with_name("no-ca.crt")),
            "cannot load the kubelet CA {tmp}/no-ca.crt",
        ),
    ],
    ids=["kubelet-down", "token-refused", "no-token", "untrusted-kubelet", "no-ca"],
)
def test_kubelet_failures_fail_the_call_clearly(
    kubelet: FakeKubelet, config: K8sAttestorConfig, tmp_path: Path, change: Any, message: str
) -> None:
    """A kubelet that cannot be reached, refuses the token or is not trusted fails the call
    at once with one line saying so."""
    kubelet.pods = [_web_pod()]
    attestor = K8sAttestor(change(kubelet, config))
    with pytest.raises(AttestationFailed) as info:
        _attest(attestor)
    assert message.format(port=kubelet.port, tmp=tmp_path) in str(info.value)


def test_skipping_kubelet_verification_is_explicit_and_warned(
    kubelet: FakeKubelet,
    config: K8sAttestorConfig,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With skip_kubelet_verification = true an untrusted kubelet is used, and the agent logs
    a warning when the attestor is built."""
    kubelet.pods = [_web_pod()]
    untrusted = replace(config, kubelet_ca_path=TestCa(tmp_path / "other").path)
    caplog.set_level(logging.WARNING, logger="node_agent.workload.k8s")
    attestor = K8sAttestor(replace(untrusted, skip_kubelet_verification=True))
    assert "kubelet certificate verification is OFF" in caplog.text
    assert "k8s:ns:shop" in _attest(attestor)


def test_node_name_comes_from_the_environment(
    config: K8sAttestorConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without node_name the kubelet is the node named by $MY_NODE_NAME; with neither, the
    attestor refuses to start, saying what to set."""
    monkeypatch.setenv("MY_NODE_NAME", "node-b.internal")
    assert (
        K8sAttestor(replace(config, node_name="")).url
        == f"https://node-b.internal:{config.kubelet_secure_port}/pods"
    )
    monkeypatch.delenv("MY_NODE_NAME")
    with pytest.raises(ConfigError) as info:
        K8sAttestor(replace(config, node_name=""))
    assert "no node name: set node_name, or the environment variable MY_NODE_NAME" in str(
        info.value
    )


# --- the config table -----------------------------------------------------------------------


def _load(tmp_path: Path, table: str) -> Any:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[agent]\nserver_addresses = ["s:8081"]\n[agent.workload_attestor.unix]\n'
        "[agent.workload_attestor.k8s]\n" + table
    )
    return load_config(path, {})


def test_k8s_table_parses_with_spire_defaults(tmp_path: Path) -> None:
    """[agent.workload_attestor.k8s] parses; its defaults are SPIRE's (port 10250, the pod's
    token and CA, MY_NODE_NAME, 60 attempts 0.5 s apart, verification on)."""
    config = _load(tmp_path, "")
    assert [p.name for p in config.workload_attestor] == ["unix", "k8s"]
    k8s = config.workload_attestor[1].config
    assert k8s == K8sAttestorConfig()
    assert (k8s.kubelet_secure_port, k8s.node_name_env, k8s.skip_kubelet_verification) == (
        10250,
        "MY_NODE_NAME",
        False,
    )
    assert str(k8s.token_path) == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert str(k8s.kubelet_ca_path) == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert (k8s.max_poll_attempts, k8s.poll_retry_interval) == (60, 0.5)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            "kubelet_port = 1\n",
            "agent.workload_attestor.k8s.kubelet_port: unknown setting; expected one of: ",
        ),
        (
            "kubelet_secure_port = 70000\n",
            "agent.workload_attestor.k8s.kubelet_secure_port: expected a port from 1 to 65535",
        ),
        (
            'skip_kubelet_verification = "yes"\n',
            "agent.workload_attestor.k8s.skip_kubelet_verification: expected true or false",
        ),
        (
            "max_poll_attempts = 0\n",
            "agent.workload_attestor.k8s.max_poll_attempts: must be at least 1",
        ),
        (
            'node_name_env = ""\n',
            "agent.workload_attestor.k8s.node_name_env: is empty and node_name is not set",
        ),
    ],
    ids=["unknown-key", "bad-port", "bad-bool", "no-attempts", "no-node-name"],
)
def test_bad_k8s_tables_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    """A bad [agent.workload_attestor.k8s] table is refused with its full TOML key."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, table)
    assert str(info.value).startswith(message), str(info.value)
