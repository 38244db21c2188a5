"""A small, typed client to the Kubernetes API, on top of the official ``kubernetes`` package.

:meth:`KubeClient.from_kube_config` builds it from a kubeconfig file, or with no file from
the pod's in-cluster configuration (the service account token, which the ``kubernetes``
package re-reads as the kubelet rotates it, and the cluster CA). The ``kubernetes`` package
does the HTTP: authentication, TLS, request building. Answers are read as JSON into the
few fields Credo needs (:class:`TokenReview`, :class:`Pod`, :class:`Node`, ConfigMap data),
so a field a newer API adds never breaks a call.

The client is blocking; callers run it in a worker thread. Every call is bounded: a
connect timeout, a read timeout (both at most the ``timeout`` the caller has left), no
retries (the caller's own retry loop decides), and an answer of at most
:data:`MAX_RESPONSE` bytes. Failures leave as :class:`~server.kube.errors.KubeApiUnreachable`
(no answer, 5xx, 429) or :class:`~server.kube.errors.KubeApiRefused` (any other error
status, with the API's own message).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from credo.errors import ConfigError
from server.kube.errors import KubeApiRefused, KubeApiUnreachable

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = [
    "CONNECT_TIMEOUT",
    "MAX_RESPONSE",
    "READ_TIMEOUT",
    "KubeClient",
    "Node",
    "Pod",
    "TokenReview",
]

CONNECT_TIMEOUT: Final = 3.0
"""Seconds to connect to the API server (at most)."""
READ_TIMEOUT: Final = 5.0
"""Seconds to wait for an answer once connected (at most)."""
MAX_RESPONSE: Final = 8 * 1024 * 1024
"""The largest answer read (bytes); a pod or a node is a few kilobytes."""


@dataclass(frozen=True)
class TokenReview:
    """What ``TokenReview.status`` (authentication.k8s.io/v1) says about a token."""

    authenticated: bool
    username: str = ""
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class Pod:
    """The fields of a core/v1 Pod that node attestation uses."""

    namespace: str
    name: str
    uid: str
    node_name: str
    host_ip: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Node:
    """The fields of a core/v1 Node that node attestation uses."""

    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _labels(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _status_message(body: Any) -> str:
    """The ``message`` of a meta/v1 Status answer, else the body's first line."""
    if not body:
        return ""
    try:
        status = json.loads(body)
    except ValueError:
        return str(body).strip().splitlines()[0][:200] if str(body).strip() else ""
    return _str(_object(status).get("message"))


def _reason(exc: BaseException) -> str:
    """A one-line reason from a urllib3 or OS error, without object reprs."""
    inner = getattr(exc, "reason", None)
    text = str(inner if isinstance(inner, BaseException) else exc)
    if ">: " in text:  # "<urllib3.connection.HTTPSConnection object at 0x..>: Failed to ..."
        text = text.split(">: ", 1)[1]
    return " ".join(text.split())


class KubeClient:
    """Typed calls to one Kubernetes API server (see the module docstring)."""

    def __init__(
        self,
        api: ApiClient,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        from kubernetes.client import AuthenticationV1Api, CoreV1Api

        self._api = api
        self._core = CoreV1Api(api)
        self._authn = AuthenticationV1Api(api)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout

    @classmethod
    def from_kube_config(cls, path: Path | None, where: str) -> KubeClient:
        """A client for the kubeconfig at ``path``, or the in-cluster configuration if None.

        Raises :class:`~credo.errors.ConfigError` naming ``where`` (the setting's TOML key)
        when the configuration cannot be loaded. Makes no network call.
        """
        import yaml  # type: ignore[import-untyped]
        from kubernetes import client, config
        from kubernetes.config import ConfigException

        if path is not None and not path.is_file():
            raise ConfigError(f"{where}: kubeconfig {path} does not exist or is not a file")
        configuration = client.Configuration()
        try:
            if path is None:
                config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration
                )
            else:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=str(path),
                    client_configuration=configuration,
                    persist_config=False,
                )
        except (ConfigException, OSError, ValueError, TypeError, yaml.YAMLError) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            if path is None:
                raise ConfigError(
                    f"{where}: empty means the in-cluster configuration, which is not "
                    f"available here ({detail}); set it to a kubeconfig file"
                ) from None
            raise ConfigError(f"{where}: cannot load kubeconfig {path}: {detail}") from None
        # No retries inside the client: a refused connection fails at once and the caller
        # (an agent re-attesting, the publisher's backoff) decides when to try again.
        configuration.retries = 0
        return cls(client.ApiClient(configuration))

    @property
    def host(self) -> str:
        """The API server's URL."""
        return str(self._api.configuration.host)

    def close(self) -> None:
        """Release the client's connections."""
        self._api.close()  # type: ignore[no-untyped-call]

    # --- calls ------------------------------------------------------------------------

    def _call(self, action: str, call: Callable[..., Any], timeout: float | None) -> Any:
        """``call(...)`` with bounded timeouts; its answer as JSON; errors as KubeApiError."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        budget = self._read_timeout if timeout is None else min(timeout, self._read_timeout)
        if budget <= 0:
            raise KubeApiUnreachable(action, "no time left to ask")
        request_timeout = (max(0.05, min(self._connect_timeout, budget)), max(0.05, budget))
        try:
            response = call(_preload_content=False, _request_timeout=request_timeout)
            try:
                body = response.read(MAX_RESPONSE + 1)
            finally:
                response.release_conn()
        except ApiException as exc:
            status = int(exc.status or 0)
            detail = _status_message(exc.body) or str(exc.reason or "no message")
            if status == 0 or status >= 500 or status == 429:
                raise KubeApiUnreachable(action, f"{status} {detail}") from None
            raise KubeApiRefused(action, status, detail) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeApiUnreachable(action, _reason(exc)) from None
        if len(body) > MAX_RESPONSE:
            raise KubeApiUnreachable(action, f"answer larger than {MAX_RESPONSE} bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise KubeApiUnreachable(action, "answer is not JSON") from None

    def review_token(
        self, token: str, audiences: Sequence[str], *, timeout: float | None = None
    ) -> TokenReview:
        """Create a TokenReview (authentication.k8s.io/v1) of ``token`` for ``audiences``."""
        from kubernetes.client import V1TokenReview, V1TokenReviewSpec

        body = V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=V1TokenReviewSpec(token=token, audiences=list(audiences)),
        )
        answer = self._call(
            "create tokenreviews",
            lambda **kw: self._authn.create_token_review(body, **kw),
            timeout,
        )
        status = _object(_object(answer).get("status"))
        user = _object(status.get("user"))
        extra = {str(k): _strings(v) for k, v in _object(user.get("extra")).items()}
        return TokenReview(
            authenticated=status.get("authenticated") is True,
            username=_str(user.get("username")),
            extra=extra,
            audiences=_strings(status.get("audiences")),
            error=_str(status.get("error")),
        )

    def read_pod(self, namespace: str, name: str, *, timeout: float | None = None) -> Pod:
        """The pod ``namespace/name``; KubeApiRefused with ``not_found`` if there is none."""
        answer = _object(
            self._call(
                f"get pods {namespace}/{name}",
                lambda **kw: self._core.read_namespaced_pod(name, namespace, **kw),
                timeout,
            )
        )
        metadata = _object(answer.get("metadata"))
        return Pod(
            namespace=_str(metadata.get("namespace")) or namespace,
            name=_str(metadata.get("name")) or name,
            uid=_str(metadata.get("uid")),
            node_name=_str(_object(answer.get("spec")).get("nodeName")),
            host_ip=_str(_object(answer.get("status")).get("hostIP")),
            labels=_labels(metadata.get("labels")),
        )

    def read_node(self, name: str, *, timeout: float | None = None) -> Node:
        """The node ``name``; KubeApiRefused with ``not_found`` if there is none."""
        answer = _object(
            self._call(f"get nodes {name}", lambda **kw: self._core.read_node(name, **kw), timeout)
        )
        metadata = _object(answer.get("metadata"))
        return Node(
            name=_str(metadata.get("name")) or name,
            uid=_str(metadata.get("uid")),
            labels=_labels(metadata.get("labels")),
        )

    def read_config_map_data(
        self, namespace: str, name: str, *, timeout: float | None = None
    ) -> dict[str, str]:
        """The ``data`` of ConfigMap ``namespace/name``; KubeApiRefused (404) if missing."""
        answer = _object(
            self._call(
                f"get configmaps {namespace}/{name}",
                lambda **kw: self._core.read_namespaced_config_map(name, namespace, **kw),
                timeout,
            )
        )
        return _labels(answer.get("data"))

    def create_config_map(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        *,
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Create ConfigMap ``namespace/name`` with ``data``; KubeApiRefused (409) if it exists."""
        from kubernetes.client import V1ConfigMap, V1ObjectMeta

        body = V1ConfigMap(
            api_version="v1",
            kind="ConfigMap",
            metadata=V1ObjectMeta(name=name, namespace=namespace, labels=dict(labels or {})),
            data=dict(data),
        )
        self._call(
            f"create configmaps {namespace}/{name}",
            lambda **kw: self._core.create_namespaced_config_map(namespace, body, **kw),
            timeout,
        )

    def patch_config_map_data(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        *,
        timeout: float | None = None,
    ) -> None:
        """Set the keys ``data`` in ConfigMap ``namespace/name`` (a strategic merge patch;
        other keys stay); KubeApiRefused (404) if it does not exist."""
        body = {"data": dict(data)}
        self._call(
            f"patch configmaps {namespace}/{name}",
            lambda **kw: self._core.patch_namespaced_config_map(name, namespace, body, **kw),
            timeout,
        )
