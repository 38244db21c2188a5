"""The example configuration files in docs/examples load as documented."""

from __future__ import annotations

from pathlib import Path

from node_agent.config import load_config as load_agent_config
from node_agent.workload.k8s import K8sAttestorConfig
from node_agent.workload.systemd import SystemdAttestorConfig
from node_agent.workload.unix import UnixAttestorConfig
from server.attestation.join_token import JoinTokenConfig
from server.attestation.k8s_psat import K8sPsatCluster
from server.bundle_publisher.k8s_configmap import K8sConfigMapConfig
from server.config import load_config as load_server_config

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def test_server_example_loads_with_its_values() -> None:
    """docs/examples/server.toml is a valid server config and its durations are parsed."""
    config = load_server_config(EXAMPLES / "server.toml", {})
    assert config.trust_domain == "example.org"
    assert (config.ca_ttl, config.x509_svid_ttl, config.jwt_svid_ttl) == (86400, 3600, 300)
    assert config.join_token_ttl == 600
    assert config.log_format == "json"
    assert config.sync_heartbeat_interval == 5.0
    assert config.datastore_url.startswith("sqlite:///")
    assert dict(config.node_attestor) == {"join_token": JoinTokenConfig()}
    assert config.http.host_port == ("0.0.0.0", 8443)
    assert config.http.dns_names == ("credo.example.org",)
    assert config.http.tls_cert_file is None
    assert not config.http.insecure_http
    corp = config.delegation.issuers["corp"]
    assert (corp.issuer, corp.audience, corp.clock_skew) == (
        "https://login.example.org",
        ("credo",),
        30,
    )
    assert config.delegation.introspection_allowed == ("spiffe://example.org/resource/git",)


def test_server_flags_override_the_example_file() -> None:
    """A flag given on the command line wins over the same key in the file."""
    config = load_server_config(EXAMPLES / "server.toml", {"x509_svid_ttl": "10m"})
    assert config.x509_svid_ttl == 600


def test_agent_example_loads_with_its_values() -> None:
    """docs/examples/agent.toml is a valid agent config with two servers to fail over between."""
    config = load_agent_config(EXAMPLES / "agent.toml", {})
    assert config.server_addresses == ("credo-1.internal:8081", "credo-2.internal:8081")
    assert str(config.trust_bundle) == "/etc/credo/bundle.pem"
    assert config.svid_cache_max_size == 1000


def test_agent_example_names_its_attestors_in_plugin_tables() -> None:
    """docs/examples/agent.toml configures join_token, unix and systemd in their own tables,
    with no deprecated key left in it."""
    config = load_agent_config(EXAMPLES / "agent.toml", {})
    assert config.node_attestor.name == "join_token"
    assert [(p.name, p.config) for p in config.workload_attestor] == [
        ("unix", UnixAttestorConfig(discover_workload_path=True, workload_size_limit=64 << 20)),
        ("systemd", SystemdAttestorConfig()),
    ]
    assert config.deprecations == ()


def test_kubernetes_server_example_loads_its_plugin_tables() -> None:
    """docs/examples/server-kubernetes.toml enables join_token and k8s_psat for cluster prod,
    and the bundle ConfigMap publisher, as documented in it."""
    config = load_server_config(EXAMPLES / "server-kubernetes.toml", {})
    assert set(config.node_attestor) == {"join_token", "k8s_psat"}
    assert config.node_attestor["k8s_psat"].clusters == {
        "prod": K8sPsatCluster(
            service_account_allow_list=("credo:credo-agent",),
            audience=("credo-server",),
            kube_config_file=None,
            allowed_node_label_keys=("topology.kubernetes.io/zone",),
        )
    }
    assert dict(config.bundle_publisher) == {
        "k8s_configmap": K8sConfigMapConfig(namespace="credo", name="credo-bundle")
    }


def test_kubernetes_agent_example_loads_its_plugin_tables() -> None:
    """docs/examples/agent-kubernetes.toml attests with k8s_psat and combines unix and k8s,
    with SPIRE's defaults spelled out."""
    config = load_agent_config(EXAMPLES / "agent-kubernetes.toml", {})
    assert (config.node_attestor.name, config.node_attestor.config.cluster) == ("k8s_psat", "prod")
    assert [(p.name, p.config) for p in config.workload_attestor] == [
        ("unix", UnixAttestorConfig()),
        ("k8s", K8sAttestorConfig()),
    ]
