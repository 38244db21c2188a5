"""charts/credo renders valid Kubernetes objects and a server.toml the server loads.

Helm itself does the rendering and linting: helm-python-sdk binds Helm's Go SDK (libhelm_c),
so no helm binary and no cluster are needed. kubernetes-validate checks every rendered object
against the Kubernetes OpenAPI schemas.
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

from server.config import load_config

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "credo"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30"
RELEASE = "credo"
NAMESPACE = "identity"

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


def server_toml(objects: Manifests, tmp_path: Path) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(one(objects, "ConfigMap")["data"]["server.toml"])
    return path


def server_container(objects: Manifests) -> dict[str, Any]:
    spec = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    container_spec: dict[str, Any] = container
    return container_spec


def test_every_ci_scenario_is_present() -> None:
    """The four documented ci/*-values.yaml scenarios exist."""
    assert [p.name for p in CI_VALUES] == [
        "default-values.yaml",
        "metrics-values.yaml",
        "postgres-ha-values.yaml",
        "upstream-ca-values.yaml",
    ]


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_passes(values_file: Path) -> None:
    """`helm lint --strict` reports no warning or error for the scenario."""
    values = yaml.safe_load(values_file.read_text())
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_rendered_objects_validate_against_kubernetes(chart: Any, values_file: Path) -> None:
    """Every object the scenario renders is valid (strict: no unknown fields) for Kubernetes."""
    objects = render(chart, yaml.safe_load(values_file.read_text()))
    rendered = [o for docs in objects.values() for o in docs]
    assert {"StatefulSet", "ConfigMap", "Service", "ServiceAccount"} <= set(objects)
    for obj in rendered:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_default_server_toml_loads_with_chart_defaults(chart: Any, tmp_path: Path) -> None:
    """The default ConfigMap's server.toml loads with load_config and uses SQLite in the volume."""
    objects = render(chart, ci_values("default"))
    config = load_config(server_toml(objects, tmp_path), {})
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


def test_server_values_reach_server_toml(chart: Any, tmp_path: Path) -> None:
    """Every server.* value is rendered into server.toml under its config name."""
    objects = render(
        chart,
        {
            "server": {
                "trustDomain": "corp.example",
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
            }
        },
    )
    config = load_config(server_toml(objects, tmp_path), {})
    assert config.trust_domain == "corp.example"
    assert (config.ca_ttl, config.x509_svid_ttl, config.jwt_svid_ttl) == (172800, 5400, 120)
    assert (config.agent_svid_ttl, config.join_token_ttl) == (1800, 3600)
    assert (config.ca_key_type, config.jwt_key_type) == ("rsa-2048", "ec-p384")
    assert (config.log_level, config.log_format) == ("warning", "text")
    assert (config.attestation_rate_limit, config.signing_rate_limit) == (2.5, 1_000_000.0)
    assert (config.signing_workers, config.rotation_check_interval) == (64, 0.5)


def test_upstream_ca_scenario_mounts_the_secret_read_only(chart: Any, tmp_path: Path) -> None:
    """upstreamCa mounts tls.crt/tls.key read-only from the Secret and server.toml uses them."""
    objects = render(chart, ci_values("upstream-ca"))
    config = load_config(server_toml(objects, tmp_path), {})
    assert (config.trust_domain, config.ca_key_type, config.ca_ttl) == (
        "prod.example.com",
        "ec-p384",
        172800,
    )
    assert str(config.upstream_ca_cert) == "/etc/credo/upstream-ca/tls.crt"
    assert str(config.upstream_ca_key) == "/etc/credo/upstream-ca/tls.key"
    container = server_container(objects)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "upstream-ca")
    assert mount == {"name": "upstream-ca", "mountPath": "/etc/credo/upstream-ca", "readOnly": True}
    volumes = one(objects, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    secret = next(v for v in volumes if v["name"] == "upstream-ca")["secret"]
    assert secret["secretName"] == "credo-upstream-ca"
    assert {i["key"] for i in secret["items"]} == {"tls.crt", "tls.key"}


def test_metrics_scenario_exposes_the_metrics_port(chart: Any, tmp_path: Path) -> None:
    """metrics.enabled sets metrics_address, a container port, a Service and scrape annotations."""
    objects = render(chart, ci_values("metrics"))
    config = load_config(server_toml(objects, tmp_path), {})
    assert config.metrics_address == "0.0.0.0:9988"
    assert (config.log_level, config.log_format, config.signing_workers) == ("debug", "text", 0)
    assert (config.attestation_rate_limit, config.signing_rate_limit) == (0.5, 1_000_000.0)
    ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    assert ports == {"grpc": 8081, "metrics": 9988}
    service = one(objects, "Service", "credo-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    annotations = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9988"
    # persistence.enabled=false in this scenario: the data dir is an emptyDir.
    statefulset = one(objects, "StatefulSet")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}


def test_postgres_ha_scenario_passes_the_url_from_the_secret(chart: Any, tmp_path: Path) -> None:
    """postgres-ha runs 3 servers with a PDB and --datastore $(CREDO_DATASTORE) from the Secret."""
    objects = render(chart, ci_values("postgres-ha"))
    assert one(objects, "StatefulSet")["spec"]["replicas"] == 3
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert "Secret" not in objects  # the URL lives in the user's existing Secret
    container = server_container(objects)
    args = container["args"]
    assert args[:3] == ["run", "--config", "/etc/credo/server.toml"]
    assert args[args.index("--datastore") + 1] == "$(CREDO_DATASTORE)"
    env = {e["name"]: e for e in container["env"]}
    assert env["CREDO_DATASTORE"]["valueFrom"]["secretKeyRef"] == {
        "name": "credo-datastore",
        "key": "url",
    }
    # The flag overrides the (empty) datastore in the file, as Kubernetes would expand it.
    url = "postgresql://credo:secret@db:5432/credo"
    config = load_config(server_toml(objects, tmp_path), {"datastore": url})
    assert config.datastore_url == url


def test_postgres_url_in_values_goes_to_a_secret_not_the_configmap(chart: Any) -> None:
    """A datastore.postgresql.url is stored in a chart Secret and never in the ConfigMap."""
    url = "postgresql://credo:hunter2@db:5432/credo"
    objects = render(chart, {"datastore": {"type": "postgresql", "postgresql": {"url": url}}})
    secret = one(objects, "Secret", "credo-datastore")
    assert base64.b64decode(secret["data"]["url"]).decode() == url
    assert "hunter2" not in json.dumps(one(objects, "ConfigMap"))
    assert "hunter2" not in json.dumps(one(objects, "StatefulSet"))
    assert "PodDisruptionBudget" not in objects  # replicas: 1


def test_replicas_above_one_with_sqlite_fail_clearly(chart: Any) -> None:
    """More than one replica without PostgreSQL refuses to render and says why."""
    with pytest.raises(helm.HelmRenderError, match=r"replicas=2 needs a shared PostgreSQL"):
        render(chart, {"replicas": 2})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"datastore": {"type": "postgresql"}}, "needs datastore.postgresql.url or"),
        (
            {
                "datastore": {
                    "type": "postgresql",
                    "postgresql": {"url": "postgresql://db/credo", "existingSecret": "s"},
                }
            },
            "set url or existingSecret, not both",
        ),
        (
            {"datastore": {"postgresql": {"existingSecret": "s"}}},
            "datastore.type is sqlite",
        ),
        ({"upstreamCa": {"enabled": True}}, "upstreamCa.enabled needs upstreamCa.existingSecret"),
        ({"service": {"nodePort": 30081}}, "service.nodePort needs service.type"),
    ],
    ids=[
        "postgres-no-url",
        "postgres-url-and-secret",
        "secret-with-sqlite",
        "upstream-no-secret",
        "nodeport-clusterip",
    ],
)
def test_invalid_combinations_fail(chart: Any, values: dict[str, Any], message: str) -> None:
    """Combinations the schema cannot express are refused by the templates with a clear message."""
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, values)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replica": 2}, "additional properties 'replica' not allowed"),
        ({"server": {"trustdomain": "x.org"}}, "additional properties 'trustdomain' not allowed"),
        ({"persistence": {"enabled": True, "sizee": "1Gi"}}, "'sizee' not allowed"),
        ({"server": {"caKeyType": "dsa"}}, "/server/caKeyType"),
        ({"server": {"logLevel": "trace"}}, "/server/logLevel"),
        ({"datastore": {"type": "mysql"}}, "/datastore/type"),
        ({"replicas": 0}, "/replicas"),
        ({"server": {"signingWorkers": 65}}, "/server/signingWorkers"),
        ({"server": {"caTtl": "one day"}}, "/server/caTtl"),
    ],
    ids=[
        "unknown-top",
        "unknown-nested",
        "unknown-deep",
        "ca-key-dsa",
        "log-level",
        "datastore",
        "replicas-0",
        "workers-65",
        "bad-duration",
    ],
)
def test_schema_rejects_bad_values(chart: Any, values: dict[str, Any], where: str) -> None:
    """values.schema.json rejects unknown keys, bad enum values and out-of-range numbers."""
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render(chart, values)


def test_templates_fail_on_bad_enums_even_without_the_schema(tmp_path: Path) -> None:
    """With the schema skipped (as --skip-schema-validation does) the templates still `fail`."""
    copy = tmp_path / "credo"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with (
        helm.Chart.load(copy) as unchecked,
        pytest.raises(helm.HelmRenderError, match=r'server.caKeyType: "dsa" is not one of ec-p256'),
    ):
        render(unchecked, {"server": {"caKeyType": "dsa"}})


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


def test_every_value_has_a_comment() -> None:
    """Each key in values.yaml is documented by a comment line right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = [
        line.strip()
        for previous, line in itertools.pairwise(lines)
        if re.match(r"^\s*[A-Za-z][A-Za-z0-9]*:", line) and not previous.strip().startswith("#")
    ]
    assert undocumented == []


def test_server_runs_non_root_with_a_read_only_root_filesystem(chart: Any) -> None:
    """The pod runs as non-root uid 10001 with a read-only root fs and no capabilities."""
    statefulset = one(render(chart), "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = server_container(render(chart))["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"] for m in server_container(render(chart))["volumeMounts"]}
    # Everything the server writes is on a volume: data dir, admin socket dir, /tmp. The
    # volumes sit one level above the directories the server creates and chmods 0700 itself.
    assert {"/var/lib/credo", "/run/credo-server", "/tmp"} <= mounts


def test_probes_run_credo_server_healthcheck(chart: Any) -> None:
    """The startup, liveness and readiness probes exec `credo-server healthcheck` on the socket."""
    container = server_container(render(chart))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:4] == [
            "credo-server",
            "healthcheck",
            "--socket",
            "/run/credo-server/private/api.sock",
        ], probe
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CREDO_SERVER_SOCKET"] == "/run/credo-server/private/api.sock"


def test_service_exposes_grpc_on_8081(chart: Any) -> None:
    """The ClusterIP Service forwards port 8081 named grpc to the server's agent endpoint."""
    service = one(render(chart), "Service", "credo")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["name"] == "grpc"
    assert service["spec"]["ports"][0]["port"] == 8081
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"


def test_chart_renders_no_agent_daemonset(chart: Any) -> None:
    """The chart installs only the server: the agent DaemonSet awaits Kubernetes attestation."""
    for values_file in CI_VALUES:
        assert "DaemonSet" not in render(chart, yaml.safe_load(values_file.read_text()))


def test_dockerfile_user_matches_the_chart(chart: Any) -> None:
    """The Dockerfile runs as uid 10001, the uid the chart's securityContext requires."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["credo-server"]' in dockerfile
    assert chart.metadata["appVersion"] == "0.1.0"
    assert chart.values["image"] == {"repository": "credo", "tag": "", "pullPolicy": "IfNotPresent"}
