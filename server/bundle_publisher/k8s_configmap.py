"""The ``k8s_configmap`` bundle publisher: the trust bundle (PEM) in a Kubernetes ConfigMap.

``[server.bundle_publisher.k8s_configmap]`` keeps the X.509 authorities of the trust
bundle, as PEM, under ``key`` (default ``bundle.pem``) of ConfigMap ``namespace/name``.
Agents on the cluster mount it as their bootstrap bundle (the chart does), so none needs
``--insecure-bootstrap``; workloads may mount it too. The ConfigMap is patched (a strategic
merge of that one key; other keys and labels stay), or created when it does not exist.
The server's service account needs ``get``, ``patch`` and ``create`` on it (the chart's
Role grants them). ``kube_config_file`` empty means the in-cluster configuration.

Failures (the API unreachable, RBAC missing) are
:class:`~server.bundle_publisher.errors.PublishFailed`; the publishing loop logs them and
tries again with backoff, and the server keeps running.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from credo.errors import ConfigError
from server.bundle_publisher.errors import PublishFailed
from server.kube.client import KubeClient
from server.kube.errors import KubeApiError, KubeApiRefused

if TYPE_CHECKING:
    from credo.bundle import Bundle
    from server.bundle_publisher.catalog import PublisherContext

__all__ = ["DEFAULT_KEY", "K8S_CONFIGMAP", "K8sConfigMapConfig", "K8sConfigMapPublisher"]

log = logging.getLogger(__name__)

K8S_CONFIGMAP: Final = "k8s_configmap"
DEFAULT_KEY: Final = "bundle.pem"
WRITE_TIMEOUT: Final = 10.0
"""Seconds one publication (patch, and create if needed) may take."""

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_CONFIG_MAP_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")


@dataclass(frozen=True)
class K8sConfigMapConfig:
    """``[server.bundle_publisher.k8s_configmap]``: which ConfigMap holds the bundle."""

    namespace: str = ""
    name: str = ""
    key: str = DEFAULT_KEY
    kube_config_file: Path | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not _DNS_LABEL.fullmatch(self.namespace):
            raise ConfigError(
                f"namespace: expected a Kubernetes namespace (a DNS label), got {self.namespace!r}"
            )
        if not _DNS_SUBDOMAIN.fullmatch(self.name):
            raise ConfigError(
                f"name: expected a ConfigMap name (a DNS subdomain), got {self.name!r}"
            )
        if not _CONFIG_MAP_KEY.fullmatch(self.key) or self.key in (".", ".."):
            raise ConfigError(
                f"key: expected a ConfigMap key (letters, digits, '-', '_', '.'), got {self.key!r}"
            )


class K8sConfigMapPublisher:
    """Writes the bundle's X.509 authorities (PEM) into one ConfigMap key."""

    name: Final = K8S_CONFIGMAP

    def __init__(self, config: K8sConfigMapConfig, client: KubeClient) -> None:
        self._config = config
        self._client = client
        self._written: str | None = None

    @classmethod
    def from_config(
        cls, config: K8sConfigMapConfig, context: PublisherContext
    ) -> K8sConfigMapPublisher:
        """The publisher for the table; :class:`ConfigError` if the kubeconfig will not load."""
        where = f"server.bundle_publisher.{K8S_CONFIGMAP}.kube_config_file"
        return cls(config, KubeClient.from_kube_config(config.kube_config_file, where))

    @property
    def destination(self) -> str:
        c = self._config
        return f"configmap {c.namespace}/{c.name} key {c.key}"

    def publish(self, bundle: Bundle) -> bool:
        """Patch (or create) the ConfigMap when the PEM differs from what was last written."""
        if not bundle.x509_authorities:
            raise PublishFailed(self.destination, "the bundle has no X.509 authorities yet")
        pem = bundle.marshal_pem().decode("ascii")
        if pem == self._written:
            return False
        c = self._config
        data = {c.key: pem}
        try:
            try:
                self._client.patch_config_map_data(c.namespace, c.name, data, timeout=WRITE_TIMEOUT)
            except KubeApiRefused as err:
                if not err.not_found:
                    raise
                self._create(data)
        except KubeApiError as err:
            raise PublishFailed(self.destination, str(err)) from None
        self._written = pem
        return True

    def _create(self, data: dict[str, str]) -> None:
        c = self._config
        try:
            self._client.create_config_map(
                c.namespace,
                c.name,
                data,
                labels={"app.kubernetes.io/managed-by": "credo-server"},
                timeout=WRITE_TIMEOUT,
            )
        except KubeApiRefused as err:
            if not err.conflict:
                raise
            # Another server created it in between: patch that one.
            self._client.patch_config_map_data(c.namespace, c.name, data, timeout=WRITE_TIMEOUT)
        log.info("created bundle configmap", extra={"destination": self.destination})
