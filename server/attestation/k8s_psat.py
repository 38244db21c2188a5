"""The ``k8s_psat`` node attestor: a projected service account token, checked by Kubernetes.

As SPIRE's ``k8s_psat``. The agent sends ``{"cluster": <name>, "token": <token>}`` (JSON),
the token being the projected service account token of its pod, with the server's
audience. For the cluster's ``[server.node_attestor.k8s_psat.clusters.<name>]`` table the
server then asks that cluster's API:

1. a ``TokenReview`` (authentication.k8s.io/v1) for the configured ``audience``: the token
   must be authenticated, ``status.audiences`` must hold one of the configured audiences
   (an API that is not audience-aware leaves it empty), the user must be
   ``system:serviceaccount:<namespace>:<name>`` with ``<namespace>:<name>`` on
   ``service_account_allow_list``, and the token must be bound to a pod
   (``authentication.kubernetes.io/pod-name`` and ``pod-uid`` in ``status.user.extra``);
2. that pod, whose UID must still be the one the token is bound to;
3. the pod's node.

The agent is ``spiffe://<td>/credo/agent/k8s_psat/<cluster>/<node uid>`` and may attest
again with a fresh token (``can_reattest``: after losing its SVID, or when its pod is
replaced on the same node). Node selectors, spelled as SPIRE spells them::

    k8s_psat:cluster:<name>              k8s_psat:agent_ns:<namespace>
    k8s_psat:agent_sa:<service account>  k8s_psat:agent_pod_name:<pod>
    k8s_psat:agent_pod_uid:<uid>         k8s_psat:agent_node_ip:<pod's host IP>
    k8s_psat:agent_node_name:<node>      k8s_psat:agent_node_uid:<uid>
    k8s_psat:agent_node_label:<key>:<value>   (keys in allowed_node_label_keys only)
    k8s_psat:agent_pod_label:<key>:<value>    (keys in allowed_pod_label_keys only)

Every refusal is one line for the agent's operator (wrong audience, service account not
allowed, pod UID mismatch, TokenReview refused, ...) raised as
:class:`~server.attestation.errors.AttestationError`; an API that does not answer is
:class:`~server.attestation.errors.AttestationUnavailable`, so the agent tries again. The
calls are blocking (the server runs ``attest`` in a worker thread) and share one time
budget, :data:`ATTESTATION_BUDGET`, shorter than an agent's call timeout.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from credo._config import named_tables_field
from credo._reserved import agent_spiffe_id
from credo.errors import ConfigError, InvalidSpiffeId
from credo.selector import Selector
from credo.spiffe_id import TrustDomain
from server.attestation.errors import AttestationError, AttestationUnavailable
from server.attestation.protocol import AttestationResult
from server.kube.client import KubeClient, Node, Pod
from server.kube.errors import KubeApiRefused, KubeApiUnreachable

if TYPE_CHECKING:  # the datastore package is heavy to import; the CLI loads this catalog
    from server.attestation.catalog import PluginContext

__all__ = [
    "ATTESTATION_BUDGET",
    "DEFAULT_AUDIENCE",
    "K8S_PSAT",
    "K8sPsatAttestor",
    "K8sPsatCluster",
    "K8sPsatConfig",
    "check_cluster_name",
]

log = logging.getLogger(__name__)

K8S_PSAT: Final = "k8s_psat"
DEFAULT_AUDIENCE: Final = ("credo-server",)
ATTESTATION_BUDGET: Final = 7.0
"""Seconds all Kubernetes API calls of one attestation may take together (an agent waits
10 seconds for its AttestAgent call)."""
MAX_PAYLOAD: Final = 64 * 1024

_SERVICE_ACCOUNT_USER: Final = "system:serviceaccount:"
_POD_NAME: Final = "authentication.kubernetes.io/pod-name"
_POD_UID: Final = "authentication.kubernetes.io/pod-uid"


def check_cluster_name(name: str) -> str | None:
    """Why ``name`` cannot name a cluster in agent IDs (None if it can)."""
    if not name:
        return "is empty"
    try:
        agent_spiffe_id("example.org", K8S_PSAT, name, "node")
    except InvalidSpiffeId:
        return (
            f"{name!r} cannot be part of a SPIFFE ID: use letters, digits, '.', '-' and '_' "
            "(it becomes spiffe://<td>/credo/agent/k8s_psat/<cluster>/<node uid>)"
        )
    return None


def _service_account(entry: str) -> str | None:
    """Why ``entry`` is not ``<namespace>:<name>`` (None if it is)."""
    namespace, sep, name = entry.partition(":")
    if not sep or not namespace or not name or ":" in name:
        return f"expected <namespace>:<service account>, got {entry!r}"
    return None


@dataclass(frozen=True)
class K8sPsatCluster:
    """``[server.node_attestor.k8s_psat.clusters.<name>]``: one cluster whose agents may attest.

    ``kube_config_file`` empty (the default) uses the in-cluster configuration: the
    server's own pod service account, which needs ``create tokenreviews`` and ``get`` on
    pods and nodes.
    """

    service_account_allow_list: tuple[str, ...] = ()
    audience: tuple[str, ...] = DEFAULT_AUDIENCE
    kube_config_file: Path | None = None
    allowed_node_label_keys: tuple[str, ...] = ()
    allowed_pod_label_keys: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not self.service_account_allow_list:
            raise ConfigError(
                "service_account_allow_list: name at least one service account that may "
                'attest, as "<namespace>:<name>" (e.g. ["credo:credo-agent"])'
            )
        for entry in self.service_account_allow_list:
            if (reason := _service_account(entry)) is not None:
                raise ConfigError(f"service_account_allow_list: {reason}")
        if not self.audience or not all(self.audience):
            raise ConfigError(
                "audience: name at least one non-empty audience the agents' tokens carry "
                f"(default {list(DEFAULT_AUDIENCE)})"
            )
        for name in ("allowed_node_label_keys", "allowed_pod_label_keys"):
            if not all(getattr(self, name)):
                raise ConfigError(f"{name}: label keys must not be empty")


@dataclass(frozen=True)
class K8sPsatConfig:
    """``[server.node_attestor.k8s_psat]``: one ``clusters.<name>`` table per cluster."""

    clusters: Mapping[str, K8sPsatCluster] = named_tables_field(K8sPsatCluster)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not self.clusters:
            raise ConfigError(
                "clusters: configure at least one cluster, as a table "
                "[server.node_attestor.k8s_psat.clusters.<name>]"
            )
        for name in self.clusters:
            if (reason := check_cluster_name(name)) is not None:
                raise ConfigError(f"clusters.{name}: the cluster name {reason}")


@dataclass(frozen=True)
class _Cluster:
    """A configured cluster and the client to its API."""

    name: str
    config: K8sPsatCluster
    client: KubeClient


@dataclass(frozen=True)
class _Payload:
    cluster: str
    token: str


def _parse_payload(payload: bytes) -> _Payload:
    if len(payload) > MAX_PAYLOAD:
        raise AttestationError(f"k8s_psat attestation data is larger than {MAX_PAYLOAD} bytes")
    try:
        data = json.loads(payload)
    except ValueError:
        raise AttestationError(
            'k8s_psat attestation data is not JSON {"cluster": ..., "token": ...}'
        ) from None
    if not isinstance(data, dict):
        raise AttestationError('k8s_psat attestation data must be {"cluster": ..., "token": ...}')
    cluster, token = data.get("cluster"), data.get("token")
    if not isinstance(cluster, str) or not cluster:
        raise AttestationError("k8s_psat attestation data names no cluster")
    if not isinstance(token, str) or not token.strip():
        raise AttestationError("k8s_psat attestation data carries no service account token")
    return _Payload(cluster, token.strip())


def _token_audiences(token: str) -> tuple[str, ...] | None:
    """The ``aud`` claim of a JWT, read WITHOUT verification: only to word a refusal the
    API already made. None if the token is not a readable JWT."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return tuple(aud)
    return None


class _Deadline:
    """The time left of one attestation's budget."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return self._end - time.monotonic()


class K8sPsatAttestor:
    """Attests agents by their projected service account token (see the module docstring)."""

    type: Final = K8S_PSAT

    def __init__(
        self,
        trust_domain: TrustDomain,
        clusters: Mapping[str, tuple[K8sPsatCluster, KubeClient]],
        *,
        budget: float = ATTESTATION_BUDGET,
    ) -> None:
        self._td = trust_domain
        self._clusters = {
            name: _Cluster(name, config, client) for name, (config, client) in clusters.items()
        }
        self._budget = budget

    @classmethod
    def from_config(cls, config: K8sPsatConfig, context: PluginContext) -> K8sPsatAttestor:
        """The attestor for ``[server.node_attestor.k8s_psat]``: one API client per cluster.

        Raises :class:`ConfigError` when a cluster's kubeconfig (or the in-cluster
        configuration) cannot be loaded; no API call is made here.
        """
        clients = {}
        for name, cluster in config.clusters.items():
            where = f"server.node_attestor.{K8S_PSAT}.clusters.{name}.kube_config_file"
            clients[name] = (cluster, KubeClient.from_kube_config(cluster.kube_config_file, where))
        return cls(context.trust_domain, clients)

    def attest(self, payload: bytes) -> AttestationResult:
        data = _parse_payload(payload)
        cluster = self._clusters.get(data.cluster)
        if cluster is None:
            raise AttestationError(
                f"cluster {data.cluster!r} is not configured for k8s_psat on this server "
                f"(configured: {', '.join(sorted(self._clusters))})"
            )
        deadline = _Deadline(self._budget)
        try:
            return self._attest(cluster, data.token, deadline)
        except KubeApiUnreachable as err:
            raise AttestationUnavailable(f"cluster {cluster.name!r}: {err}") from None
        except KubeApiRefused as err:
            raise AttestationError(f"cluster {cluster.name!r}: {err}") from None

    def _attest(self, cluster: _Cluster, token: str, deadline: _Deadline) -> AttestationResult:
        config, client = cluster.config, cluster.client
        review = client.review_token(token, config.audience, timeout=deadline.left())
        accepted = set(config.audience)
        if not review.authenticated:
            audiences = _token_audiences(token)
            if audiences is not None and not accepted & set(audiences):
                raise AttestationError(
                    f"token audience {list(audiences)} is not one of the accepted audiences "
                    f"{list(config.audience)} of cluster {cluster.name!r}"
                )
            detail = f": {review.error}" if review.error else ""
            raise AttestationError(f"token not authenticated by the TokenReview API{detail}")
        if not accepted & set(review.audiences):
            raise AttestationError(
                f"the TokenReview confirmed none of the accepted audiences "
                f"{list(config.audience)} (status.audiences: {list(review.audiences)}); the "
                "API server must be audience-aware"
            )
        namespace, account = self._service_account(review.username)
        full = f"{namespace}:{account}"
        if full not in config.service_account_allow_list:
            raise AttestationError(
                f"service account {full} is not allowed to attest in cluster {cluster.name!r} "
                f"(service_account_allow_list: {', '.join(config.service_account_allow_list)})"
            )
        pod_name = next(iter(review.extra.get(_POD_NAME, ())), "")
        pod_uid = next(iter(review.extra.get(_POD_UID, ())), "")
        if not pod_name or not pod_uid:
            raise AttestationError(
                "token is not bound to a pod (no pod name and UID in the TokenReview); "
                "mount a projected service account token"
            )
        try:
            pod = client.read_pod(namespace, pod_name, timeout=deadline.left())
        except KubeApiRefused as err:
            if err.not_found:
                raise AttestationError(
                    f"pod {namespace}/{pod_name} the token is bound to does not exist"
                ) from None
            raise
        if pod.uid != pod_uid:
            raise AttestationError(
                f"pod UID mismatch: the token is bound to pod {namespace}/{pod_name} with UID "
                f"{pod_uid}, but that pod's UID is now {pod.uid or 'empty'}"
            )
        if not pod.node_name:
            raise AttestationError(f"pod {namespace}/{pod_name} is not scheduled on a node")
        try:
            node = client.read_node(pod.node_name, timeout=deadline.left())
        except KubeApiRefused as err:
            if err.not_found:
                raise AttestationError(
                    f"node {pod.node_name} of pod {namespace}/{pod_name} does not exist"
                ) from None
            raise
        if not node.uid:
            raise AttestationError(f"node {pod.node_name} has no UID")
        try:
            agent_id = agent_spiffe_id(self._td, K8S_PSAT, cluster.name, node.uid)
        except InvalidSpiffeId:
            raise AttestationError(
                f"node {pod.node_name} has a UID that cannot be part of a SPIFFE ID"
            ) from None
        selectors = _selectors(cluster, namespace, account, pod_name, pod_uid, pod, node)
        log.debug(
            "k8s_psat attestation verified",
            extra={"cluster": cluster.name, "pod": f"{namespace}/{pod_name}", "node": node.name},
        )
        return AttestationResult(agent_id=agent_id, selectors=selectors, can_reattest=True)

    @staticmethod
    def _service_account(username: str) -> tuple[str, str]:
        """``(namespace, name)`` of ``system:serviceaccount:<namespace>:<name>``."""
        rest = username.removeprefix(_SERVICE_ACCOUNT_USER)
        namespace, _, account = rest.partition(":")
        if rest == username or not namespace or not account:
            raise AttestationError(
                f"token does not belong to a service account (user {username or 'empty'!r})"
            )
        return namespace, account


def _selectors(
    cluster: _Cluster,
    namespace: str,
    account: str,
    pod_name: str,
    pod_uid: str,
    pod: Pod,
    node: Node,
) -> list[Selector]:
    values = [
        f"cluster:{cluster.name}",
        f"agent_ns:{namespace}",
        f"agent_sa:{account}",
        f"agent_pod_name:{pod_name}",
        f"agent_pod_uid:{pod_uid}",
    ]
    if pod.host_ip:
        values.append(f"agent_node_ip:{pod.host_ip}")
    values += [f"agent_node_name:{pod.node_name}", f"agent_node_uid:{node.uid}"]
    allowed = cluster.config
    values += [
        f"agent_node_label:{k}:{v}"
        for k, v in sorted(node.labels.items())
        if k in allowed.allowed_node_label_keys
    ]
    values += [
        f"agent_pod_label:{k}:{v}"
        for k, v in sorted(pod.labels.items())
        if k in allowed.allowed_pod_label_keys
    ]
    return [Selector(K8S_PSAT, value) for value in values]
