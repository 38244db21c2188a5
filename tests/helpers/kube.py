"""Local HTTPS servers that answer like Kubernetes: an API server and a kubelet, for tests.

There is no cluster here, so tests talk to these instead, through the real clients (the
``kubernetes`` package with a kubeconfig on the server side, the agent's kubelet client
on the other). They speak real HTTPS (a test CA; :class:`TestCa`) and answer with the JSON
shapes of authentication.k8s.io/v1 and core/v1, including meta/v1 ``Status`` errors::

    with FakeKubeApi(tmp_path) as api:
        node = api.add_node("node-a")
        pod = api.add_pod("credo", "credo-agent-x1", node="node-a", service_account="credo-agent")
        token = api.issue_token(pod, audiences=["credo-server"])   # a projected SA token (JWT)
        api.kubeconfig                                             # file for kube_config_file
        api.stop(); api.start()                                    # the API down, then back

    with FakeKubelet(tmp_path, ca) as kubelet:                     # GET /pods with a bearer token
        kubelet.pods = [pod_json(...)]

What :class:`FakeKubeApi` does as the real API does: a TokenReview verifies the token's
signature and expiry, intersects its audiences with ``spec.audiences`` (none in common:
not authenticated, with the API's error text), and checks that the pod it is bound to
still exists with that UID; the user is ``system:serviceaccount:<ns>:<sa>`` with the pod's
name and UID in ``extra``. Callers must present the bearer token of the kubeconfig
(401 otherwise); ``forbidden`` makes a verb answer 403 as missing RBAC does. Switches for
what a real API does only in races or when misconfigured: ``review_checks_binding``
(off: the pod was replaced between the review and the read) and ``audience_aware`` (off:
``status.audiences`` stays empty).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "FakeKubeApi",
    "FakeKubelet",
    "TestCa",
    "container_status",
    "node_json",
    "pod_json",
]

PEM = serialization.Encoding.PEM
ISSUER = "https://kubernetes.default.svc.cluster.local"


# --- TLS --------------------------------------------------------------------------------


class TestCa:
    """A CA and the serving certificates it signs, written as PEM files under ``directory``."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "fake-kubernetes-ca") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.path = directory / f"{name}.crt"
        self.path.write_bytes(self.cert.public_bytes(PEM))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(PEM)

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server TLS context with a certificate for ``names`` (DNS names or IPs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        stem = self.directory / f"serving-{uuid.uuid4().hex[:8]}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(PEM))
        key_path.write_bytes(
            key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        return context


class _HttpsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: Any, context: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self.ssl_context = context
        self.connections: set[Any] = set()
        self._guard = threading.Lock()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens in the request's own thread, not in the accept loop.
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self._guard:
            self.connections.add(tls)
        try:
            super().finish_request(tls, client_address)
        finally:
            with self._guard:
                self.connections.discard(tls)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection dropped by stop(); nothing to report

    def drop_connections(self) -> None:
        """Close every open (keep-alive) connection, as a server that went away does."""
        with self._guard:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Base:
    """An HTTPS server in a thread that can be stopped and started again on the same port."""

    def __init__(self, context: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        self._context = context
        self._host = host
        self.port = 0
        self._server: _HttpsServer | None = None
        self._thread: threading.Thread | None = None
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self._requested = threading.Condition(self.lock)

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> None:
        """Block until at least ``count`` requests have been answered."""
        with self._requested:
            if not self._requested.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"fewer than {count} requests after {timeout}s")

    def _handle(self, handler: _Handler) -> tuple[int, Any]:
        raise NotImplementedError

    def start(self) -> Any:
        owner = self

        class Handler(_Handler):
            served_by = owner

        self._server = _HttpsServer((self._host, self.port), Handler, self._context)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        """Stop answering: new connections are refused (the API is down)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.drop_connections()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served_by: _Base

    def log_message(self, format: str, *args: Any) -> None:
        pass

    payload: Any = None

    def body(self) -> Any:
        """The request's JSON body (read before answering, so keep-alive stays in step)."""
        return self.payload

    def bearer(self) -> str:
        value = self.headers.get("Authorization") or ""
        return value.removeprefix("Bearer ").strip() if value.startswith("Bearer ") else ""

    def _answer(self) -> None:
        owner = self.served_by
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.payload = json.loads(raw) if raw else None
        status, doc = owner._handle(self)
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        with owner._requested:
            owner.requests.append((self.command, self.path))
            owner._requested.notify_all()

    do_GET = do_POST = do_PATCH = do_PUT = _answer


def _status(code: int, reason: str, message: str, **details: Any) -> tuple[int, Any]:
    """A meta/v1 Status error answer."""
    doc = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        doc["details"] = details
    return code, doc


# --- object shapes ------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def container_status(
    name: str,
    image: str,
    container_id: str,
    *,
    runtime: str = "containerd",
    image_id: str | None = None,
) -> dict[str, Any]:
    """A core/v1 ContainerStatus of a running container."""
    digest = image_id or f"{image.split(':')[0]}@sha256:{uuid.uuid4().hex}{uuid.uuid4().hex}"
    return {
        "name": name,
        "state": {"running": {"startedAt": _now()}},
        "lastState": {},
        "ready": True,
        "restartCount": 0,
        "image": image,
        "imageID": digest,
        "containerID": f"{runtime}://{container_id}",
        "started": True,
    }


def pod_json(
    namespace: str,
    name: str,
    *,
    uid: str | None = None,
    node: str = "node-a",
    service_account: str = "default",
    host_ip: str = "10.0.0.11",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    owners: Sequence[tuple[str, str, str]] = (),
    containers: Sequence[dict[str, Any]] = (),
    init_containers: Sequence[dict[str, Any]] = (),
    qos_class: str = "Burstable",
) -> dict[str, Any]:
    """A core/v1 Pod as the API server and the kubelet show it (running, scheduled)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or str(uuid.uuid4()),
            "resourceVersion": "1",
            "creationTimestamp": _now(),
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": kind,
                    "name": owner,
                    "uid": owner_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
                for kind, owner, owner_uid in owners
            ],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "serviceAccount": service_account,
            "containers": [{"name": c["name"], "image": c["image"]} for c in containers],
            "initContainers": [{"name": c["name"], "image": c["image"]} for c in init_containers],
        },
        "status": {
            "phase": "Running",
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "podIP": "10.244.0.17",
            "startTime": _now(),
            "qosClass": qos_class,
            "containerStatuses": list(containers),
            "initContainerStatuses": list(init_containers),
        },
    }


def node_json(name: str, *, uid: str | None = None, labels: Mapping[str, str] | None = None) -> Any:
    """A core/v1 Node."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": uid or str(uuid.uuid4()),
            "resourceVersion": "1",
            "creationTimestamp": _now(),
            "labels": {"kubernetes.io/hostname": name, **(labels or {})},
        },
        "spec": {},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "10.0.0.11"}],
            "nodeInfo": {
                "kubeletVersion": "v1.33.1",
                "containerRuntimeVersion": "containerd://2.0.5",
            },
        },
    }


# --- the API server -------------------------------------------------------------------------

_POD = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/?]+)")
_NODE = re.compile(r"/api/v1/nodes/([^/?]+)")
_CONFIG_MAPS = re.compile(r"/api/v1/namespaces/([^/]+)/configmaps")
_CONFIG_MAP = re.compile(r"/api/v1/namespaces/([^/]+)/configmaps/([^/?]+)")
_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


class FakeKubeApi(_Base):
    """Answers TokenReview, Pod, Node and ConfigMap calls like a Kubernetes API server."""

    def __init__(
        self, directory: Path, *, caller: str = "system:serviceaccount:credo:credo-server"
    ):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = TestCa(directory, "fake-apiserver-ca")
        super().__init__(self.ca.server_context("127.0.0.1", "localhost"))
        self.caller = caller
        self.caller_token = f"caller-{uuid.uuid4().hex}"
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.config_maps: dict[tuple[str, str], dict[str, Any]] = {}
        self.forbidden: set[str] = set()
        self.review_checks_binding = True
        self.audience_aware = True
        self.api_audiences = ["https://kubernetes.default.svc.cluster.local"]
        self.changed = threading.Condition(self.lock)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig (written on each call) for this server: its URL, CA and caller token."""
        import base64

        import yaml

        path = self.directory / "kubeconfig.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "fake",
                            "cluster": {
                                "server": self.url,
                                "certificate-authority-data": base64.b64encode(
                                    self.ca.pem
                                ).decode(),
                            },
                        }
                    ],
                    "users": [{"name": "credo-server", "user": {"token": self.caller_token}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "credo-server"}}
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path

    # --- objects ----------------------------------------------------------------------

    def add_node(self, name: str, *, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        node: dict[str, Any] = node_json(name, labels=labels)
        with self.lock:
            self.nodes[name] = node
        return node

    def add_pod(self, namespace: str, name: str, **fields: Any) -> dict[str, Any]:
        pod = pod_json(namespace, name, **fields)
        with self.lock:
            self.pods[(namespace, name)] = pod
        return pod

    def issue_token(
        self,
        pod: Mapping[str, Any],
        *,
        audiences: Iterable[str] = ("credo-server",),
        expires_in: int = 3600,
    ) -> str:
        """A projected service account token bound to ``pod`` (as the kubelet mounts it)."""
        meta, spec = pod["metadata"], pod["spec"]
        now = int(time.time())
        node = self.nodes.get(spec["nodeName"])
        claims = {
            "aud": list(audiences),
            "exp": now + expires_in,
            "iat": now,
            "nbf": now,
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "sub": f"system:serviceaccount:{meta['namespace']}:{spec['serviceAccountName']}",
            "kubernetes.io": {
                "namespace": meta["namespace"],
                "pod": {"name": meta["name"], "uid": meta["uid"]},
                "serviceaccount": {"name": spec["serviceAccountName"], "uid": str(uuid.uuid4())},
                "node": {
                    "name": spec["nodeName"],
                    "uid": node["metadata"]["uid"] if node else str(uuid.uuid4()),
                },
            },
        }
        return jwt.encode(claims, self._signing_key, algorithm="RS256", headers={"kid": "fake"})

    def config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        with self.lock:
            found = self.config_maps.get((namespace, name))
            return None if found is None else dict(found.get("data") or {})

    def wait_for_config_map(
        self,
        namespace: str,
        name: str,
        predicate: Callable[[dict[str, str]], bool],
        timeout: float = 30.0,
    ) -> dict[str, str]:
        """Block until ConfigMap ``namespace/name`` exists and ``predicate(data)`` holds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                data = self.config_map_data(namespace, name)
                if data is not None and predicate(data):
                    return data
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"configmap {namespace}/{name} never matched; last data: {data}"
                    )
                self.changed.wait(left)

    # --- answers ------------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> tuple[int, Any]:
        path = handler.path.split("?", 1)[0]
        if handler.bearer() != self.caller_token:
            return _status(401, "Unauthorized", "Unauthorized")
        with self.lock:
            if handler.command == "POST" and path == _REVIEWS:
                return self._guard("create", "tokenreviews", "authentication.k8s.io") or (
                    201,
                    self._review(handler.body()),
                )
            if handler.command == "GET" and (m := _POD.fullmatch(path)):
                return self._guard("get", "pods", "", m[1]) or self._get(
                    self.pods.get((m[1], m[2])), "pods", m[2]
                )
            if handler.command == "GET" and (m := _NODE.fullmatch(path)):
                return self._guard("get", "nodes", "") or self._get(
                    self.nodes.get(m[1]), "nodes", m[1]
                )
            if handler.command == "POST" and (m := _CONFIG_MAPS.fullmatch(path)):
                return self._guard("create", "configmaps", "", m[1]) or self._create_cm(
                    m[1], handler.body()
                )
            if (m := _CONFIG_MAP.fullmatch(path)) and handler.command in ("GET", "PATCH", "PUT"):
                verb = {"GET": "get", "PATCH": "patch", "PUT": "update"}[handler.command]
                denied = self._guard(verb, "configmaps", "", m[1])
                if denied:
                    return denied
                found = self.config_maps.get((m[1], m[2]))
                if handler.command == "GET" or found is None:
                    return self._get(found, "configmaps", m[2])
                return self._write_cm(found, handler.body(), replace=handler.command == "PUT")
        return _status(404, "NotFound", "the server could not find the requested resource")

    def _guard(self, verb: str, resource: str, group: str, namespace: str = "") -> Any:
        if f"{verb} {resource}" not in self.forbidden:
            return None
        full = f"{resource}.{group}" if group else resource
        where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        return _status(
            403,
            "Forbidden",
            f'{full} is forbidden: User "{self.caller}" cannot {verb} resource "{resource}" in '
            f'API group "{group}" {where}',
        )

    @staticmethod
    def _get(found: Any, resource: str, name: str) -> tuple[int, Any]:
        if found is None:
            return _status(
                404, "NotFound", f'{resource} "{name}" not found', name=name, kind=resource
            )
        return 200, found

    def _review(self, review: Any) -> Any:
        spec = review.get("spec") or {}
        audiences = spec.get("audiences") or self.api_audiences
        status = self._review_status(spec.get("token") or "", audiences)
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    def _review_status(self, token: str, audiences: list[str]) -> dict[str, Any]:
        def refused(error: str) -> dict[str, Any]:
            return {"user": {}, "error": f"[invalid bearer token, {error}]"}

        try:
            claims = jwt.decode(
                token,
                self._signing_key.public_key(),
                algorithms=["RS256"],
                options={"verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            return refused("service account token has expired")
        except jwt.PyJWTError:
            return refused("square/go-jose: error in cryptographic primitive")
        token_audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        common = [a for a in audiences if a in token_audiences]
        if not common:
            return refused(
                f"token audiences {json.dumps(token_audiences)} is invalid for the target "
                f"audiences {json.dumps(audiences)}"
            )
        info = claims["kubernetes.io"]
        namespace, pod_ref = info["namespace"], info["pod"]
        if self.review_checks_binding:
            pod = self.pods.get((namespace, pod_ref["name"]))
            if pod is None:
                return refused(f'pods "{pod_ref["name"]}" not found')
            if pod["metadata"]["uid"] != pod_ref["uid"]:
                return refused(
                    f"pod UID ({pod['metadata']['uid']}) does not match claim ({pod_ref['uid']})"
                )
        account = info["serviceaccount"]
        status: dict[str, Any] = {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{namespace}:{account['name']}",
                "uid": account["uid"],
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{namespace}",
                    "system:authenticated",
                ],
                "extra": {
                    "authentication.kubernetes.io/credential-id": [f"JTI={claims['jti']}"],
                    "authentication.kubernetes.io/node-name": [info["node"]["name"]],
                    "authentication.kubernetes.io/node-uid": [info["node"]["uid"]],
                    "authentication.kubernetes.io/pod-name": [pod_ref["name"]],
                    "authentication.kubernetes.io/pod-uid": [pod_ref["uid"]],
                },
            },
        }
        if self.audience_aware:
            status["audiences"] = common
        return status

    def _create_cm(self, namespace: str, body: Any) -> tuple[int, Any]:
        name = body["metadata"]["name"]
        if (namespace, name) in self.config_maps:
            return _status(
                409,
                "AlreadyExists",
                f'configmaps "{name}" already exists',
                name=name,
                kind="configmaps",
            )
        body["metadata"].update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            resourceVersion="1",
            creationTimestamp=_now(),
        )
        self.config_maps[(namespace, name)] = body
        self.changed.notify_all()
        return 201, body

    def _write_cm(self, found: dict[str, Any], body: Any, *, replace: bool) -> tuple[int, Any]:
        if replace:
            found["data"] = dict(body.get("data") or {})
        else:  # strategic merge / merge patch of data
            data = dict(found.get("data") or {})
            for key, value in (body.get("data") or {}).items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
            found["data"] = data
        found["metadata"]["resourceVersion"] = str(int(found["metadata"]["resourceVersion"]) + 1)
        self.changed.notify_all()
        return 200, found


# --- a kubelet ------------------------------------------------------------------------------


class FakeKubelet(_Base):
    """Answers ``GET /pods`` with :attr:`pods` (a PodList) to callers with :attr:`token`."""

    def __init__(self, ca: TestCa, *, names: Sequence[str] = ("localhost", "127.0.0.1")) -> None:
        super().__init__(ca.server_context(*names))
        self.token = f"kubelet-caller-{uuid.uuid4().hex}"
        self.pods: list[dict[str, Any]] = []

    def _handle(self, handler: _Handler) -> tuple[int, Any]:
        if handler.bearer() != self.token:
            return _status(401, "Unauthorized", "Unauthorized")
        if handler.command != "GET" or handler.path.split("?", 1)[0] != "/pods":
            return _status(404, "NotFound", "404 page not found")
        with self.lock:
            items = list(self.pods)
        return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}

    @property
    def pod_list_requests(self) -> int:
        with self.lock:
            return sum(1 for method, path in self.requests if (method, path) == ("GET", "/pods"))
