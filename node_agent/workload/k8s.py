"""The ``k8s`` workload attestor: a process's pod and container, from the kubelet.

As SPIRE's ``k8s`` plugin. The pod UID and container ID come from ``/proc/<pid>/cgroup``
(:mod:`node_agent.workload.cgroups`; cgroup v1 and v2, systemd and cgroupfs drivers,
containerd, CRI-O and Docker naming). A process in no pod gets no ``k8s`` selectors (not
an error: the ``unix`` attestor still speaks for it). Cgroups naming two pods or two
containers are refused.

The pod comes from the kubelet's secure port: ``GET https://<node_name>:<kubelet_secure_port>/pods``
with the bearer token at ``token_path`` (the pod's service account token, read at each
request: the kubelet rotates it; the kubelet authorizes it as ``get nodes/proxy``),
verifying the kubelet's certificate against ``kubelet_ca_path`` and the node name, unless
``skip_kubelet_verification = true`` is set explicitly (logged as a warning). The node name
is ``node_name``, or the environment variable named by ``node_name_env`` (``MY_NODE_NAME``,
which the chart sets from the downward API).

The pod list is cached for ``poll_retry_interval`` seconds. A process whose pod or
container is not on the list yet (the kubelet reports a new pod a moment after it starts)
is looked up again on a fresh list, every ``poll_retry_interval`` seconds, up to
``max_poll_attempts`` times; then the call is refused
(:class:`~node_agent.workload.errors.AttestationRefused`) saying so. SPIRE's defaults: 60
attempts, 0.5 s apart.

Selectors, spelled as SPIRE spells them::

    k8s:ns:<namespace>            k8s:sa:<service account>      k8s:node-name:<node>
    k8s:pod-uid:<uid>             k8s:pod-name:<name>           k8s:container-name:<name>
    k8s:pod-image-count:<n>       k8s:pod-init-image-count:<n>
    k8s:container-image:<image>   (the container's image and image ID)
    k8s:pod-image:<image>         (every container's image and image ID)
    k8s:pod-init-image:<image>    (every init container's image and image ID)
    k8s:pod-label:<key>:<value>   k8s:pod-owner:<Kind>:<name>   k8s:pod-owner-uid:<Kind>:<uid>
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from credo.errors import ConfigError
from credo.selector import Selector
from node_agent.workload.cgroups import PodContainer, find_pod_container, read_cgroups
from node_agent.workload.errors import AttestationFailed, AttestationRefused, CgroupError

__all__ = [
    "DEFAULT_KUBELET_CA_PATH",
    "DEFAULT_TOKEN_PATH",
    "K8sAttestor",
    "K8sAttestorConfig",
    "KubeletPod",
    "parse_pod_list",
    "selectors_for",
]

log = logging.getLogger(__name__)

DEFAULT_TOKEN_PATH: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_KUBELET_CA_PATH: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
KUBELET_TIMEOUT: Final = 5.0
"""Seconds for each socket operation of a pod list request."""
MAX_POD_LIST: Final = 64 * 1024 * 1024
"""The largest pod list read (bytes); 110 pods, the kubelet's default maximum, fit easily."""
MIRROR_ANNOTATION: Final = "kubernetes.io/config.mirror"


@dataclass(frozen=True)
class K8sAttestorConfig:
    """``[agent.workload_attestor.k8s]``: how to reach the kubelet (see the module docstring)."""

    kubelet_secure_port: int = 10250
    node_name: str = ""
    node_name_env: str = "MY_NODE_NAME"
    token_path: Path = DEFAULT_TOKEN_PATH
    kubelet_ca_path: Path = DEFAULT_KUBELET_CA_PATH
    skip_kubelet_verification: bool = False
    max_poll_attempts: int = 60
    poll_retry_interval: float = 0.5
    proc_root: str = "/proc"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not 0 < self.kubelet_secure_port < 65536:
            raise ConfigError(
                f"kubelet_secure_port: expected a port from 1 to 65535, got "
                f"{self.kubelet_secure_port}"
            )
        if not self.node_name and not self.node_name_env:
            raise ConfigError(
                "node_name_env: is empty and node_name is not set; set one of them so the "
                "agent knows which kubelet to ask"
            )
        if self.max_poll_attempts < 1:
            raise ConfigError(
                f"max_poll_attempts: must be at least 1, got {self.max_poll_attempts}"
            )
        if not 0 < self.poll_retry_interval <= 60:
            raise ConfigError(
                "poll_retry_interval: expected seconds between 0 and 60, got "
                f"{self.poll_retry_interval}"
            )
        if not os.path.isabs(self.proc_root):
            raise ConfigError(f"proc_root: must be an absolute path, got {self.proc_root!r}")


# --- the kubelet's pod list ----------------------------------------------------------------


@dataclass(frozen=True)
class KubeletContainer:
    """A container status of a listed pod."""

    id: str
    """The runtime's container ID (``containerID`` without its ``<runtime>://`` prefix)."""
    name: str
    image: str
    image_id: str


@dataclass(frozen=True)
class KubeletPod:
    """The fields of a core/v1 Pod on the kubelet's list that attestation uses."""

    uid: str
    mirror_of: str
    """A mirror pod's ``kubernetes.io/config.mirror`` annotation: the static pod's hash."""
    namespace: str
    name: str
    service_account: str
    node_name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    owners: tuple[tuple[str, str, str], ...] = ()
    """``(kind, name, uid)`` of each owner reference."""
    containers: tuple[KubeletContainer, ...] = ()
    init_containers: tuple[KubeletContainer, ...] = ()
    ephemeral_containers: tuple[KubeletContainer, ...] = ()

    def container(self, container_id: str) -> KubeletContainer | None:
        """The container (of any kind) with the runtime ID ``container_id``."""
        for status in (*self.containers, *self.init_containers, *self.ephemeral_containers):
            if status.id == container_id:
                return status
        return None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _statuses(value: Any) -> tuple[KubeletContainer, ...]:
    out = []
    for status in _list(value):
        _runtime, _, container_id = _str(status.get("containerID")).rpartition("://")
        out.append(
            KubeletContainer(
                id=container_id,
                name=_str(status.get("name")),
                image=_str(status.get("image")),
                image_id=_str(status.get("imageID")),
            )
        )
    return tuple(out)


def parse_pod_list(data: bytes) -> list[KubeletPod]:
    """The pods of a core/v1 PodList (the kubelet's ``/pods``); ValueError if not one."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise ValueError("not a PodList (no items)")
    pods = []
    for item in _list(doc["items"]):
        metadata, spec, status = (
            _obj(item.get("metadata")),
            _obj(item.get("spec")),
            _obj(item.get("status")),
        )
        labels = _obj(metadata.get("labels"))
        pods.append(
            KubeletPod(
                uid=_str(metadata.get("uid")),
                mirror_of=_str(_obj(metadata.get("annotations")).get(MIRROR_ANNOTATION)),
                namespace=_str(metadata.get("namespace")),
                name=_str(metadata.get("name")),
                service_account=_str(spec.get("serviceAccountName")),
                node_name=_str(spec.get("nodeName")),
                labels={str(k): v for k, v in labels.items() if isinstance(v, str)},
                owners=tuple(
                    (_str(o.get("kind")), _str(o.get("name")), _str(o.get("uid")))
                    for o in _list(metadata.get("ownerReferences"))
                ),
                containers=_statuses(status.get("containerStatuses")),
                init_containers=_statuses(status.get("initContainerStatuses")),
                ephemeral_containers=_statuses(status.get("ephemeralContainerStatuses")),
            )
        )
    return pods


def _images(statuses: tuple[KubeletContainer, ...]) -> list[str]:
    """Each status's image ID and image, without repeats, in order."""
    seen: dict[str, None] = {}
    for status in statuses:
        for image in (status.image_id, status.image):
            if image:
                seen.setdefault(image, None)
    return list(seen)


def selectors_for(pod: KubeletPod, container: KubeletContainer) -> list[Selector]:
    """The ``k8s`` selectors of ``container`` in ``pod``, in SPIRE's order and spelling."""
    facts = [
        ("sa", pod.service_account),
        ("ns", pod.namespace),
        ("node-name", pod.node_name),
        ("pod-uid", pod.uid),
        ("pod-name", pod.name),
        ("container-name", container.name),
        ("pod-image-count", str(len(pod.containers))),
        ("pod-init-image-count", str(len(pod.init_containers))),
    ]
    facts += [("container-image", image) for image in _images((container,))]
    facts += [("pod-image", image) for image in _images(pod.containers)]
    facts += [("pod-init-image", image) for image in _images(pod.init_containers)]
    facts += [("pod-label", f"{k}:{v}") for k, v in sorted(pod.labels.items())]
    for kind, name, uid in pod.owners:
        facts += [("pod-owner", f"{kind}:{name}"), ("pod-owner-uid", f"{kind}:{uid}")]
    # A fact the kubelet left empty (a pod not yet bound to a node, say) says nothing.
    values = dict.fromkeys(f"{key}:{value}" for key, value in facts if value)
    return [Selector("k8s", value) for value in values]


def _find(pods: list[KubeletPod], place: PodContainer) -> tuple[KubeletPod, KubeletContainer] | str:
    """The pod and container ``place`` names, or why they are not on the list."""
    for pod in pods:
        if place.pod_uid not in (pod.uid, pod.mirror_of):
            continue
        assert place.container_id is not None
        container = pod.container(place.container_id)
        if container is None:
            return f"pod {pod.namespace}/{pod.name} lists no container {place.container_id}"
        return pod, container
    return f"no pod with UID {place.pod_uid} on the list"


class K8sAttestor:
    """Attests processes in pods from their cgroups and the kubelet (see the module docstring)."""

    def __init__(self, config: K8sAttestorConfig | None = None) -> None:
        self.config = config = config or K8sAttestorConfig()
        node_name = config.node_name or os.environ.get(config.node_name_env, "")
        if not node_name:
            raise ConfigError(
                "agent.workload_attestor.k8s: no node name: set node_name, or the environment "
                f"variable {config.node_name_env} (node_name_env), e.g. from the downward API "
                "(spec.nodeName)"
            )
        self.node_name = node_name
        self.url = f"https://{node_name}:{config.kubelet_secure_port}/pods"
        if config.skip_kubelet_verification:
            log.warning(
                "kubelet certificate verification is OFF (skip_kubelet_verification = true): "
                "anyone who can answer for the node name can tell the agent which pods run here",
                extra={"kubelet": self.url},
            )
        self._lock = asyncio.Lock()
        self._pods: list[KubeletPod] | None = None
        self._fetched_at = 0.0
        self.fetch_count = 0  # pod lists actually fetched (not served from cache); for tests

    async def attest(self, pid: int) -> list[Selector]:
        """``k8s`` selectors for ``pid``; [] outside any pod; refused when ambiguous or unknown."""
        try:
            place = await asyncio.to_thread(self._place, pid)
        except CgroupError as err:
            raise AttestationRefused(err.reason, pid=pid) from None
        if place is None or place.container_id is None:
            return []
        reason = ""
        attempts = self.config.max_poll_attempts
        for attempt in range(1, attempts + 1):
            found = _find(await self._pod_list(), place)
            if not isinstance(found, str):
                return selectors_for(*found)
            reason = found
            if attempt < attempts:
                log.debug(
                    "workload's pod not listed by the kubelet yet; asking again",
                    extra={"pid": pid, "pod_uid": place.pod_uid, "attempt": attempt},
                )
                await asyncio.sleep(self.config.poll_retry_interval)
        raise AttestationRefused(
            f"the kubelet of node {self.node_name} does not list the caller's container "
            f"{place.container_id} of pod {place.pod_uid} after {attempts} attempts "
            f"({reason})",
            pid=pid,
        )

    def _place(self, pid: int) -> PodContainer | None:
        try:
            cgroups = read_cgroups(pid, self.config.proc_root)
        except FileNotFoundError:
            raise AttestationFailed("process not found", pid=pid) from None
        except OSError as err:
            raise AttestationFailed(
                f"cannot read its cgroups: {err.strerror or err}", pid=pid
            ) from None
        return find_pod_container(cgroups)

    async def _pod_list(self) -> list[KubeletPod]:
        """The kubelet's pod list, at most ``poll_retry_interval`` old; one fetch at a time."""
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if self._pods is None or age >= self.config.poll_retry_interval:
                self._pods = await asyncio.to_thread(self._fetch)
                self._fetched_at = time.monotonic()
                self.fetch_count += 1
            return self._pods

    def _ssl_context(self) -> ssl.SSLContext:
        if self.config.skip_kubelet_verification:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            return ssl.create_default_context(cafile=str(self.config.kubelet_ca_path))
        except (OSError, ssl.SSLError) as err:
            raise AttestationFailed(
                f"cannot load the kubelet CA {self.config.kubelet_ca_path}: "
                f"{getattr(err, 'strerror', None) or err}; set kubelet_ca_path (or, knowingly, "
                "skip_kubelet_verification)"
            ) from None

    def _token(self) -> str:
        try:
            token = self.config.token_path.read_text().strip()
        except OSError as err:
            raise AttestationFailed(
                f"cannot read the kubelet token {self.config.token_path}: {err.strerror}"
            ) from None
        if not token:
            raise AttestationFailed(f"the kubelet token {self.config.token_path} is empty")
        return token

    def _fetch(self) -> list[KubeletPod]:
        """GET /pods from the kubelet (blocking)."""
        headers = {"Authorization": f"Bearer {self._token()}", "Accept": "application/json"}
        connection = http.client.HTTPSConnection(
            self.node_name,
            self.config.kubelet_secure_port,
            timeout=KUBELET_TIMEOUT,
            context=self._ssl_context(),
        )
        try:
            connection.request("GET", "/pods", headers=headers)
            response = connection.getresponse()
            body = response.read(MAX_POD_LIST + 1)
        except (OSError, http.client.HTTPException) as err:
            raise AttestationFailed(
                f"cannot list pods from the kubelet at {self.url}: {err}"
            ) from None
        finally:
            connection.close()
        if response.status != 200:
            hint = (
                "; the agent's service account needs get on nodes/proxy"
                if response.status in (401, 403)
                else ""
            )
            raise AttestationFailed(
                f"the kubelet at {self.url} answered {response.status} {response.reason}{hint}"
            )
        if len(body) > MAX_POD_LIST:
            raise AttestationFailed(f"the kubelet's pod list is larger than {MAX_POD_LIST} bytes")
        try:
            return parse_pod_list(body)
        except ValueError as err:
            raise AttestationFailed(f"the kubelet at {self.url} sent no pod list: {err}") from None
