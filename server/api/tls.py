"""TLS for the agent endpoint: optional client certificates, no resumption, hot reload.

Why not gRPC's own TLS: in grpcio ``ssl_server_credentials(..., require_client_auth=False)``
(and ``dynamic_ssl_server_credentials``) maps to ``GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE``:
the server never asks for a client certificate, so an agent's SVID would never reach
us; ``require_client_auth=True`` would make attestation (which has no SVID yet)
impossible. Python exposes no "request but do not require" mode, and no way to turn
off TLS session tickets. So the agent endpoint terminates TLS here, with the standard
library's :mod:`ssl` (OpenSSL):

* client certificates are requested and verified against the trust bundle when sent
  (``CERT_OPTIONAL``); a connection without one can only attest;
* TLS 1.3 only, zero session tickets: no session resumption, every connection does a
  full handshake and presents its certificate;
* the :class:`ssl.SSLContext` is taken from ``context_provider`` for every new
  connection, so a rotated server SVID or bundle applies without a restart.

Each TLS connection is relayed to the in-process gRPC server over a Unix socket in a
private (0700) directory. The relay binds its end of that socket to a unique path, which
gRPC reports as the call's ``context.peer()``; :class:`PeerRegistry` maps that back to
the TLS peer (address and verified certificate). Nobody else can connect to the private
socket, so a peer that is not in the registry is never trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from server.api.relay import CHUNK, ConnectionRelay, pump

__all__ = ["PeerInfo", "PeerRegistry", "TlsFrontend", "build_server_context"]

log = logging.getLogger(__name__)

_HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class PeerInfo:
    """The TLS peer behind one relayed connection."""

    host: str
    port: int
    # The client certificate, verified against the bundle during the handshake; None when
    # the client sent none.
    certificate: x509.Certificate | None


class PeerRegistry:
    """Maps gRPC's ``context.peer()`` of a relayed connection to its :class:`PeerInfo`."""

    def __init__(self) -> None:
        self._peers: dict[str, PeerInfo] = {}

    def add(self, key: str, info: PeerInfo) -> None:
        self._peers[key] = info

    def remove(self, key: str) -> None:
        self._peers.pop(key, None)

    def lookup(self, grpc_peer: str) -> PeerInfo | None:
        """The TLS peer for ``context.peer()`` (``unix:/path``), or None if unknown."""
        return self._peers.get(grpc_peer)

    def __len__(self) -> int:
        return len(self._peers)


def build_server_context(cert_chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    """A server context: our SVID, client certificates optional and verified with ``roots``.

    ``load_cert_chain`` only reads files, so the key passes through a 0600 file in a
    private directory that is removed at once.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    ctx.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory(prefix="credo-tls-") as tmp:
        path = Path(tmp) / "svid.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_chain_pem + key_pem)
        ctx.load_cert_chain(path)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    return ctx


class TlsFrontend(ConnectionRelay):
    """Accept TLS on ``host:port`` and relay each connection to gRPC on ``upstream``."""

    _ENDED = (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError)
    _NAME = "agent connection"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        upstream: Path,
        relay_dir: Path,
        context_provider: Callable[[], ssl.SSLContext],
        peers: PeerRegistry,
    ) -> None:
        super().__init__()
        self._host = host
        self._port = port
        self._upstream = upstream
        self._relay_dir = relay_dir
        self._context_provider = context_provider
        self.peers = peers
        self._ids = itertools.count(1)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the TLS frontend is not started")
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self._host, self._port, reuse_address=True, backlog=1024
        )

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername") or ("", 0)
        await writer.start_tls(self._context_provider(), ssl_handshake_timeout=_HANDSHAKE_TIMEOUT)
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        cert = x509.load_der_x509_certificate(der) if der else None
        info = PeerInfo(str(peername[0]), int(peername[1]), cert)

        path = self._relay_dir / f"c{next(self._ids)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        key = f"unix:{path}"
        try:
            sock.bind(str(path))
            sock.setblocking(False)
            # Register before gRPC can see a call on this connection.
            self.peers.add(key, info)
            await asyncio.get_running_loop().sock_connect(sock, str(self._upstream))
            up_reader, up_writer = await asyncio.open_unix_connection(sock=sock, limit=CHUNK)
        except BaseException:
            self.peers.remove(key)
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        with contextlib.suppress(OSError):
            path.unlink()  # the name stays attached to the connected socket
        self._writers.add(up_writer)
        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            # Forget the peer before the socket (and so its name) is released.
            self.peers.remove(key)
            up_writer.transport.abort()
