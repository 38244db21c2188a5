"""The server's client to a Kubernetes API server (:mod:`server.kube.client`).

Used by the ``k8s_psat`` node attestor (TokenReview, pods, nodes) and the ``k8s_configmap``
bundle publisher (ConfigMaps). Built from a kubeconfig file, or the pod's in-cluster
configuration; every call has a bounded timeout, and failures leave it as the two errors of
:mod:`server.kube.errors`. The ``kubernetes`` package is imported only when a client is
built, so the CLI, which reads the plugin catalogs, does not pay for it.
"""

from __future__ import annotations

from server.kube.errors import KubeApiError, KubeApiRefused, KubeApiUnreachable

__all__ = ["KubeApiError", "KubeApiRefused", "KubeApiUnreachable"]
