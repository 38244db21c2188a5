"""charts/credo renders valid Kubernetes objects, and configs the server and agent load.

Helm itself does the rendering and linting: helm-python-sdk binds Helm's Go SDK (libhelm_c),
so no helm binary and no cluster are needed. kubernetes-validate checks every rendered object
against the Kubernetes OpenAPI schemas.

The rendered server.toml and agent.toml are loaded with the real config loaders, plugin
tables included (``[server.node_attestor.k8s_psat.clusters.<name>]``,
``[server.bundle_publisher.k8s_configmap]``, ``[agent.node_attestor.k8s_psat]``,
``[agent.workload_attestor.k8s]``...), so a setting the chart writes and Credo does not know
fails here.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from node_agent.attestation.k8s_psat import K8sPsatConfig
from node_agent.config import AgentConfig, PluginConfig
from node_agent.config import load_config as load_agent_config
from node_agent.workload.k8s import K8sAttestorConfig
from node_agent.workload.unix import UnixAttestorConfig
from server.attestation.join_token import JoinTokenConfig
from server.attestation.k8s_psat import K8sPsatCluster
from server.attestation.k8s_psat import K8sPsatConfig as ServerK8sPsatConfig
from server.bundle_publisher.k8s_configmap import K8sConfigMapConfig
from server.config import ServerConfig
from server.config import load_config as load_server_config

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "credo"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# The oldest Kubernetes the chart is checked against, and a current one.
KUBE_VERSIONS = ("1.30", "1.36")
RELEASE = "credo"
NAMESPACE = "identity"
COMPONENT = "app.kubernetes.io/component"

Manifests = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    helm.disable_logging()
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def ci_values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())
    return values


def render(chart: Any, values: dict[str, Any] | None = None) -> Manifests:
    """Render like `helm template credo charts/credo -n identity`; objects by kind."""
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: Manifests = {}
    for template, text in out.items():
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.setdefault(doc["kind"], []).append(doc)
    return objects


def one(objects: Manifests, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects.get(kind, []) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def config_file(objects: Manifests, tmp_path: Path, component: str) -> Path:
    """The rendered ``<component>.toml`` of ConfigMap credo-<component>, written to a file."""
    text = one(objects, "ConfigMap", f"credo-{component}")["data"][f"{component}.toml"]
    path = tmp_path / f"{component}.toml"
    path.write_text(text)
    return path


def load_server(objects: Manifests, tmp_path: Path, flags: dict[str, Any] | None = None) -> Any:
    """The rendered server.toml, loaded by credo-server's own loader (plugin tables too)."""
    return load_server_config(config_file(objects, tmp_path, "server"), flags or {})


def load_agent(objects: Manifests, tmp_path: Path) -> Any:
    """The rendered agent.toml, loaded by credo-agent's own loader (plugin tables too)."""
    return load_agent_config(config_file(objects, tmp_path, "agent"), {})


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Pod, or of a workload's pod template."""
    if workload["kind"] == "Pod":
        pod: dict[str, Any] = workload["spec"]
        return pod
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in pod_spec(workload)["containers"] if c["name"] == name)
    return found


def server_container(objects: Manifests) -> dict[str, Any]:
    return container(one(objects, "StatefulSet"), "server")


def agent_container(objects: Manifests) -> dict[str, Any]:
    return container(one(objects, "DaemonSet"), "agent")


def volumes(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(workload)["volumes"]}


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c["volumeMounts"]}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- every scenario: lint, Kubernetes schemas, labels ----------------------------------


def test_every_ci_scenario_is_present() -> None:
    """The documented ci/*-values.yaml scenarios exist."""
    assert [p.name for p in CI_VALUES] == [
        "custom-trust-domain-values.yaml",
        "default-values.yaml",
        "http-frontend-values.yaml",
        "metrics-values.yaml",
        "postgres-ha-values.yaml",
        "upstream-ca-values.yaml",
    ]


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_every_scenario_renders_configs_credo_loads(
    chart: Any, values_file: Path, tmp_path: Path
) -> None:
    """server.toml and agent.toml of every scenario load with credo-server's and
    credo-agent's own loaders, every plugin table included."""
    objects = render(chart, yaml.safe_load(values_file.read_text()))
    server = load_server(objects, tmp_path)
    assert "k8s_configmap" in server.bundle_publisher
    if "credo-agent" in {c["metadata"]["name"] for c in objects["ConfigMap"]}:
        agent = load_agent(objects, tmp_path)
        assert agent.node_attestor.name == "k8s_psat"
        assert [p.name for p in agent.workload_attestor] == ["unix", "k8s"]
        assert agent.node_attestor.config.cluster in server.node_attestor["k8s_psat"].clusters


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_passes(values_file: Path) -> None:
    """`helm lint --strict` reports no warning or error for the scenario."""
    values = yaml.safe_load(values_file.read_text())
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSIONS[-1]}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_rendered_objects_validate_against_kubernetes(
    chart: Any, values_file: Path, kube_version: str
) -> None:
    """Every object the scenario renders is valid (strict: no unknown fields) for Kubernetes."""
    objects = render(chart, yaml.safe_load(values_file.read_text()))
    assert {"StatefulSet", "ConfigMap", "Service", "ServiceAccount", "Role"} <= set(objects)
    for obj in (o for docs in objects.values() for o in docs):
        kubernetes_validate.validate(obj, kube_version, strict=True)


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_every_object_names_its_component(chart: Any, values_file: Path) -> None:
    """Every object is labelled server, agent or test, and each selector includes its component."""
    objects = render(chart, yaml.safe_load(values_file.read_text()))
    for obj in (o for docs in objects.values() for o in docs):
        labels = obj["metadata"]["labels"]
        assert labels[COMPONENT] in ("server", "agent", "test"), obj["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
    for kind in ("StatefulSet", "DaemonSet"):
        for workload in objects.get(kind, []):
            selector = workload["spec"]["selector"]["matchLabels"]
            pod_labels = workload["spec"]["template"]["metadata"]["labels"]
            assert (
                selector[COMPONENT]
                == pod_labels[COMPONENT]
                == workload["metadata"]["labels"][COMPONENT]
            )
    for service in objects["Service"]:
        assert service["spec"]["selector"][COMPONENT] == "server"


def test_server_and_agent_selectors_do_not_overlap(chart: Any) -> None:
    """The server's Services and PDB select server pods only; the DaemonSet only agent pods."""
    objects = render(chart, ci_values("postgres-ha"))  # 3 replicas: a PodDisruptionBudget too
    server_pods = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    agent_pods = one(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    test_pod = one(objects, "Pod")["metadata"]["labels"]
    selectors = [s["spec"]["selector"] for s in objects["Service"]]
    selectors.append(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    selectors.append(one(objects, "StatefulSet")["spec"]["selector"]["matchLabels"])
    assert len(selectors) == 4  # the agent Service, headless Service, PDB, StatefulSet
    for selector in selectors:
        assert matches(selector, server_pods), selector
        assert not matches(selector, agent_pods), selector
        assert not matches(selector, test_pod), selector
    agent_selector = one(objects, "DaemonSet")["spec"]["selector"]["matchLabels"]
    assert matches(agent_selector, agent_pods)
    assert not matches(agent_selector, server_pods)
    assert not matches(agent_selector, test_pod)


# --- the server ------------------------------------------------------------------------


def test_default_server_toml_loads_with_chart_defaults(chart: Any, tmp_path: Path) -> None:
    """The default server.toml's settings load with load_config: SQLite in the volume."""
    objects = render(chart, ci_values("default"))
    config = load_server(objects, tmp_path)
    assert config.trust_domain == "example.org"
    assert str(config.data_dir) == "/var/lib/credo/server"
    assert config.bind_address == "0.0.0.0:8081"
    assert str(config.admin_socket) == "/run/credo-server/private/api.sock"
    assert (config.ca_ttl, config.x509_svid_ttl, config.jwt_svid_ttl) == (86400, 3600, 300)
    assert (config.join_token_ttl, config.signing_workers) == (600, 2)
    assert (config.log_level, config.log_format, config.metrics_address) == ("info", "json", "")
    assert config.datastore_url == "sqlite:////var/lib/credo/server/datastore.sqlite3"
    assert config.upstream_ca_cert is None
    claim = one(objects, "StatefulSet")["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"


def test_k8s_psat_config_names_this_cluster(chart: Any, tmp_path: Path) -> None:
    """server.toml configures k8s_psat for clusterName, admitting the chart's agent account,
    with the in-cluster API config; credo-server loads it as such."""
    objects = render(chart, ci_values("default"))
    config = load_server(objects, tmp_path)
    assert dict(config.node_attestor) == {
        "join_token": JoinTokenConfig(),
        "k8s_psat": ServerK8sPsatConfig(
            clusters={
                "example-cluster": K8sPsatCluster(
                    service_account_allow_list=("identity:credo-agent",),
                    audience=("credo-server",),
                    kube_config_file=None,
                    allowed_node_label_keys=(),
                    allowed_pod_label_keys=(),
                )
            }
        ),
    }
    # The allowed account is the one the agents run as.
    agent_sa = pod_spec(one(objects, "DaemonSet"))["serviceAccountName"]
    assert agent_sa == "credo-agent"
    assert one(objects, "ServiceAccount", agent_sa)["metadata"]["namespace"] == NAMESPACE


def test_custom_scenario_reaches_the_k8s_psat_config(chart: Any, tmp_path: Path) -> None:
    """Cluster name, audiences, extra accounts and label keys of the values reach the
    k8s_psat config credo-server loads."""
    objects = render(chart, ci_values("custom-trust-domain"))
    config = load_server(objects, tmp_path)
    assert config.trust_domain == "prod.example.com"
    assert dict(config.node_attestor["k8s_psat"].clusters) == {
        "prod-eu-1": K8sPsatCluster(
            service_account_allow_list=("identity:credo-agent", "infra:credo-agent-canary"),
            audience=("credo.prod.example.com", "credo-server"),
            kube_config_file=None,
            allowed_node_label_keys=("topology.kubernetes.io/zone",),
            allowed_pod_label_keys=("app.kubernetes.io/version",),
        )
    }


def test_bundle_publisher_writes_the_configmap_agents_mount(chart: Any, tmp_path: Path) -> None:
    """The server publishes to the chart's bundle ConfigMap under the key agents read, may
    patch it, and agents mount it."""
    objects = render(chart)
    publishers = load_server(objects, tmp_path).bundle_publisher
    assert dict(publishers) == {
        "k8s_configmap": K8sConfigMapConfig(
            namespace=NAMESPACE, name="credo-bundle", key="bundle.pem", kube_config_file=None
        )
    }
    bundle = one(objects, "ConfigMap", "credo-bundle")
    assert "data" not in bundle  # the server fills it; Helm never overwrites the bundle
    rules = one(objects, "Role", "credo-server-bundle")["rules"]
    assert {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]} in rules
    assert {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["credo-bundle"],
        "verbs": ["get", "patch", "update"],
    } in rules
    binding = one(objects, "RoleBinding", "credo-server-bundle")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "credo-server", "namespace": NAMESPACE}
    ]
    daemonset = one(objects, "DaemonSet")
    assert volumes(daemonset)["bundle"]["configMap"] == {"name": "credo-bundle"}
    agent = load_agent(objects, tmp_path)
    assert str(agent.trust_bundle) == "/etc/credo/bundle/bundle.pem"
    assert mounts(container(daemonset, "agent"))["/etc/credo/bundle"]["name"] == "bundle"
    assert agent.insecure_bootstrap is False


def test_server_may_review_tokens_and_read_pods_and_nodes(chart: Any) -> None:
    """The server's ClusterRole allows TokenReview create and pods/nodes get, bound to its SA."""
    objects = render(chart)
    role = one(objects, "ClusterRole", "credo-server-identity")
    assert role["rules"] == [
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        },
        {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get"]},
    ]
    binding = one(objects, "ClusterRoleBinding", "credo-server-identity")
    assert binding["roleRef"]["name"] == "credo-server-identity"
    assert (
        binding["subjects"][0]["name"]
        == pod_spec(one(objects, "StatefulSet"))["serviceAccountName"]
    )
    # The server calls the Kubernetes API in-cluster: its token is mounted.
    assert pod_spec(one(objects, "StatefulSet"))["automountServiceAccountToken"] is True


def test_server_values_reach_server_toml(chart: Any, tmp_path: Path) -> None:
    """Every scalar server.* value is rendered into server.toml under its config name."""
    objects = render(
        chart,
        {
            "trustDomain": "corp.example",
            "server": {
                "caTtl": "2d",
                "x509SvidTtl": "90m",
                "jwtSvidTtl": "120",
                "agentSvidTtl": "30m",
                "joinTokenTtl": "1h",
                "caKeyType": "rsa-2048",
                "jwtKeyType": "ec-p384",
                "logLevel": "warning",
                "logFormat": "text",
                "attestationRateLimit": 2.5,
                "signingRateLimit": 1000000,
                "signingWorkers": 64,
                "rotationCheckInterval": 0.5,
            },
        },
    )
    config = load_server(objects, tmp_path)
    assert config.trust_domain == "corp.example"
    assert (config.ca_ttl, config.x509_svid_ttl, config.jwt_svid_ttl) == (172800, 5400, 120)
    assert (config.agent_svid_ttl, config.join_token_ttl) == (1800, 3600)
    assert (config.ca_key_type, config.jwt_key_type) == ("rsa-2048", "ec-p384")
    assert (config.log_level, config.log_format) == ("warning", "text")
    assert (config.attestation_rate_limit, config.signing_rate_limit) == (2.5, 1_000_000.0)
    assert (config.signing_workers, config.rotation_check_interval) == (64, 0.5)


def test_http_frontend_scenario_reaches_the_config_loaders(chart: Any, tmp_path: Path) -> None:
    """server.http, server.delegation, jwtIssuer, bundleRefreshHint, the sync heartbeat and
    the other server settings, and the agent's trustBundleUrl and backoff, are rendered
    into server.toml / agent.toml and parsed by credo-server's and credo-agent's loaders."""
    objects = render(chart, ci_values("http-frontend"))
    config = load_server(objects, tmp_path)
    assert config.jwt_issuer == "https://oidc.corp.example.com"
    assert (config.bundle_refresh_hint, config.sync_heartbeat_interval) == (120, 15.0)
    assert (config.join_token_max_ttl, config.crl_next_update) == (7200, 1200)
    assert (config.audit_checkpoint_interval, config.require_entry_owner) == (300, True)
    http = config.http
    assert (http.bind_address, http.dns_names) == ("0.0.0.0:8443", ("credo.corp.example.com",))
    assert (str(http.tls_cert_file), str(http.tls_key_file)) == (
        "/etc/credo/http-tls/tls.crt",
        "/etc/credo/http-tls/tls.key",
    )
    assert (http.insecure_http, http.max_request_bytes) == (False, 131072)
    assert (http.request_timeout, http.idle_timeout) == (15, 120)
    delegation = config.delegation
    assert delegation.issuer == "https://credo.corp.example.com:8443"
    assert delegation.introspection_allowed == ("spiffe://example.org/resource/git",)
    corp = delegation.issuers["corp"]
    assert (corp.issuer, corp.jwks_url) == (
        "https://login.corp.example.com",
        "https://login.corp.example.com/keys",
    )
    assert (corp.audience, corp.algorithms, corp.clock_skew) == (("credo",), ("RS256",), 60)
    assert str(corp.ca_file) == "/etc/credo/delegation/corp-ca.pem"
    partner = delegation.issuers["partner"]
    assert (str(partner.jwks_file), partner.jwks_url) == (
        "/etc/credo/delegation/partner-jwks.json",
        "",
    )
    # The JWKS document and the CA bundle are files of the -delegation ConfigMap, mounted
    # where server.toml says they are.
    files = one(objects, "ConfigMap", "credo-server-delegation")["data"]
    assert json.loads(files["partner-jwks.json"])["keys"][0]["kid"] == "p1"
    assert files["corp-ca.pem"].startswith("-----BEGIN CERTIFICATE-----\n")
    mount = mounts(server_container(objects))["/etc/credo/delegation"]
    assert mount == {"name": "delegation", "mountPath": "/etc/credo/delegation", "readOnly": True}
    delegation_volume = volumes(one(objects, "StatefulSet"))["delegation"]
    assert delegation_volume["configMap"]["name"] == "credo-server-delegation"
    # The container port, the Service port, and the certificate from the Secret.
    ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    assert ports == {"grpc": 8081, "http": 8443}
    service = one(objects, "Service", "credo-server")
    assert {"name": "http", "port": 8443, "targetPort": "http", "protocol": "TCP"} in service[
        "spec"
    ]["ports"]
    mount = mounts(server_container(objects))["/etc/credo/http-tls"]
    assert mount == {"name": "http-tls", "mountPath": "/etc/credo/http-tls", "readOnly": True}
    secret = volumes(one(objects, "StatefulSet"))["http-tls"]["secret"]
    assert secret["secretName"] == "credo-web-tls"
    agent = load_agent(objects, tmp_path)
    assert agent.trust_bundle is None
    assert (agent.trust_bundle_url, agent.trust_bundle_format) == (
        "https://credo.corp.example.com:8443/bundle",
        "spiffe",
    )
    assert (agent.sync_backoff_min, agent.sync_backoff_max, agent.svid_wait_timeout) == (
        0.5,
        60.0,
        10.0,
    )


def test_chart_defaults_keep_the_config_defaults(chart: Any, tmp_path: Path) -> None:
    """With the chart's default values, the new settings equal credo's own defaults and no
    HTTP front end or delegation table is rendered."""
    objects = render(chart)
    config = load_server(objects, tmp_path)
    defaults = ServerConfig()
    for name in (
        "jwt_issuer",
        "bundle_refresh_hint",
        "sync_heartbeat_interval",
        "join_token_max_ttl",
        "crl_next_update",
        "audit_checkpoint_interval",
        "require_entry_owner",
        "http",
        "delegation",
    ):
        assert getattr(config, name) == getattr(defaults, name), name
    assert "[server.http]" not in one(objects, "ConfigMap", "credo-server")["data"]["server.toml"]
    agent = load_agent(objects, tmp_path)
    agent_defaults = AgentConfig()
    for name in ("trust_bundle_url", "sync_backoff_min", "sync_backoff_max", "svid_wait_timeout"):
        assert getattr(agent, name) == getattr(agent_defaults, name), name
    assert str(agent.trust_bundle) == "/etc/credo/bundle/bundle.pem"


def test_upstream_ca_scenario_mounts_the_secret_read_only(chart: Any, tmp_path: Path) -> None:
    """upstreamCa mounts tls.crt/tls.key read-only from the Secret and server.toml uses them."""
    objects = render(chart, ci_values("upstream-ca"))
    config = load_server(objects, tmp_path)
    assert (config.trust_domain, config.ca_key_type, config.ca_ttl) == (
        "corp.example.com",
        "ec-p384",
        172800,
    )
    assert str(config.upstream_ca_cert) == "/etc/credo/upstream-ca/tls.crt"
    assert str(config.upstream_ca_key) == "/etc/credo/upstream-ca/tls.key"
    mount = mounts(server_container(objects))["/etc/credo/upstream-ca"]
    assert mount == {"name": "upstream-ca", "mountPath": "/etc/credo/upstream-ca", "readOnly": True}
    secret = volumes(one(objects, "StatefulSet"))["upstream-ca"]["secret"]
    assert secret["secretName"] == "credo-upstream-ca"
    assert {i["key"] for i in secret["items"]} == {"tls.crt", "tls.key"}


def test_server_only_scenario_renders_no_agent(chart: Any, tmp_path: Path) -> None:
    """With agent, k8s_psat, node alias and test off, only the server and its bundle remain."""
    objects = render(chart, ci_values("upstream-ca"))
    assert "DaemonSet" not in objects and "Pod" not in objects
    assert "ClusterRole" not in objects  # no TokenReview, no kubelet access
    assert dict(load_server(objects, tmp_path).node_attestor) == {"join_token": JoinTokenConfig()}
    assert "lifecycle" not in server_container(objects)
    assert set(one(objects, "ConfigMap", "credo-server")["data"]) == {"server.toml"}


def test_metrics_scenario_exposes_the_metrics_port(chart: Any, tmp_path: Path) -> None:
    """metrics.enabled sets metrics_address, a container port, a Service and scrape annotations."""
    objects = render(chart, ci_values("metrics"))
    config = load_server(objects, tmp_path)
    assert config.metrics_address == "0.0.0.0:9988"
    assert (config.log_level, config.log_format, config.signing_workers) == ("debug", "text", 0)
    assert (config.attestation_rate_limit, config.signing_rate_limit) == (0.5, 1_000_000.0)
    ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    assert ports == {"grpc": 8081, "metrics": 9988}
    service = one(objects, "Service", "credo-server-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    annotations = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9988"
    # persistence.enabled=false in this scenario: the data dir is an emptyDir.
    statefulset = one(objects, "StatefulSet")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    assert volumes(statefulset)["data"] == {"name": "data", "emptyDir": {}}
    agent = load_agent(objects, tmp_path)
    assert (agent.log_level, agent.log_format) == ("debug", "text")
    assert agent.metrics_address == "0.0.0.0:9989"
    daemonset = one(objects, "DaemonSet")
    agent_ports = {p["name"]: p["containerPort"] for p in agent_container(objects)["ports"]}
    assert agent_ports == {"metrics": 9989}
    agent_annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert agent_annotations["prometheus.io/port"] == "9989"


def test_postgres_ha_scenario_passes_the_url_from_the_secret(chart: Any, tmp_path: Path) -> None:
    """postgres-ha runs 3 servers with a PDB and --datastore $(CREDO_DATASTORE) from the Secret."""
    objects = render(chart, ci_values("postgres-ha"))
    assert one(objects, "StatefulSet")["spec"]["replicas"] == 3
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert "Secret" not in objects  # the URL lives in the user's existing Secret
    server = server_container(objects)
    assert server["command"] == ["credo-server"]
    args = server["args"]
    assert args[:3] == ["run", "--config", "/etc/credo/server.toml"]
    assert args[args.index("--datastore") + 1] == "$(CREDO_DATASTORE)"
    env = {e["name"]: e for e in server["env"]}
    assert env["CREDO_DATASTORE"]["valueFrom"]["secretKeyRef"] == {
        "name": "credo-datastore",
        "key": "url",
    }
    # The flag overrides the (empty) datastore in the file, as Kubernetes would expand it.
    url = "postgresql://credo:secret@db:5432/credo"
    config = load_server(objects, tmp_path, {"datastore": url})
    assert config.datastore_url == url


def test_postgres_url_in_values_goes_to_a_secret_not_the_configmap(chart: Any) -> None:
    """A datastore.postgresql.url is stored in a chart Secret and never in the ConfigMap."""
    url = "postgresql://credo:hunter2@db:5432/credo"
    objects = render(
        chart, {"server": {"datastore": {"type": "postgresql", "postgresql": {"url": url}}}}
    )
    secret = one(objects, "Secret", "credo-datastore")
    assert base64.b64decode(secret["data"]["url"]).decode() == url
    assert "hunter2" not in json.dumps(objects["ConfigMap"])
    assert "hunter2" not in json.dumps(one(objects, "StatefulSet"))
    assert "PodDisruptionBudget" not in objects  # replicas: 1


def test_server_runs_non_root_with_a_read_only_root_filesystem(chart: Any) -> None:
    """The server pod runs as non-root uid 10001 with a read-only root fs and no capabilities."""
    objects = render(chart)
    pod = pod_spec(one(objects, "StatefulSet"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostPID" not in pod and "hostNetwork" not in pod
    security = server_container(objects)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # Everything the server writes is on a volume: data dir, admin socket dir, /tmp. The
    # volumes sit one level above the directories the server creates and chmods 0700 itself.
    assert {"/var/lib/credo", "/run/credo-server", "/tmp"} <= set(mounts(server_container(objects)))
    # An emptyDir is root's, mode 0777, which the server refuses as a parent of its private
    # directories: an init container (root, CAP_CHOWN only) makes them the server's, 0700.
    init = {c["name"]: c for c in pod["initContainers"]}["private-dirs"]
    assert init["command"][-2:] == ["/run/credo-server", "/tmp"]
    assert "chmod 0700" in init["command"][2] and "chown 10001:10001" in init["command"][2]
    assert init["securityContext"]["runAsUser"] == 0
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert set(mounts(init)) == {"/run/credo-server", "/tmp"}


def test_probes_run_credo_server_healthcheck(chart: Any) -> None:
    """The startup, liveness and readiness probes exec `credo-server healthcheck` on the socket."""
    server = server_container(render(chart))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = server[probe]["exec"]["command"]
        assert command[:4] == [
            "credo-server",
            "healthcheck",
            "--socket",
            "/run/credo-server/private/api.sock",
        ], probe
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["CREDO_SERVER_SOCKET"] == "/run/credo-server/private/api.sock"


def test_service_exposes_grpc_on_8081(chart: Any) -> None:
    """The ClusterIP Service forwards port 8081 named grpc to the server's agent endpoint."""
    service = one(render(chart), "Service", "credo-server")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["name"] == "grpc"
    assert service["spec"]["ports"][0]["port"] == 8081
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"


# --- the node alias and its registration -----------------------------------------------


def test_node_alias_is_registered_by_the_server_pods(chart: Any) -> None:
    """The server's postStart hook runs the rendered script that registers the node alias."""
    objects = render(chart)
    server = server_container(objects)
    assert server["lifecycle"]["postStart"]["exec"]["command"] == [
        "sh",
        "/etc/credo/register-entries.sh",
    ]
    assert mounts(server)["/etc/credo/register-entries.sh"] == {
        "name": "config",
        "mountPath": "/etc/credo/register-entries.sh",
        "subPath": "register-entries.sh",
        "readOnly": True,
    }
    script = one(objects, "ConfigMap", "credo-server")["data"]["register-entries.sh"]
    assert (
        "ensure_entry 'spiffe://example.org/k8s-cluster/example-cluster' --node "
        "'k8s_psat:cluster:example-cluster'"
    ) in script
    assert (
        "ensure_entry 'spiffe://example.org/ns/identity/sa/credo-test' "
        "'spiffe://example.org/k8s-cluster/example-cluster' 'k8s:ns:identity k8s:sa:credo-test'"
    ) in script


def test_custom_node_alias_id_is_registered(chart: Any) -> None:
    """server.nodeAlias.spiffeId replaces the default node alias ID for this cluster."""
    objects = render(chart, ci_values("custom-trust-domain"))
    script = one(objects, "ConfigMap", "credo-server")["data"]["register-entries.sh"]
    assert (
        "ensure_entry 'spiffe://prod.example.com/clusters/prod-eu-1/nodes' --node "
        "'k8s_psat:cluster:prod-eu-1'"
    ) in script


# --- the agent -------------------------------------------------------------------------


def test_agent_toml_attests_with_k8s_psat_and_both_workload_attestors(
    chart: Any, tmp_path: Path
) -> None:
    """agent.toml names k8s_psat for the cluster, unix and k8s attestors, and the server Service."""
    objects = render(chart)
    config = load_agent(objects, tmp_path)
    assert config.server_addresses == ("credo-server.identity.svc:8081",)
    assert config.trust_domain == "example.org"
    assert str(config.socket_path) == "/run/credo/agent-sockets/api.sock"
    assert str(config.admin_socket) == "/run/credo-agent/private/admin.sock"
    assert str(config.data_dir) == "/var/lib/credo-agent/agent"
    assert config.insecure_bootstrap is False and config.join_token is None
    assert config.node_attestor == PluginConfig(
        "k8s_psat",
        K8sPsatConfig("example-cluster", Path("/var/run/secrets/tokens/credo-agent")),
    )
    assert config.workload_attestor == (
        PluginConfig("unix", UnixAttestorConfig(workload_size_limit=64 * 1024 * 1024)),
        PluginConfig(
            "k8s",
            K8sAttestorConfig(
                kubelet_secure_port=10250,
                node_name_env="MY_NODE_NAME",
                token_path=Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
                kubelet_ca_path=Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"),
                skip_kubelet_verification=False,
            ),
        ),
    )
    service = one(objects, "Service", "credo-server")
    assert service["spec"]["ports"][0]["port"] == 8081


def test_daemonset_mounts_the_socket_directory_and_the_projected_token(
    chart: Any, tmp_path: Path
) -> None:
    """The agent mounts the socket's host directory and a token with the server's audience."""
    objects = render(chart)
    daemonset = one(objects, "DaemonSet")
    agent = container(daemonset, "agent")
    vols = volumes(daemonset)
    assert vols["sockets"]["hostPath"] == {
        "path": "/run/credo/agent-sockets",
        "type": "DirectoryOrCreate",
    }
    assert mounts(agent)["/run/credo/agent-sockets"]["name"] == "sockets"
    (source,) = vols["agent-token"]["projected"]["sources"]
    assert source["serviceAccountToken"] == {
        "audience": "credo-server",
        "expirationSeconds": 7200,
        "path": "credo-agent",
    }
    token_mount = mounts(agent)["/var/run/secrets/tokens"]
    assert token_mount == {
        "name": "agent-token",
        "mountPath": "/var/run/secrets/tokens",
        "readOnly": True,
    }
    # The token file lands where agent.toml's k8s_psat token_path points.
    token_path = load_agent(objects, tmp_path).node_attestor.config.token_path
    assert str(token_path) == f"{token_mount['mountPath']}/{source['serviceAccountToken']['path']}"
    # The audience is one the server accepts.
    clusters = load_server(objects, tmp_path).node_attestor["k8s_psat"].clusters
    assert source["serviceAccountToken"]["audience"] in clusters["example-cluster"].audience


def test_daemonset_gives_the_attestors_what_they_need(chart: Any) -> None:
    """hostPID, MY_NODE_NAME from the downward API, the pod token, and exec health probes."""
    objects = render(chart)
    daemonset = one(objects, "DaemonSet")
    pod = pod_spec(daemonset)
    assert pod["hostPID"] is True
    assert "hostNetwork" not in pod
    assert pod["automountServiceAccountToken"] is True  # kubelet bearer token and CA
    agent = container(daemonset, "agent")
    assert agent["command"] == ["credo-agent"]
    assert agent["args"] == ["run", "--config", "/etc/credo/agent.toml"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["MY_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert agent[probe]["exec"]["command"][:4] == [
            "credo-agent",
            "healthcheck",
            "--admin-socket",
            "/run/credo-agent/private/admin.sock",
        ], probe
    assert agent["readinessProbe"]["exec"]["command"][-1] == "--ready"
    assert "--ready" not in agent["livenessProbe"]["exec"]["command"]
    assert agent["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    rules = one(objects, "ClusterRole", "credo-agent-identity")["rules"]
    assert rules == [
        {"apiGroups": [""], "resources": ["pods", "nodes", "nodes/proxy"], "verbs": ["get"]}
    ]
    binding = one(objects, "ClusterRoleBinding", "credo-agent-identity")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]


def test_agent_runs_as_its_own_user_without_capabilities(chart: Any) -> None:
    """The agent is non-root uid 10002 with no capabilities; only the chown step is root."""
    daemonset = one(render(chart), "DaemonSet")
    pod = pod_spec(daemonset)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10002
    security = container(daemonset, "agent")["securityContext"]
    assert security["runAsUser"] == 10002 and security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    init = {c["name"]: c for c in pod["initContainers"]}
    assert init["socket-dir"]["command"] == ["chown", "10002:10002", "/run/credo/agent-sockets"]
    assert init["socket-dir"]["securityContext"]["runAsUser"] == 0
    assert init["socket-dir"]["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["CHOWN"],
    }
    assert init["private-dirs"]["command"][-3:] == [
        "/run/credo-agent/private",
        "/var/lib/credo-agent",
        "/tmp",
    ]
    assert "chown 10002:10002" in init["private-dirs"]["command"][2]
    assert init["private-dirs"]["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["CHOWN"],
    }
    assert init["wait-for-bundle"]["securityContext"]["runAsUser"] == 10002
    assert init["wait-for-bundle"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_custom_socket_path_reaches_agent_daemonset_and_test(chart: Any, tmp_path: Path) -> None:
    """agent.socketPath sets the agent's socket, the host directory, and the test's endpoint."""
    objects = render(chart, ci_values("custom-trust-domain"))
    agent = load_agent(objects, tmp_path)
    assert str(agent.socket_path) == "/run/identity/sockets/workload.sock"
    daemonset = one(objects, "DaemonSet")
    assert volumes(daemonset)["sockets"]["hostPath"]["path"] == "/run/identity/sockets"
    assert "/run/identity/sockets" in mounts(container(daemonset, "agent"))
    audience = volumes(daemonset)["agent-token"]["projected"]["sources"][0]
    assert audience["serviceAccountToken"]["audience"] == "credo.prod.example.com"
    (k8s,) = (p.config for p in agent.workload_attestor if p.name == "k8s")
    assert k8s.skip_kubelet_verification is True
    test_pod = one(objects, "Pod")
    assert volumes(test_pod)["spiffe-workload-api"]["hostPath"]["path"] == "/run/identity/sockets"
    env = {e["name"]: e["value"] for e in test_pod["spec"]["containers"][0]["env"]}
    assert env == {
        "SPIFFE_ENDPOINT_SOCKET": "unix:///spiffe-workload-api/workload.sock",
        "EXPECTED_SPIFFE_ID": "spiffe://prod.example.com/ns/identity/sa/credo-test",
    }


# --- helm test -------------------------------------------------------------------------


def test_helm_test_pod_fetches_its_svid_through_the_workload_api(chart: Any) -> None:
    """The test hook pod runs `credo-agent api fetch x509` on the mounted socket as its own SA."""
    objects = render(chart)
    pod = one(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["serviceAccountName"] == "credo-test"
    one(objects, "ServiceAccount", "credo-test")
    (fetch,) = pod["spec"]["containers"]
    assert "credo-agent api fetch x509 --output json" in fetch["command"][-1]
    assert mounts(fetch)["/spiffe-workload-api"]["readOnly"] is True
    assert volumes(pod)["spiffe-workload-api"]["hostPath"] == {
        "path": "/run/credo/agent-sockets",
        "type": "Directory",
    }


# --- refused values --------------------------------------------------------------------


def test_replicas_above_one_with_sqlite_fail_clearly(chart: Any) -> None:
    """More than one replica without PostgreSQL refuses to render and says why."""
    with pytest.raises(helm.HelmRenderError, match=r"server.replicas=2 needs a shared PostgreSQL"):
        render(chart, {"server": {"replicas": 2}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"server": {"datastore": {"type": "postgresql"}}},
            "needs server.datastore.postgresql.url",
        ),
        (
            {
                "server": {
                    "datastore": {
                        "type": "postgresql",
                        "postgresql": {"url": "postgresql://db/credo", "existingSecret": "s"},
                    }
                }
            },
            "set url or existingSecret, not both",
        ),
        (
            {"server": {"datastore": {"postgresql": {"existingSecret": "s"}}}},
            "server.datastore.type is sqlite",
        ),
        (
            {"server": {"upstreamCa": {"enabled": True}}},
            "server.upstreamCa.enabled needs server.upstreamCa.existingSecret",
        ),
        ({"server": {"service": {"nodePort": 30081}}}, "server.service.nodePort needs"),
        (
            {"server": {"nodeAttestor": {"k8sPsat": {"enabled": False}}}},
            "agent.enabled needs server.nodeAttestor.k8sPsat.enabled",
        ),
        ({"agent": {"enabled": False}}, "test.enabled needs agent.enabled"),
        (
            {"server": {"nodeAlias": {"spiffeId": "spiffe://other.org/k8s-cluster/x"}}},
            "must be in the trust domain (start with spiffe://example.org/)",
        ),
        (
            {"server": {"nodeAlias": {"spiffeId": "spiffe://example.org/credo/agents"}}},
            "is under /credo/, which is reserved",
        ),
        (
            {"agent": {"socketPath": "/run/credo-agent/public/api.sock"}},
            "is inside /run/credo-agent, the agent's private directory",
        ),
        (
            {"server": {"delegation": {"introspectionAllowed": ["spiffe://example.org/x"]}}},
            "server.delegation needs server.http.enabled",
        ),
        (
            {
                "server": {
                    "http": {"enabled": True, "insecureHttp": True, "tls": {"existingSecret": "s"}}
                }
            },
            "server.http: insecureHttp serves no certificate",
        ),
        (
            {"server": {"http": {"enabled": True, "port": 8081}}},
            "server.http.port must differ from the agent endpoint port",
        ),
        (
            {
                "server": {
                    "http": {"enabled": True},
                    "delegation": {
                        "issuers": {
                            "corp": {
                                "issuer": "https://idp.example",
                                "jwksUrl": "https://idp.example/keys",
                                "jwks": '{"keys": []}',
                            }
                        }
                    },
                }
            },
            "server.delegation.issuers.corp: give jwksUrl or jwks, not both",
        ),
    ],
    ids=[
        "postgres-no-url",
        "postgres-url-and-secret",
        "secret-with-sqlite",
        "upstream-no-secret",
        "nodeport-clusterip",
        "agent-without-k8s-psat",
        "test-without-agent",
        "alias-other-trust-domain",
        "alias-reserved-path",
        "socket-in-private-dir",
        "delegation-without-http",
        "insecure-http-with-certificate",
        "http-port-clash",
        "issuer-jwks-twice",
    ],
)
def test_invalid_combinations_fail(chart: Any, values: dict[str, Any], message: str) -> None:
    """Combinations the schema cannot express are refused by the templates with a clear message."""
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, values)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"server": {"trustDomain": "x.org"}}, "additional properties 'trustDomain' not allowed"),
        ({"server": {"persistence": {"enabled": True, "sizee": "1Gi"}}}, "'sizee' not allowed"),
        ({"agent": {"socket": "/run/x/api.sock"}}, "additional properties 'socket' not allowed"),
        ({"server": {"caKeyType": "dsa"}}, "/server/caKeyType"),
        ({"server": {"logLevel": "trace"}}, "/server/logLevel"),
        ({"agent": {"logFormat": "xml"}}, "/agent/logFormat"),
        ({"server": {"datastore": {"type": "mysql"}}}, "/server/datastore/type"),
        ({"server": {"replicas": 0}}, "/server/replicas"),
        ({"server": {"signingWorkers": 65}}, "/server/signingWorkers"),
        ({"server": {"caTtl": "one day"}}, "/server/caTtl"),
        ({"trustDomain": "Example.ORG"}, "/trustDomain"),
        ({"clusterName": "prod_eu"}, "/clusterName"),
        ({"agent": {"socketPath": "run/credo/api.sock"}}, "/agent/socketPath"),
        ({"agent": {"socketPath": "/run/api.sock"}}, "/agent/socketPath"),
        ({"agent": {"kubelet": {"securePort": 0}}}, "/agent/kubelet/securePort"),
        ({"agent": {"tokenExpirationSeconds": 60}}, "/agent/tokenExpirationSeconds"),
        ({"server": {"nodeAttestor": {"k8sPsat": {"audience": []}}}}, "/audience"),
        (
            {"server": {"nodeAttestor": {"k8sPsat": {"serviceAccountAllowList": ["credo-agent"]}}}},
            "/serviceAccountAllowList/0",
        ),
        ({"server": {"nodeAlias": {"spiffeId": "k8s-cluster/x"}}}, "/server/nodeAlias/spiffeId"),
        ({"test": {"enabled": "yes"}}, "/test/enabled"),
    ],
    ids=[
        "unknown-top",
        "moved-to-top",
        "unknown-deep",
        "unknown-agent",
        "ca-key-dsa",
        "log-level",
        "agent-log-format",
        "datastore",
        "replicas-0",
        "workers-65",
        "bad-duration",
        "trust-domain-upper-case",
        "cluster-name-underscore",
        "socket-relative",
        "socket-directly-under-run",
        "kubelet-port-0",
        "token-too-short",
        "no-audience",
        "allow-list-without-namespace",
        "alias-not-spiffe",
        "test-not-boolean",
    ],
)
def test_schema_rejects_bad_values(chart: Any, values: dict[str, Any], where: str) -> None:
    """values.schema.json rejects unknown keys, bad enum values, patterns and ranges."""
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render(chart, values)


def test_templates_fail_on_bad_enums_even_without_the_schema(tmp_path: Path) -> None:
    """With the schema skipped (as --skip-schema-validation does) the templates still `fail`."""
    copy = tmp_path / "credo"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with helm.Chart.load(copy) as unchecked:
        with pytest.raises(
            helm.HelmRenderError, match=r'server.caKeyType: "dsa" is not one of ec-p256'
        ):
            render(unchecked, {"server": {"caKeyType": "dsa"}})
        with pytest.raises(helm.HelmRenderError, match=r'agent.logLevel: "trace" is not one of'):
            render(unchecked, {"agent": {"logLevel": "trace"}})
        with pytest.raises(helm.HelmRenderError, match=r'clusterName: "Prod" must be lower-case'):
            render(unchecked, {"clusterName": "Prod"})


def test_schema_closes_every_object() -> None:
    """Every object with declared properties in the schema sets additionalProperties: false."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path or "/")
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{path}/{index}")

    walk(schema, "")
    assert open_objects == []


def test_schema_describes_every_value() -> None:
    """Every key of values.yaml is declared in the schema, with a type and a description."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing: list[str] = []

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if not ("type" in node or "oneOf" in node) or "description" not in node:
            missing.append(path)
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                if key not in node["properties"]:
                    missing.append(f"{path}/{key}")
                else:
                    walk(child, node["properties"][key], f"{path}/{key}")

    for key, child in values.items():
        walk(child, schema["properties"][key], key)
    assert missing == []


def test_every_value_has_a_comment() -> None:
    """Each key in values.yaml is documented by a comment line right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = [
        line.strip()
        for previous, line in itertools.pairwise(lines)
        if re.match(r"^\s*[A-Za-z][A-Za-z0-9]*:", line) and not previous.strip().startswith("#")
    ]
    assert undocumented == []


# --- the image -------------------------------------------------------------------------


def test_chart_runs_the_image_the_dockerfile_builds(chart: Any) -> None:
    """The default image is the Dockerfile's, whose users have the uids the chart runs as."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", dockerfile, re.MULTILINE)
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    assert "--uid 10001" in dockerfile and "--uid 10002" in dockerfile
    assert 'ENTRYPOINT ["credo-server"]' in dockerfile
    assert chart.metadata["appVersion"] == "0.1.0"
    assert chart.values["image"] == {"repository": "credo", "tag": "", "pullPolicy": "IfNotPresent"}
    objects = render(chart)
    images = {
        c["image"]
        for workload in (one(objects, "StatefulSet"), one(objects, "DaemonSet"))
        for c in pod_spec(workload)["containers"] + pod_spec(workload).get("initContainers", [])
    }
    images |= {c["image"] for c in one(objects, "Pod")["spec"]["containers"]}
    assert images == {"credo:0.1.0"}
