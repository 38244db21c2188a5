"""Shared by the benchmarks: real Credo processes on temp dirs, clients, statistics, output.

A benchmark builds everything inside one :class:`Workspace`::

    with Workspace() as ws:
        server = ws.start_server()                  # credo-server run, waits until it serves
        admin = server.admin_channel()              # insecure gRPC over the admin Unix socket
        agent = ws.start_agent(server)              # credo-agent run, joined with a fresh token
        ...
    # every process stopped (SIGTERM, then SIGKILL) and the temp dir removed, even on error

Processes only listen on 127.0.0.1 and Unix sockets under the workspace. They are started
with ``PR_SET_PDEATHSIG`` so they die with the benchmark even if it is killed outright, and
SIGTERM/SIGINT of the benchmark unwind through the ``with`` block.

:func:`report` prints the house format: a readable table, or with ``--json`` one JSON
object ``{"name": NAME, "metrics": {...}}`` on the last line.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from credo._proto.credo.server.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    types_pb2,
)
from credo._reserved import SERVER_TLS_NAME
from credo.keys import PrivateKey, generate_private_key, private_key_to_pkcs8_pem

__all__ = [
    "TRUST_DOMAIN",
    "AgentProcess",
    "AttestedAgent",
    "ManagedProcess",
    "ServerProcess",
    "Workspace",
    "attest",
    "create_entries",
    "delete_entries",
    "make_csr",
    "percentile",
    "report",
    "rss_mb",
    "wait_until",
]

TRUST_DOMAIN = "example.org"
BIN = Path(sys.executable).parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
PEM = serialization.Encoding.PEM
_JSON = ("--output", "json")
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


# --- statistics and output ------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def report(
    name: str,
    metrics: dict[str, float],
    targets: Iterable[tuple[str, str, float]],
    *,
    as_json: bool,
    notes: Iterable[str] = (),
) -> None:
    """Print ``metrics`` as a table (with a verdict per target) or as one JSON line.

    ``targets`` are ``(metric, op, bound)`` with ``op`` one of ``>=``, ``<=``, ``<``.
    """
    if as_json:
        print(json.dumps({"name": name, "metrics": metrics}), flush=True)
        return
    print(f"{'metric':<24} {'value':>14}")
    for key, value in metrics.items():
        print(f"{key:<24} {value:>14}")
    for key, op, bound in targets:
        value = metrics[key]
        ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
        print(f"target {key} {op} {bound}: {'met' if ok else 'NOT met'}")
    for note in notes:
        print(note)


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the table or the JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until true; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB."""
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)


# --- processes ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the benchmark process dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _health(socket_path: Path, timeout: float = 1.0) -> int | None:
    """The gRPC health status on a Unix socket, or None if nobody answers."""
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def _serving(socket_path: Path) -> bool:
    return socket_path.exists() and _health(socket_path) == health_pb2.HealthCheckResponse.SERVING


def _tcp_accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


class ManagedProcess:
    """A child process with its log file; stopped with SIGTERM, then SIGKILL."""

    kind = "process"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, command: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as out:
            out.write(f"--- start: {' '.join(command)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.kind} exited with {self.proc.returncode}; log tail:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class ServerProcess(ManagedProcess):
    """``credo-server run`` on ``data_dir`` with its admin socket; agent port on 127.0.0.1."""

    kind = "credo-server"

    def __init__(self, root: Path, name: str = "server", **flags: Any) -> None:
        super().__init__(root / f"{name}.log")
        self.data_dir = root / name
        self.admin_socket = root / f"{name}-admin" / "api.sock"
        self.flags = {
            "trust_domain": TRUST_DOMAIN,
            "data_dir": self.data_dir,
            "bind_address": "127.0.0.1:0",
            "admin_socket": self.admin_socket,
            "log_level": "warning",
            "attestation_rate_limit": 1000,
            **flags,
        }
        self.address = ""

    @property
    def datastore_path(self) -> Path:
        return self.data_dir / "datastore.sqlite3"

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Start and wait until it serves; return the seconds from spawn to serving.

        Serving means: gRPC health SERVING on the admin socket, ``server.addr`` written,
        and the agent port accepting TCP connections.
        """
        (self.data_dir / "server.addr").unlink(missing_ok=True)
        command = [str(BIN / "credo-server"), "run"]
        for key, value in self.flags.items():
            command += ["--" + key.replace("_", "-"), str(value)]
        started = time.perf_counter()
        self._spawn(command)
        addr_file = self.data_dir / "server.addr"

        def ready() -> bool:
            self.check_alive()
            if not (addr_file.exists() and _serving(self.admin_socket)):
                return False
            self.address = addr_file.read_text().strip()
            return _tcp_accepts(self.address)

        wait_until(ready, timeout, "credo-server to serve", interval=0.02)
        return time.perf_counter() - started

    def admin_channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix:{self.admin_socket}", options=_GRPC_OPTIONS)

    def cli(self, *args: str) -> Any:
        """``credo-server ARGS --socket S --output json``; the parsed JSON output."""
        result = subprocess.run(
            [str(BIN / "credo-server"), *args, "--socket", str(self.admin_socket), *_JSON],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"credo-server {' '.join(args)} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    @property
    def _socket(self) -> list[str]:
        return ["--socket", str(self.admin_socket)]

    def join_token(self) -> str:
        return str(self.cli("token", "generate")["token"])

    def bundle_pem(self) -> bytes:
        result = subprocess.run(
            [str(BIN / "credo-server"), "bundle", "show", "--format", "pem", *self._socket],
            capture_output=True,
            timeout=60,
            check=True,
        )
        return result.stdout


class AgentProcess(ManagedProcess):
    """``credo-agent run`` joined to a server with a fresh join token."""

    kind = "credo-agent"

    def __init__(self, root: Path, server: ServerProcess, name: str = "agent", **flags: Any):
        super().__init__(root / f"{name}.log")
        self.root = root
        self.server = server
        self.data_dir = root / name
        self.socket = root / f"{name}-ws" / "api.sock"
        self.admin_socket = root / f"{name}-admin" / "admin.sock"
        self.extra_flags = flags
        self.agent_id = ""

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Join with a fresh token, wait until the Workload API socket serves; seconds taken."""
        bundle = self.root / f"{self.data_dir.name}-bundle.pem"
        bundle.write_bytes(self.server.bundle_pem())
        flags: dict[str, Any] = {
            "server_address": self.server.address,
            "trust_domain": TRUST_DOMAIN,
            "trust_bundle": bundle,
            "join_token": self.server.join_token(),
            "data_dir": self.data_dir,
            "socket": self.socket,
            "admin_socket": self.admin_socket,
            "log_level": "info",
            **self.extra_flags,
        }
        command = [str(BIN / "credo-agent"), "run"]
        for key, value in flags.items():
            command += ["--" + key.replace("_", "-"), str(value)]
        started = time.perf_counter()
        self._spawn(command)

        def ready() -> bool:
            self.check_alive()
            return self.socket.exists() and _serving(self.admin_socket)

        wait_until(ready, timeout, "credo-agent to serve", interval=0.05)
        for line in self.logs().splitlines():
            if 'msg="agent running"' in line or 'msg="node attested"' in line:
                for field in line.split():
                    if field.startswith("spiffe_id="):
                        self.agent_id = field.split("=", 1)[1].strip('"')
        if not self.agent_id:
            raise RuntimeError(f"agent SPIFFE ID not found in its log:\n{self.log_tail()}")
        return time.perf_counter() - started

    @property
    def workload_target(self) -> str:
        return f"unix:{self.socket}"


class Workspace:
    """A temp dir (short path: Unix sockets) owning every process started in it."""

    def __init__(self, prefix: str = "credo-bench-") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self._processes: list[ManagedProcess] = []
        self._old_handlers: dict[int, Any] = {}

    def start_server(self, name: str = "server", **flags: Any) -> ServerProcess:
        server = ServerProcess(self.root, name, **flags)
        self._processes.append(server)
        server.start()
        return server

    def start_agent(self, server: ServerProcess, name: str = "agent", **flags: Any) -> AgentProcess:
        agent = AgentProcess(self.root, server, name, **flags)
        self._processes.append(agent)
        agent.start()
        return agent

    def adopt(self, process: ManagedProcess) -> None:
        """Stop ``process`` on exit too (for processes built and started by the caller)."""
        if process not in self._processes:
            self._processes.append(process)

    @staticmethod
    def _raise_exit(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def __enter__(self) -> Workspace:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._raise_exit)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            # agents first, so they do not spin reconnecting to a stopped server
            for process in reversed(self._processes):
                with contextlib.suppress(Exception):
                    process.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)


# --- admin API ------------------------------------------------------------------------


def entry_proto(spiffe_id: str, parent_id: str, selectors: Iterable[str]) -> Any:
    """A ``types_pb2.RegistrationEntry`` from ``type:value`` selector strings."""
    return types_pb2.RegistrationEntry(
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=[
            types_pb2.Selector(type=s.split(":", 1)[0], value=s.split(":", 1)[1]) for s in selectors
        ],
    )


def create_entries(channel: grpc.Channel, entries: Sequence[Any], batch: int = 500) -> list[str]:
    """Create ``entries`` through ``Entries.BatchCreateEntry`` in batches; their new ids."""
    stub = admin_pb2_grpc.EntriesStub(channel)
    ids: list[str] = []
    for start in range(0, len(entries), batch):
        response = stub.BatchCreateEntry(
            admin_pb2.BatchCreateEntryRequest(entries=entries[start : start + batch]), timeout=120
        )
        ids.extend(e.id for e in response.entries)
    return ids


def delete_entries(channel: grpc.Channel, ids: Sequence[str], batch: int = 500) -> None:
    stub = admin_pb2_grpc.EntriesStub(channel)
    for start in range(0, len(ids), batch):
        stub.BatchDeleteEntry(
            admin_pb2.BatchDeleteEntryRequest(ids=ids[start : start + batch]), timeout=120
        )


# --- an agent's side of the agent endpoint ----------------------------------------------


def make_csr(key: PrivateKey | None = None) -> bytes:
    """A DER PKCS#10 CSR signed by ``key`` (a new P-256 key if None)."""
    key = key or generate_private_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _roots_pem(bundle: Any) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(a.asn1).public_bytes(PEM) for a in bundle.x509_authorities
    )


# The server SVID carries DNS SAN "localhost"; we connect to 127.0.0.1 and check that name.
_TLS_OPTIONS = [("grpc.ssl_target_name_override", SERVER_TLS_NAME), *_GRPC_OPTIONS]


@dataclass
class AttestedAgent:
    """An agent identity after node attestation: key, SVID chain (DER, leaf first), bundle."""

    agent_id: str
    key: PrivateKey
    chain: list[bytes]
    bundle: Any
    address: str

    def channel(self) -> grpc.Channel:
        """A blocking mTLS channel to the agent endpoint, presenting this agent's SVID."""
        chain_pem = b"".join(
            x509.load_der_x509_certificate(c).public_bytes(PEM) for c in self.chain
        )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_roots_pem(self.bundle),
            private_key=private_key_to_pkcs8_pem(self.key),
            certificate_chain=chain_pem,
        )
        return grpc.secure_channel(self.address, credentials, options=_TLS_OPTIONS)


def attest(server: ServerProcess) -> AttestedAgent:
    """Node-attest with a fresh join token over TLS (no client certificate)."""
    token = server.join_token()
    with server.admin_channel() as admin:
        bundle = admin_pb2_grpc.BundlesStub(admin).GetBundle(
            admin_pb2.GetBundleAdminRequest(), timeout=10
        )
    key = generate_private_key()
    credentials = grpc.ssl_channel_credentials(root_certificates=_roots_pem(bundle))
    with grpc.secure_channel(server.address, credentials, options=_TLS_OPTIONS) as channel:
        response = agent_pb2_grpc.AgentStub(channel).AttestAgent(
            agent_pb2.AttestAgentRequest(
                attestation_data=agent_pb2.AttestationData(
                    type="join_token", payload=token.encode()
                ),
                csr=make_csr(key),
            ),
            timeout=30,
        )
    return AttestedAgent(
        agent_id=response.svid.spiffe_id,
        key=key,
        chain=list(response.svid.cert_chain),
        bundle=response.bundle,
        address=server.address,
    )
