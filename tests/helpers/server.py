"""An in-process signing server for tests, and an agent's side of talking to it.

``InProcessServer`` runs ``server.app.serve`` on its own event loop in a thread, on temp
dirs (real SQLite, real TLS on 127.0.0.1:0, real admin Unix socket), so tests can use
plain blocking gRPC channels::

    with InProcessServer(tmp_path, attestation_rate_limit=1000) as server:
        admin = server.admin_channel()
        token = server.create_join_token()
        agent = server.attest(token)                # node attestation, returns AttestedAgent
        with agent.channel() as ch:                 # mTLS with the agent SVID
            AgentStub(ch).BatchNewX509SVID(...)

``make_csr(key, uri=...)`` builds a DER CSR (optionally claiming a URI SAN, which the
server must ignore). ``bootstrap_credentials`` / ``AttestedAgent.credentials`` give
``grpc.ChannelCredentials`` usable with ``grpc.secure_channel`` or
``grpc.aio.secure_channel`` alike. ``attest_with_join_token`` does an agent's node
attestation against any server (in-process, or a ``credo-server`` process).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from credo.keys import PrivateKey, generate_private_key, private_key_to_pkcs8_pem
from server.app import RunningServer, serve
from server.config import ServerConfig

__all__ = [
    "AttestedAgent",
    "InProcessServer",
    "attest_with_join_token",
    "bootstrap_credentials",
    "make_csr",
]

PEM = serialization.Encoding.PEM


def make_csr(key: PrivateKey | None = None, *, uri: str | None = None) -> bytes:
    """A DER PKCS#10 CSR signed by ``key`` (a new P-256 key if None), optionally with a URI SAN."""
    key = key or generate_private_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])
    )
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _roots_pem(bundle: Any) -> bytes:
    """PEM of the X.509 authorities of a ``types_pb2.Bundle``."""
    return b"".join(
        x509.load_der_x509_certificate(a.asn1).public_bytes(PEM) for a in bundle.x509_authorities
    )


def bootstrap_credentials(bundle: Any) -> grpc.ChannelCredentials:
    """TLS that trusts ``bundle`` (a ``types_pb2.Bundle``) and sends no client certificate."""
    return grpc.ssl_channel_credentials(root_certificates=_roots_pem(bundle))


@dataclass
class AttestedAgent:
    """An agent after node attestation: its key, SVID chain (DER, leaf first) and bundle."""

    agent_id: str
    key: PrivateKey
    chain: list[bytes]
    bundle: Any  # types_pb2.Bundle
    target: str

    def credentials(self) -> grpc.ChannelCredentials:
        """mTLS credentials presenting this agent's SVID."""
        chain_pem = b"".join(
            x509.load_der_x509_certificate(c).public_bytes(PEM) for c in self.chain
        )
        return grpc.ssl_channel_credentials(
            root_certificates=_roots_pem(self.bundle),
            private_key=private_key_to_pkcs8_pem(self.key),
            certificate_chain=chain_pem,
        )

    def channel(self) -> grpc.Channel:
        """A blocking mTLS channel to the agent endpoint (use as a context manager)."""
        return grpc.secure_channel(self.target, self.credentials())

    @property
    def serial(self) -> str:
        return format(x509.load_der_x509_certificate(self.chain[0]).serial_number, "x")


def attest_with_join_token(
    target: str,
    bundle: Any,
    token: str,
    key: PrivateKey | None = None,
    *,
    timeout: float = 10.0,
) -> AttestedAgent:
    """Node-attest at ``target`` with ``token`` over TLS trusting ``bundle`` (a
    ``types_pb2.Bundle``), without a client certificate; raise ``grpc.RpcError`` if refused."""
    key = key or generate_private_key()
    with grpc.secure_channel(target, bootstrap_credentials(bundle)) as channel:
        resp = agent_pb2_grpc.AgentStub(channel).AttestAgent(
            agent_pb2.AttestAgentRequest(
                attestation_data=agent_pb2.AttestationData(
                    type="join_token", payload=token.encode()
                ),
                csr=make_csr(key),
            ),
            timeout=timeout,
        )
    return AttestedAgent(
        agent_id=resp.svid.spiffe_id,
        key=key,
        chain=list(resp.svid.cert_chain),
        bundle=resp.bundle,
        target=target,
    )


class InProcessServer:
    """``serve(config)`` on a private event loop thread; a context manager."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        # Unix socket paths are limited to ~100 bytes: keep the admin socket short.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="credo-t-"))
        # Removed by __exit__, or when this object goes (a test that called start()/stop()).
        weakref.finalize(self, shutil.rmtree, self._sock_dir, ignore_errors=True)
        settings: dict[str, Any] = {
            "trust_domain": "example.org",
            "data_dir": tmp_path / "server",
            "bind_address": "127.0.0.1:0",
            "admin_socket": self._sock_dir / "private" / "api.sock",
            "attestation_rate_limit": 1000.0,
            "log_level": "debug",
        }
        settings.update(overrides)
        self.config = ServerConfig(**settings).validate()
        self.info: RunningServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._channels: list[grpc.Channel] = []

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> InProcessServer:
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._main, name="credo-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("server did not become ready within 30s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(info: RunningServer) -> None:
                self.info = info
                self._ready.set()

            await serve(self.config, ready=ready, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as err:
            self._error = err
        finally:
            self._ready.set()

    def stop(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
            if self._thread.is_alive():
                raise TimeoutError("server did not stop within 30s")
        self._thread = None
        if self._error is not None:
            raise self._error

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self._sock_dir, ignore_errors=True)

    # --- clients ------------------------------------------------------------------------

    @property
    def target(self) -> str:
        """``localhost:<port>`` of the agent endpoint (the server SVID has DNS SAN localhost)."""
        assert self.info is not None
        return f"localhost:{self.info.agent_address[1]}"

    @property
    def metrics_port(self) -> int:
        assert self.info is not None and self.info.metrics_address
        return int(self.info.metrics_address.rpartition(":")[2])

    def admin_channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(f"unix:{self.config.admin_socket}")
        self._channels.append(ch)
        return ch

    def bundle(self) -> Any:
        return admin_pb2_grpc.BundlesStub(self.admin_channel()).GetBundle(
            admin_pb2.GetBundleAdminRequest(), timeout=10
        )

    def create_join_token(self, ttl: int = 0, spiffe_id: str = "") -> str:
        stub = admin_pb2_grpc.AgentsStub(self.admin_channel())
        return stub.CreateJoinToken(
            admin_pb2.CreateJoinTokenRequest(ttl=ttl, spiffe_id=spiffe_id), timeout=10
        ).token

    def bootstrap_channel(self) -> grpc.Channel:
        """TLS without a client certificate (what an agent has before attesting)."""
        ch = grpc.secure_channel(self.target, bootstrap_credentials(self.bundle()))
        self._channels.append(ch)
        return ch

    def attest(self, token: str, key: PrivateKey | None = None) -> AttestedAgent:
        """Node-attest with a join token; raise ``grpc.RpcError`` if refused."""
        return attest_with_join_token(self.target, self.bundle(), token, key)


@contextmanager
def running_server(tmp_path: Path, **overrides: Any) -> Iterator[InProcessServer]:
    """``with running_server(tmp_path) as server: ...``"""
    with InProcessServer(tmp_path, **overrides) as server:
        yield server
