"""k8s_psat node attestation: the server checks a projected token with the Kubernetes API.

A real in-process server (real TLS gRPC AttestAgent calls) with the k8s_psat plugin,
talking through the real ``kubernetes`` client and a kubeconfig to a local HTTPS server
that answers like the API (tests/helpers/kube.py). Refusals are checked the way an agent
sees them: status code, ``credo-refusal`` code, and the one-line message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from credo._protocol import Refusal, refusal_in
from credo.errors import ConfigError
from credo.spiffe_id import TrustDomain
from server.attestation.catalog import PluginContext, build_node_attestors
from server.attestation.k8s_psat import K8sPsatCluster, K8sPsatConfig
from server.config import load_config
from tests.helpers.kube import FakeKubeApi
from tests.helpers.server import InProcessServer, make_csr

CLUSTER = "prod"
NAMESPACE = "credo"
AGENT_SA = "credo-agent"
ZONE = "topology.kubernetes.io/zone"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubeApi]:
    with FakeKubeApi(tmp_path_factory.mktemp("kube")) as running:
        yield running


def _agent_pod(api: FakeKubeApi, name: str = "credo-agent-7xk2p", **fields: Any) -> dict[str, Any]:
    fields.setdefault("service_account", AGENT_SA)
    fields.setdefault("labels", {"app": "credo-agent", "pod-template-hash": "5d8f9"})
    return api.add_pod(NAMESPACE, name, node="node-a", host_ip="10.0.0.11", **fields)


@pytest.fixture(scope="module")
def running_server(
    tmp_path_factory: pytest.TempPathFactory, api: FakeKubeApi
) -> Iterator[InProcessServer]:
    cluster = K8sPsatCluster(
        service_account_allow_list=(f"{NAMESPACE}:{AGENT_SA}",),
        kube_config_file=api.kubeconfig,
        allowed_node_label_keys=(ZONE,),
        allowed_pod_label_keys=("app",),
    )
    config = K8sPsatConfig(clusters={CLUSTER: cluster})
    tmp_path = tmp_path_factory.mktemp("server")
    with InProcessServer(tmp_path, node_attestor={"k8s_psat": config}) as running:
        yield running


@pytest.fixture
def server(running_server: InProcessServer, api: FakeKubeApi) -> Iterator[InProcessServer]:
    """The module's server (starting one per test is slow), with the API as new: node-a
    recreated (a new UID, so each test's agent has an ID of its own), no pods, no switches."""
    with api.lock:
        api.pods.clear()
        api.forbidden.clear()
        api.audience_aware = True
        api.review_checks_binding = True
    api.add_node("node-a", labels={ZONE: "eu-1a", "node.kubernetes.io/instance-type": "m5"})
    yield running_server
    if not api.running:
        api.start()


def _payload(token: str, cluster: str = CLUSTER) -> bytes:
    return json.dumps({"cluster": cluster, "token": token}).encode()


def _attest(server: InProcessServer, payload: bytes) -> agent_pb2.AttestAgentResponse:
    stub = agent_pb2_grpc.AgentStub(server.bootstrap_channel())
    return stub.AttestAgent(
        agent_pb2.AttestAgentRequest(
            attestation_data=agent_pb2.AttestationData(type="k8s_psat", payload=payload),
            csr=make_csr(),
        ),
        timeout=15,
    )


def _refused(server: InProcessServer, payload: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _attest(server, payload)
    return info.value


def _agents(server: InProcessServer) -> Any:
    return admin_pb2_grpc.AgentsStub(server.admin_channel())


def test_valid_token_attests_the_node_with_spire_selectors(
    server: InProcessServer, api: FakeKubeApi
) -> None:
    """A projected token of an allowed service account makes the agent
    spiffe://<td>/credo/agent/k8s_psat/<cluster>/<node uid>, with SPIRE's node selectors
    (labels only for the allowed keys)."""
    pod = _agent_pod(api)
    node_uid = api.nodes["node-a"]["metadata"]["uid"]
    reply = _attest(server, _payload(api.issue_token(pod)))
    agent_id = f"spiffe://example.org/credo/agent/k8s_psat/{CLUSTER}/{node_uid}"
    assert reply.svid.spiffe_id == agent_id
    node = _agents(server).GetAgent(admin_pb2.GetAgentRequest(spiffe_id=agent_id), timeout=10)
    assert node.attestation_type == "k8s_psat"
    assert sorted(f"{s.type}:{s.value}" for s in node.selectors) == sorted(
        [
            f"k8s_psat:cluster:{CLUSTER}",
            f"k8s_psat:agent_ns:{NAMESPACE}",
            f"k8s_psat:agent_sa:{AGENT_SA}",
            "k8s_psat:agent_pod_name:credo-agent-7xk2p",
            f"k8s_psat:agent_pod_uid:{pod['metadata']['uid']}",
            "k8s_psat:agent_node_ip:10.0.0.11",
            "k8s_psat:agent_node_name:node-a",
            f"k8s_psat:agent_node_uid:{node_uid}",
            f"k8s_psat:agent_node_label:{ZONE}:eu-1a",
            "k8s_psat:agent_pod_label:app:credo-agent",
        ]
    )


def _wrong_audience(api: FakeKubeApi) -> bytes:
    return _payload(api.issue_token(_agent_pod(api), audiences=["https://kubernetes.default.svc"]))


def _not_allowed(api: FakeKubeApi) -> bytes:
    return _payload(api.issue_token(_agent_pod(api, "web-1", service_account="default")))


def _pod_replaced(api: FakeKubeApi) -> bytes:
    token = api.issue_token(_agent_pod(api))
    _agent_pod(api)  # same name, new UID
    api.review_checks_binding = False  # the API had not seen the replacement yet
    return _payload(token)


def _pod_gone(api: FakeKubeApi) -> bytes:
    token = api.issue_token(_agent_pod(api))
    api.pods.clear()
    api.review_checks_binding = False
    return _payload(token)


def _forged(api: FakeKubeApi) -> bytes:
    other = FakeKubeApi(api.directory / "other")  # same claims, another cluster's signing key
    other.nodes = api.nodes
    return _payload(other.issue_token(_agent_pod(api)))


def _expired(api: FakeKubeApi) -> bytes:
    return _payload(api.issue_token(_agent_pod(api), expires_in=-60))


def _review_forbidden(api: FakeKubeApi) -> bytes:
    api.forbidden.add("create tokenreviews")
    return _payload(api.issue_token(_agent_pod(api)))


def _pods_forbidden(api: FakeKubeApi) -> bytes:
    api.forbidden.add("get pods")
    return _payload(api.issue_token(_agent_pod(api)))


def _not_audience_aware(api: FakeKubeApi) -> bytes:
    api.audience_aware = False
    return _payload(api.issue_token(_agent_pod(api)))


def _api_down(api: FakeKubeApi) -> bytes:
    token = api.issue_token(_agent_pod(api))
    api.stop()
    return _payload(token)


def _unknown_cluster(api: FakeKubeApi) -> bytes:
    return _payload(api.issue_token(_agent_pod(api)), cluster="staging")


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        (
            _wrong_audience,
            grpc.StatusCode.PERMISSION_DENIED,
            "token audience ['https://kubernetes.default.svc'] is not one of the accepted "
            "audiences ['credo-server'] of cluster 'prod'",
        ),
        (
            _not_allowed,
            grpc.StatusCode.PERMISSION_DENIED,
            "service account credo:default is not allowed to attest in cluster 'prod' "
            "(service_account_allow_list: credo:credo-agent)",
        ),
        (
            _pod_replaced,
            grpc.StatusCode.PERMISSION_DENIED,
            "pod UID mismatch: the token is bound to pod credo/credo-agent-7xk2p with UID",
        ),
        (
            _pod_gone,
            grpc.StatusCode.PERMISSION_DENIED,
            "pod credo/credo-agent-7xk2p the token is bound to does not exist",
        ),
        (
            _forged,
            grpc.StatusCode.PERMISSION_DENIED,
            "token not authenticated by the TokenReview API: [invalid bearer token, "
            "square/go-jose: error in cryptographic primitive]",
        ),
        (
            _expired,
            grpc.StatusCode.PERMISSION_DENIED,
            "token not authenticated by the TokenReview API: [invalid bearer token, "
            "service account token has expired]",
        ),
        (
            _review_forbidden,
            grpc.StatusCode.PERMISSION_DENIED,
            "cluster 'prod': kubernetes API refused create tokenreviews (403): "
            'tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:'
            'credo:credo-server" cannot create resource "tokenreviews"',
        ),
        (
            _pods_forbidden,
            grpc.StatusCode.PERMISSION_DENIED,
            "cluster 'prod': kubernetes API refused get pods credo/credo-agent-7xk2p (403)",
        ),
        (
            _not_audience_aware,
            grpc.StatusCode.PERMISSION_DENIED,
            "the TokenReview confirmed none of the accepted audiences ['credo-server']",
        ),
        (
            _api_down,
            grpc.StatusCode.UNAVAILABLE,
            "cluster 'prod': kubernetes API unreachable (create tokenreviews): ",
        ),
        (
            _unknown_cluster,
            grpc.StatusCode.PERMISSION_DENIED,
            "cluster 'staging' is not configured for k8s_psat on this server (configured: prod)",
        ),
    ],
    ids=[
        "wrong-audience",
        "service-account-not-allowed",
        "pod-uid-mismatch",
        "pod-gone",
        "unauthenticated-token",
        "expired-token",
        "tokenreview-refused",
        "pod-read-refused",
        "api-not-audience-aware",
        "api-down",
        "unknown-cluster",
    ],
)
def test_refusal_says_why_in_one_line(
    server: InProcessServer,
    api: FakeKubeApi,
    setup: Callable[[FakeKubeApi], bytes],
    code: grpc.StatusCode,
    message: str,
) -> None:
    """Each way a k8s_psat attestation fails is refused with attestation_refused, the right
    status code (UNAVAILABLE only when the API did not answer, so the agent retries) and one
    line naming the cause; the server stays up."""
    agents_before = _agents(server).CountAgents(admin_pb2.CountAgentsRequest(), timeout=10).count
    err = _refused(server, setup(api))
    assert err.code() == code, err.details()
    assert refusal_in(err.trailing_metadata()) is Refusal.ATTESTATION_REFUSED  # type: ignore[attr-defined]
    assert message in err.details(), err.details()
    assert "\n" not in err.details()
    count = _agents(server).CountAgents(admin_pb2.CountAgentsRequest(), timeout=10).count
    assert count == agents_before


@pytest.mark.parametrize(
    "payload",
    [b"not json", b'["cluster", "prod"]', b'{"cluster": "prod"}', b'{"token": "x"}'],
    ids=["not-json", "not-an-object", "no-token", "no-cluster"],
)
def test_malformed_attestation_data_is_refused(server: InProcessServer, payload: bytes) -> None:
    """Attestation data that is not {"cluster", "token"} JSON is refused without asking the API."""
    err = _refused(server, payload)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "k8s_psat attestation data" in err.details()


def test_agent_may_attest_again_but_not_once_banned(
    server: InProcessServer, api: FakeKubeApi
) -> None:
    """A k8s_psat agent attests again with a fresh token (same agent ID, new SVID); once
    banned it is refused until an operator deletes it, then it may attest again."""
    pod = _agent_pod(api)
    first = _attest(server, _payload(api.issue_token(pod)))
    replaced = _agent_pod(api)  # the agent's pod replaced on the same node
    again = _attest(server, _payload(api.issue_token(replaced)))
    assert again.svid.spiffe_id == first.svid.spiffe_id
    assert again.svid.cert_chain[0] != first.svid.cert_chain[0]
    agents = _agents(server)
    agents.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=first.svid.spiffe_id), timeout=10)
    err = _refused(server, _payload(api.issue_token(replaced)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refusal_in(err.trailing_metadata()) is Refusal.BANNED  # type: ignore[attr-defined]
    agents.DeleteAgent(admin_pb2.DeleteAgentRequest(spiffe_id=first.svid.spiffe_id), timeout=10)
    assert _attest(server, _payload(api.issue_token(replaced))).svid.spiffe_id == (
        first.svid.spiffe_id
    )


# --- the config table -----------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "server.toml"
    path.write_text("[server]\n" + text)
    return load_config(path, {})


def test_cluster_tables_parse_with_spire_defaults(tmp_path: Path) -> None:
    """[server.node_attestor.k8s_psat.clusters.<name>] tables parse into K8sPsatCluster, with
    audience ["credo-server"] and the in-cluster config by default."""
    config = _load(
        tmp_path,
        "[server.node_attestor.k8s_psat.clusters.prod]\n"
        'service_account_allow_list = ["credo:credo-agent"]\n'
        'kube_config_file = ""\n'
        "[server.node_attestor.k8s_psat.clusters.edge-1]\n"
        'service_account_allow_list = ["credo:credo-agent", "infra:agent"]\n'
        'audience = ["credo.edge"]\n'
        f'kube_config_file = "{tmp_path}/edge.yaml"\n'
        'allowed_node_label_keys = ["topology.kubernetes.io/zone"]\n',
    )
    clusters = config.node_attestor["k8s_psat"].clusters
    assert clusters["prod"] == K8sPsatCluster(service_account_allow_list=("credo:credo-agent",))
    assert clusters["prod"].audience == ("credo-server",)
    assert clusters["prod"].kube_config_file is None
    assert clusters["edge-1"].audience == ("credo.edge",)
    assert clusters["edge-1"].kube_config_file == tmp_path / "edge.yaml"
    assert clusters["edge-1"].allowed_node_label_keys == ("topology.kubernetes.io/zone",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[server.node_attestor.k8s_psat.clusters.prod]\n"
            'service_account_allow_list = ["credo:a"]\naudiences = ["x"]\n',
            "server.node_attestor.k8s_psat.clusters.prod.audiences: unknown setting; expected "
            "one of: allowed_node_label_keys, allowed_pod_label_keys, audience, "
            "kube_config_file, service_account_allow_list",
        ),
        (
            "[server.node_attestor.k8s_psat.clusters.prod]\n"
            'service_account_allow_list = ["credo-agent"]\n',
            "server.node_attestor.k8s_psat.clusters.prod.service_account_allow_list: expected "
            "<namespace>:<service account>, got 'credo-agent'",
        ),
        (
            "[server.node_attestor.k8s_psat.clusters.prod]\n",
            "server.node_attestor.k8s_psat.clusters.prod.service_account_allow_list: name at "
            "least one service account",
        ),
        (
            "[server.node_attestor.k8s_psat.clusters.prod]\n"
            'service_account_allow_list = ["credo:a"]\naudience = []\n',
            "server.node_attestor.k8s_psat.clusters.prod.audience: name at least one",
        ),
        (
            "[server.node_attestor.k8s_psat.clusters.prod]\n"
            'service_account_allow_list = ["credo:a"]\naudience = 5\n',
            "server.node_attestor.k8s_psat.clusters.prod.audience: expected a list of strings",
        ),
        (
            '[server.node_attestor.k8s_psat.clusters."prod/eu"]\n'
            'service_account_allow_list = ["credo:a"]\n',
            "server.node_attestor.k8s_psat.clusters.prod/eu: the cluster name 'prod/eu' cannot "
            "be part of a SPIFFE ID",
        ),
        (
            "[server.node_attestor.k8s_psat]\n",
            "server.node_attestor.k8s_psat.clusters: configure at least one cluster",
        ),
    ],
    ids=[
        "unknown-key",
        "allow-list-entry",
        "no-allow-list",
        "no-audience",
        "audience-not-a-list",
        "cluster-name",
        "no-clusters",
    ],
)
def test_bad_cluster_tables_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    """A bad k8s_psat table is refused with its full TOML key and what was expected."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert str(info.value).startswith(message), str(info.value)


def test_missing_kubeconfig_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    """A kube_config_file that does not exist is refused when the plugin is built, naming the
    key (credo-server run then exits with that line: tests/integration/test_k8s_psat.py)."""
    config = K8sPsatConfig(
        clusters={
            "prod": K8sPsatCluster(
                service_account_allow_list=("credo:a",), kube_config_file=tmp_path / "nope.yaml"
            )
        }
    )
    with pytest.raises(ConfigError) as info:
        build_node_attestors({"k8s_psat": config}, PluginContext(TrustDomain("example.org"), None))  # type: ignore[arg-type]
    assert str(info.value) == (
        "server.node_attestor.k8s_psat.clusters.prod.kube_config_file: kubeconfig "
        f"{tmp_path}/nope.yaml does not exist or is not a file"
    )
