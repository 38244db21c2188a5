"""TLS for the HTTP front end: the certificate each new connection gets.

Two sources, one interface (:class:`CertificateSource`, ``context() -> SSLContext``):

* :class:`IssuedCertificate` (the default): an X509-SVID the server issues itself for
  ``spiffe://<td>/credo/server`` with the configured DNS names, kept fresh by a
  :class:`server.identity.ServerIdentity` (re-signed at half-life, on CA and bundle change);
* :class:`FileCertificate`: a chain and key from files (a web PKI certificate), re-read
  when either file changes, so a renewed certificate (certbot, cert-manager) applies
  without a restart.

:func:`dynamic_context` makes the one :class:`ssl.SSLContext` the listening socket uses:
its SNI callback swaps in the source's current context for every handshake.
TLS 1.2 or later (cloud providers fetching JWKS still speak 1.2), HTTP/1.1, no client
certificates.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from credo.errors import ConfigError

__all__ = [
    "CertificateSource",
    "FileCertificate",
    "IssuedCertificate",
    "build_http_context",
    "dynamic_context",
]

log = logging.getLogger(__name__)


class CertificateSource(Protocol):
    """Gives the TLS context for the next connection."""

    def context(self) -> ssl.SSLContext: ...


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def build_http_context(
    cert_chain_pem: bytes, key_pem: bytes, roots_pem: bytes = b""
) -> ssl.SSLContext:
    """A server context presenting ``cert_chain_pem`` (leaf first) with ``key_pem``.

    With ``roots_pem`` (the trust bundle, as :class:`ServerIdentity` passes it) the context
    asks for a client certificate without requiring one, and verifies one that is sent
    against those roots: a workload may authenticate to the token endpoint with its
    X509-SVID (mutual TLS, RFC 8705 style). Callers without a certificate are unaffected.
    ``load_cert_chain`` reads files only: the key passes through a 0600 file in a private
    temp directory, removed at once.
    """
    ctx = _base_context()
    with tempfile.TemporaryDirectory(prefix="credo-http-tls-") as tmp:
        path = Path(tmp) / "cert.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_chain_pem + b"\n" + key_pem)
        ctx.load_cert_chain(path)
    if roots_pem:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=roots_pem.decode())
    return ctx


class IssuedCertificate:
    """The certificate the server issues itself (through a ``ServerIdentity``)."""

    def __init__(self, provider: Callable[[], ssl.SSLContext]) -> None:
        self._provider = provider

    def context(self) -> ssl.SSLContext:
        return self._provider()


class FileCertificate:
    """A certificate chain and key from files; re-read when either file changes."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self._cert_file = cert_file
        self._key_file = key_file
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._context: ssl.SSLContext | None = None
        self._load()

    def _files_stamp(self) -> tuple[int, int, int, int]:
        cert, key = os.stat(self._cert_file), os.stat(self._key_file)
        return (cert.st_mtime_ns, cert.st_size, key.st_mtime_ns, key.st_size)

    def _load(self) -> None:
        try:
            stamp = self._files_stamp()
            ctx = _base_context()
            ctx.load_cert_chain(self._cert_file, self._key_file)
        except OSError as exc:
            raise ConfigError(
                f"http.tls_cert_file: cannot load {self._cert_file} and {self._key_file}: "
                f"{exc.strerror or exc}"
            ) from None
        except ssl.SSLError as exc:
            raise ConfigError(
                f"http.tls_cert_file: {self._cert_file} and {self._key_file} are not a "
                f"PEM certificate chain and its private key: {exc.reason or exc}"
            ) from None
        self._stamp, self._context = stamp, ctx

    def context(self) -> ssl.SSLContext:
        with self._lock:
            try:
                changed = self._files_stamp() != self._stamp
            except OSError:
                changed = False  # the file is being replaced: keep the last good one
            if changed:
                try:
                    self._load()
                    log.info("http certificate reloaded", extra={"file": str(self._cert_file)})
                except ConfigError as err:
                    log.error("http certificate reload failed", extra={"error": str(err)})
            assert self._context is not None
            return self._context


def dynamic_context(source: CertificateSource) -> ssl.SSLContext:
    """The listening socket's context: each handshake gets ``source.context()``."""
    outer = source.context()

    def pick(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        try:
            sock.context = source.context()
        except (OSError, ssl.SSLError, ConfigError) as err:
            log.error("no http certificate for a connection", extra={"error": str(err)})

    # The first context answers; its callback moves the connection to the current one.
    outer.sni_callback = pick
    return outer
