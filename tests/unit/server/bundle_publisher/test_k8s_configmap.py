"""[server.bundle_publisher.k8s_configmap]: the trust bundle kept in a Kubernetes ConfigMap.

A real in-process server publishes through the real ``kubernetes`` client to a local
HTTPS server that answers like the API (tests/helpers/kube.py). The CA rotation through
``credo-server localauthority`` with real processes is in
tests/integration/test_k8s_bundle_publisher.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc
from credo.errors import ConfigError
from server.bundle_publisher.k8s_configmap import K8sConfigMapConfig
from server.config import load_config
from tests.helpers.kube import FakeKubeApi
from tests.helpers.server import InProcessServer

NAMESPACE = "credo"
NAME = "credo-bundle"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeKubeApi]:
    with FakeKubeApi(tmp_path / "kube") as running:
        yield running


def _server(tmp_path: Path, api: FakeKubeApi, **table: Any) -> InProcessServer:
    config = K8sConfigMapConfig(
        namespace=NAMESPACE, name=NAME, kube_config_file=api.kubeconfig, **table
    )
    return InProcessServer(
        tmp_path, bundle_publisher={"k8s_configmap": config}, rotation_check_interval=0.2
    )


def _authorities(server: InProcessServer) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(a.asn1) for a in server.bundle().x509_authorities]


def _pem_certs(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode())


def test_server_creates_the_configmap_with_its_bundle(tmp_path: Path, api: FakeKubeApi) -> None:
    """A server started with the publisher creates the ConfigMap holding its bundle as PEM
    under bundle.pem, the key the chart's agents mount."""
    with _server(tmp_path, api) as server:
        data = api.wait_for_config_map(NAMESPACE, NAME, lambda d: "bundle.pem" in d)
        assert _pem_certs(data["bundle.pem"]) == _authorities(server)
        created = api.config_maps[(NAMESPACE, NAME)]["metadata"]["labels"]
        assert created == {"app.kubernetes.io/managed-by": "credo-server"}


def test_existing_configmap_is_patched_and_keeps_its_other_keys(
    tmp_path: Path, api: FakeKubeApi
) -> None:
    """The ConfigMap Helm created (empty, with its labels) is patched: bundle.pem is set and
    other keys and labels stay."""
    api.config_maps[(NAMESPACE, NAME)] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "resourceVersion": "7",
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
        },
        "data": {"README": "kept"},
    }
    with _server(tmp_path, api, key="root.pem") as server:
        data = api.wait_for_config_map(NAMESPACE, NAME, lambda d: "root.pem" in d)
        assert _pem_certs(data["root.pem"]) == _authorities(server)
        assert data["README"] == "kept"
        meta = api.config_maps[(NAMESPACE, NAME)]["metadata"]
        assert meta["labels"] == {"app.kubernetes.io/managed-by": "Helm"}
    assert ("POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps") not in api.requests


def test_configmap_follows_a_new_authority(tmp_path: Path, api: FakeKubeApi) -> None:
    """A prepared X.509 authority reaches the ConfigMap (before it signs anything), and
    stays there once active."""
    with _server(tmp_path, api) as server:
        first = api.wait_for_config_map(NAMESPACE, NAME, lambda d: "bundle.pem" in d)
        assert len(_pem_certs(first["bundle.pem"])) == 1
        authorities = admin_pb2_grpc.LocalAuthorityStub(server.admin_channel())
        prepared = authorities.PrepareAuthority(admin_pb2.AuthorityRequest(kind="x509"))
        both = api.wait_for_config_map(
            NAMESPACE, NAME, lambda d: len(_pem_certs(d["bundle.pem"])) == 2
        )
        assert _pem_certs(both["bundle.pem"]) == _authorities(server)
        authorities.ActivateAuthority(
            admin_pb2.AuthorityRequest(kind="x509", authority_id=prepared.authority_id)
        )
        assert _pem_certs(api.config_map_data(NAMESPACE, NAME)["bundle.pem"]) == (  # type: ignore[index]
            _authorities(server)
        )


def test_server_runs_while_the_api_is_down_and_publishes_when_it_is_back(
    tmp_path: Path, api: FakeKubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    """With the Kubernetes API unreachable the server starts and serves, logs one line per
    failed attempt, and writes the ConfigMap once the API answers again."""
    kubeconfig = api.kubeconfig
    api.stop()
    config = K8sConfigMapConfig(namespace=NAMESPACE, name=NAME, kube_config_file=kubeconfig)
    caplog.set_level(logging.WARNING, logger="server.bundle_publisher.runner")
    with InProcessServer(tmp_path, bundle_publisher={"k8s_configmap": config}) as server:
        assert server.bundle().x509_authorities  # the server serves
        failure = _wait_for_record(caplog, "bundle publishing failed; retrying")
        assert "kubernetes API unreachable (patch configmaps credo/credo-bundle)" in (
            failure.error  # type: ignore[attr-defined]
        )
        assert failure.destination == "configmap credo/credo-bundle key bundle.pem"  # type: ignore[attr-defined]
        api.start()
        data = api.wait_for_config_map(NAMESPACE, NAME, lambda d: "bundle.pem" in d)
        assert _pem_certs(data["bundle.pem"]) == _authorities(server)


def test_missing_rbac_is_logged_and_retried(
    tmp_path: Path, api: FakeKubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    """A server whose service account may not patch the ConfigMap logs the API's refusal
    and keeps trying; once RBAC is fixed the ConfigMap is written."""
    api.forbidden.update({"patch configmaps", "create configmaps"})
    caplog.set_level(logging.WARNING, logger="server.bundle_publisher.runner")
    with _server(tmp_path, api):
        failure = _wait_for_record(caplog, "bundle publishing failed; retrying")
        assert "kubernetes API refused patch configmaps credo/credo-bundle (403)" in (
            failure.error  # type: ignore[attr-defined]
        )
        api.forbidden.clear()
        api.wait_for_config_map(NAMESPACE, NAME, lambda d: "bundle.pem" in d)


def _wait_for_record(caplog: pytest.LogCaptureFixture, message: str) -> logging.LogRecord:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.getMessage() == message:
                return record
        time.sleep(0.05)
    raise AssertionError(f"no log record {message!r}")


# --- the config table -----------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "server.toml"
    path.write_text("[server]\n" + text)
    return load_config(path, {})


def test_publisher_table_parses(tmp_path: Path) -> None:
    """[server.bundle_publisher.k8s_configmap] parses with key bundle.pem and the in-cluster
    config by default; without any table no publisher is configured."""
    config = _load(
        tmp_path,
        '[server.bundle_publisher.k8s_configmap]\nnamespace = "credo"\nname = "credo-bundle"\n',
    )
    assert dict(config.bundle_publisher) == {
        "k8s_configmap": K8sConfigMapConfig(namespace="credo", name="credo-bundle")
    }
    assert config.bundle_publisher["k8s_configmap"].key == "bundle.pem"
    assert config.bundle_publisher["k8s_configmap"].kube_config_file is None
    assert dict(_load(tmp_path, "").bundle_publisher) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[server.bundle_publisher.k8s_configmap]\nnamespace = "credo"\nname = "b"\nkey_ = 1\n',
            "server.bundle_publisher.k8s_configmap.key_: unknown setting; expected one of: key, "
            "kube_config_file, name, namespace",
        ),
        (
            '[server.bundle_publisher.k8s_configmap]\nnamespace = "Credo"\nname = "b"\n',
            "server.bundle_publisher.k8s_configmap.namespace: expected a Kubernetes namespace",
        ),
        (
            '[server.bundle_publisher.k8s_configmap]\nnamespace = "credo"\n',
            "server.bundle_publisher.k8s_configmap.name: expected a ConfigMap name",
        ),
        (
            '[server.bundle_publisher.k8s_configmap]\nnamespace = "credo"\nname = "b"\n'
            'key = "a/b"\n',
            "server.bundle_publisher.k8s_configmap.key: expected a ConfigMap key",
        ),
        (
            "[server.bundle_publisher.configmap]\n",
            "server.bundle_publisher.configmap: unknown plugin 'configmap'; known plugins: "
            "k8s_configmap",
        ),
        (
            "[server.bundle_publisher]\n",
            "server.bundle_publisher: no bundle publisher configured",
        ),
    ],
    ids=["unknown-key", "bad-namespace", "no-name", "bad-key", "unknown-plugin", "empty-section"],
)
def test_bad_publisher_tables_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    """A bad [server.bundle_publisher.*] table is refused with its full TOML key."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert str(info.value).startswith(message), str(info.value)
