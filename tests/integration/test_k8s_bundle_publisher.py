"""The bundle ConfigMap end to end: a real `credo-server run` with
[server.bundle_publisher.k8s_configmap], a local HTTPS server that answers like the
Kubernetes API (tests/helpers/kube.py), the CA rotated with `credo-server localauthority`,
and agents bootstrapping from what the ConfigMap holds, as the chart's agents do."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from credo.bundle import load_certificates
from tests.helpers.kube import FakeKubeApi
from tests.helpers.processes import (
    ServerProcess,
    short_temp_dir,
    start_agent,
    start_server,
)

pytestmark = pytest.mark.slow

NAMESPACE = "credo"
NAME = "credo-bundle"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeKubeApi]:
    with FakeKubeApi(tmp_path / "kube") as running:
        yield running


@pytest.fixture
def server(tmp_path: Path, api: FakeKubeApi) -> Iterator[ServerProcess]:
    config = tmp_path / "server.toml"
    config.write_text(
        "[server]\nrotation_check_interval = 0.5\n"
        "[server.bundle_publisher.k8s_configmap]\n"
        f'namespace = "{NAMESPACE}"\nname = "{NAME}"\nkube_config_file = "{api.kubeconfig}"\n'
    )
    with start_server(tmp_path, config=config) as running:
        yield running


def _served_bundle(server: ServerProcess) -> list[x509.Certificate]:
    """`credo-server bundle show --format pem`, parsed."""
    result = server.cli("bundle", "show", "--format", "pem", output=None)
    assert result.returncode == 0, result.stderr
    return load_certificates(result.stdout.encode())


def _configmap_follows(
    api: FakeKubeApi, server: ServerProcess, count: int
) -> list[x509.Certificate]:
    """Wait until the ConfigMap holds ``count`` CAs; they must be the bundle the server serves."""
    data = api.wait_for_config_map(
        NAMESPACE, NAME, lambda d: len(load_certificates(d.get("bundle.pem", "").encode())) == count
    )
    certs = load_certificates(data["bundle.pem"].encode())
    assert certs == _served_bundle(server)
    return certs


def test_configmap_follows_a_ca_rotation_and_agents_bootstrap_from_it(
    server: ServerProcess, api: FakeKubeApi, tmp_path: Path
) -> None:
    """The ConfigMap holds the bundle from the start, gains the prepared CA, keeps both once
    it is active, and drops the old one when it is revoked; an agent whose trust bundle is
    the ConfigMap's bundle.pem joins the server before and after, without
    --insecure-bootstrap."""
    (first,) = _configmap_follows(api, server, 1)
    _join_with_configmap_bundle(server, api, tmp_path / "before")

    new = server.cli_json("localauthority", "x509", "prepare")["authority_id"]
    both = _configmap_follows(api, server, 2)
    assert first in both

    server.cli_json("localauthority", "x509", "activate", "--authority-id", new)
    old = server.cli_json("localauthority", "x509", "show")["old"]["authority_id"]
    assert _configmap_follows(api, server, 2) == both

    server.cli_json("localauthority", "x509", "taint", "--authority-id", old)
    server.cli_json("localauthority", "x509", "revoke", "--authority-id", old)
    (only,) = _configmap_follows(api, server, 1)
    assert only != first and only in both
    _join_with_configmap_bundle(server, api, tmp_path / "revoked")


def _join_with_configmap_bundle(server: ServerProcess, api: FakeKubeApi, where: Path) -> None:
    """Start an agent trusting exactly the ConfigMap's bundle.pem (as the chart mounts it)."""
    where.mkdir()
    bundle = where / "bundle.pem"
    bundle.write_text(api.config_map_data(NAMESPACE, NAME)["bundle.pem"])  # type: ignore[index]
    root = short_temp_dir()
    try:
        with start_agent(server, root, bundle=bundle) as agent:
            assert agent.healthy()
            assert "INSECURE BOOTSTRAP" not in agent.logs
    finally:
        shutil.rmtree(root, ignore_errors=True)
