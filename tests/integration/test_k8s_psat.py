"""k8s_psat end to end: real `credo-server run` and `credo-agent run` processes, configured by
plugin tables as the Helm chart configures them, against a local HTTPS server that answers
like the Kubernetes API (tests/helpers/kube.py), which the server reaches through the real
``kubernetes`` client and a kubeconfig. Workloads fetch with py-spiffe.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.kube import FakeKubeApi
from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    credo_server_command,
    short_temp_dir,
    start_server,
    wait_for,
    write_server_bundle,
)

pytest.importorskip("spiffe")
pytestmark = pytest.mark.slow

TD = "example.org"
CLUSTER = "prod"
NAMESPACE = "credo"
AGENT_SA = "credo-agent"


def _server_toml(api: FakeKubeApi) -> str:
    return (
        "[server]\n"
        f'trust_domain = "{TD}"\n'
        f"[server.node_attestor.k8s_psat.clusters.{CLUSTER}]\n"
        f'service_account_allow_list = ["{NAMESPACE}:{AGENT_SA}"]\n'
        'audience = ["credo-server"]\n'
        f'kube_config_file = "{api.kubeconfig}"\n'
        'allowed_node_label_keys = ["topology.kubernetes.io/zone"]\n'
        "allowed_pod_label_keys = []\n"
    )


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubeApi]:
    with FakeKubeApi(tmp_path_factory.mktemp("kube")) as running:
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, api: FakeKubeApi) -> Iterator[ServerProcess]:
    """One server for the module (starting one takes a while); each test has its own node."""
    tmp_path = tmp_path_factory.mktemp("server")
    config = tmp_path / "server.toml"
    config.write_text(_server_toml(api))
    with start_server(tmp_path, config=config) as running:
        yield running


@pytest.fixture
def node(api: FakeKubeApi) -> Iterator[str]:
    """A node of its own for the test (so its agent ID is its own), the API in its normal state."""
    name = f"node-{uuid.uuid4().hex[:8]}"
    api.add_node(name, labels={"topology.kubernetes.io/zone": "eu-1a"})
    yield name
    api.review_checks_binding = True
    if not api.running:  # a test that took the API down failed before bringing it back
        api.start()


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_temp_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _agent_pod(api: FakeKubeApi, node: str, service_account: str = AGENT_SA) -> dict[str, Any]:
    """The agent's pod on ``node`` (a second call replaces it: same name, new UID)."""
    return api.add_pod(NAMESPACE, f"credo-agent-{node}", node=node, service_account=service_account)


def _agent(server: ServerProcess, root: Path, token: str) -> AgentProcess:
    """`credo-agent run --config` with [agent.node_attestor.k8s_psat] and the token on disk."""
    token_path = root / "tokens" / "credo-agent"
    token_path.parent.mkdir(exist_ok=True)
    token_path.write_text(token)
    config = root / "agent.toml"
    config.write_text(
        "[agent]\n"
        f'[agent.node_attestor.k8s_psat]\ncluster = "{CLUSTER}"\ntoken_path = "{token_path}"\n'
        "[agent.workload_attestor.unix]\n"
    )
    bundle = write_server_bundle(server, root / "bundle.pem")
    return AgentProcess(root, server.address, bundle, None, flags={"config": config})


def _agent_id(api: FakeKubeApi, node: str) -> str:
    return f"spiffe://{TD}/credo/agent/k8s_psat/{CLUSTER}/{api.nodes[node]['metadata']['uid']}"


def test_agent_attests_with_its_projected_token_and_serves_workloads(
    server: ServerProcess, api: FakeKubeApi, node: str, root: Path
) -> None:
    """An agent with a valid projected token becomes .../k8s_psat/<cluster>/<node uid> with
    its node selectors, and serves the workloads registered under it."""
    pod = _agent_pod(api, node)
    agent = _agent(server, root, api.issue_token(pod)).start()
    try:
        shown = server.cli_json("agent", "show", "--spiffe-id", _agent_id(api, node))
        assert shown["attestation_type"] == "k8s_psat"
        selectors = {f"{s['type']}:{s['value']}" for s in shown["selectors"]}
        assert {
            f"k8s_psat:cluster:{CLUSTER}",
            f"k8s_psat:agent_ns:{NAMESPACE}",
            f"k8s_psat:agent_sa:{AGENT_SA}",
            f"k8s_psat:agent_pod_name:credo-agent-{node}",
            f"k8s_psat:agent_pod_uid:{pod['metadata']['uid']}",
            f"k8s_psat:agent_node_name:{node}",
            f"k8s_psat:agent_node_uid:{api.nodes[node]['metadata']['uid']}",
            "k8s_psat:agent_node_label:topology.kubernetes.io/zone:eu-1a",
        } <= selectors
        create_entry(server, _agent_id(api, node), f"spiffe://{TD}/ns/shop/sa/checkout")
        assert wait_for(agent.fetch_ids, 30, "the workload's SVID") == [
            f"spiffe://{TD}/ns/shop/sa/checkout"
        ]
    finally:
        agent.stop()


def _wrong_audience(api: FakeKubeApi, node: str) -> tuple[str, str]:
    token = api.issue_token(_agent_pod(api, node), audiences=["vault"])
    return token, "token audience ['vault'] is not one of the accepted audiences ['credo-server']"


def _not_allowed(api: FakeKubeApi, node: str) -> tuple[str, str]:
    token = api.issue_token(_agent_pod(api, node, service_account="default"))
    return token, "service account credo:default is not allowed to attest in cluster 'prod'"


def _pod_uid_mismatch(api: FakeKubeApi, node: str) -> tuple[str, str]:
    token = api.issue_token(_agent_pod(api, node))
    _agent_pod(api, node)  # replaced by a pod of the same name; the API's review missed it
    api.review_checks_binding = False
    return token, (f"pod UID mismatch: the token is bound to pod credo/credo-agent-{node} with UID")


def _unauthenticated(api: FakeKubeApi, node: str) -> tuple[str, str]:
    token = api.issue_token(_agent_pod(api, node))
    forged = token[: token.rindex(".") + 1] + "AAAA"
    return forged, "token not authenticated by the TokenReview API: [invalid bearer token"


@pytest.mark.parametrize(
    "refusal",
    [_wrong_audience, _not_allowed, _pod_uid_mismatch, _unauthenticated],
    ids=["wrong-audience", "service-account-not-allowed", "pod-uid-mismatch", "unauthenticated"],
)
def test_refused_agent_exits_with_the_reason(
    server: ServerProcess, api: FakeKubeApi, node: str, root: Path, refusal: Any
) -> None:
    """A refused agent exits 1 with the server's one-line reason, which the server logs too,
    and no agent is recorded."""
    token, reason = refusal(api, node)
    agents_before = server.cli_json("agent", "count")["count"]
    agent = _agent(server, root, token).start(wait=False)
    assert agent.proc is not None
    assert agent.proc.wait(30) == 1
    assert "refused the node attestation" in agent.logs and reason in agent.logs
    assert "Traceback" not in agent.logs
    assert "node attestation refused" in server.logs and reason in server.logs
    assert "Traceback" not in server.logs
    assert server.cli_json("agent", "count")["count"] == agents_before


def test_agent_retries_while_the_api_is_down_and_attests_when_it_is_back(
    server: ServerProcess, api: FakeKubeApi, node: str, root: Path
) -> None:
    """With the Kubernetes API unreachable the agent is told so (UNAVAILABLE) and keeps
    trying; once the API answers again it attests."""
    token = api.issue_token(_agent_pod(api, node))
    api.stop()
    agent = _agent(server, root, token).start(wait=False)
    try:
        wait_for(
            lambda: "kubernetes API unreachable (create tokenreviews)" in agent.logs,
            30,
            "the agent to log the unreachable API",
        )
        assert agent.running
        api.start()
        wait_for(agent.healthy, 30, "the agent to attest")
        assert server.cli_json("agent", "show", "--spiffe-id", _agent_id(api, node))
    finally:
        agent.stop()


def test_agent_that_lost_its_data_dir_attests_again(
    server: ServerProcess, api: FakeKubeApi, node: str, root: Path
) -> None:
    """An agent whose pod lost its data directory attests again with a fresh token and keeps
    its agent ID; its workloads get their SVIDs again."""
    pod = _agent_pod(api, node)
    agent = _agent(server, root, api.issue_token(pod)).start()
    agent_id = _agent_id(api, node)
    try:
        create_entry(server, agent_id, f"spiffe://{TD}/web-{node}")
        wait_for(agent.fetch_ids, 30, "the SVID")
        assert agent.stop() == 0
        shutil.rmtree(agent.data_dir)
        (root / "tokens" / "credo-agent").write_text(api.issue_token(pod))  # rotated
        agent.start()
        assert wait_for(agent.fetch_ids, 30, "the SVID again") == [f"spiffe://{TD}/web-{node}"]
        agents = server.cli_json("agent", "list")["agents"]
        assert [a["spiffe_id"] for a in agents].count(agent_id) == 1
        assert f"agent_id={agent_id}" in server.logs and "reattested=True" in server.logs
    finally:
        agent.stop()


def test_server_with_a_missing_kubeconfig_exits_with_one_line(tmp_path: Path) -> None:
    """credo-server run refuses a k8s_psat cluster whose kubeconfig does not exist: exit 1,
    one line naming the key, no traceback."""
    config = tmp_path / "server.toml"
    config.write_text(
        "[server]\n[server.node_attestor.k8s_psat.clusters.prod]\n"
        'service_account_allow_list = ["credo:credo-agent"]\n'
        f'kube_config_file = "{tmp_path}/missing.yaml"\n'
    )
    sock = short_temp_dir()
    try:
        result = subprocess.run(
            [
                *credo_server_command(), "run", "--config", str(config),
                "--data-dir", str(tmp_path / "data"), "--bind-address", "127.0.0.1:0",
                "--admin-socket", str(sock / "api.sock"),
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        shutil.rmtree(sock, ignore_errors=True)
    assert result.returncode == 1
    assert (
        "server.node_attestor.k8s_psat.clusters.prod.kube_config_file: kubeconfig "
        f"{tmp_path}/missing.yaml does not exist or is not a file"
    ) in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
