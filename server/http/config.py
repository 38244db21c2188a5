"""``[server.http]``: the server's one HTTP front end.

::

    [server.http]
    bind_address = "0.0.0.0:8443"   # flag --http-bind-address; "" (the default) serves no HTTP;
                                    # port 0 picks a free port, written to <data-dir>/http.addr
    dns_names = ["credo.example.com"]   # DNS names of the certificate the server issues itself
    tls_cert_file = "/etc/credo/web.crt"  # or a certificate chain from files (both or neither)
    tls_key_file = "/etc/credo/web.key"
    insecure_http = false           # plain HTTP, only behind a TLS-terminating proxy
    max_request_bytes = 65536       # larger request bodies get 413
    request_timeout = "10s"         # a request not answered in time gets 503
    idle_timeout = "60s"            # connections idle this long are closed, including a
                                    # client that never finishes its request headers

By default the front end presents a certificate the server issues from its own CA: an
X509-SVID for ``spiffe://<td>/credo/server`` with ``dns_names`` (plus ``localhost``) as DNS
names, re-signed like the agent endpoint's; that is what the SPIFFE ``https_spiffe``
bundle endpoint profile expects. With ``tls_cert_file``/``tls_key_file`` it presents that
chain instead (a web PKI certificate: the ``https_web`` profile), re-read when the files
change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from credo._config import duration_field
from credo.errors import ConfigError

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "HttpConfig"]

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024
_DNS_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def _valid_dns_name(name: str) -> bool:
    labels = name.lower().removeprefix("*.").split(".")
    return (
        0 < len(name) <= 253
        and all(0 < len(label) <= 63 for label in labels)
        and all(set(label) <= _DNS_LABEL_CHARS for label in labels)
        and all(not label.startswith("-") and not label.endswith("-") for label in labels)
    )


@dataclass(frozen=True)
class HttpConfig:
    """The ``[server.http]`` table; ``bind_address = ""`` means no HTTP front end."""

    bind_address: str = ""
    dns_names: tuple[str, ...] = ()
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    insecure_http: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_timeout: int = duration_field(10)
    idle_timeout: int = duration_field(60)

    @property
    def enabled(self) -> bool:
        return bool(self.bind_address)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.bind_address.rpartition(":")
        return host.strip("[]"), int(port)

    def validate(self) -> None:
        if self.bind_address:
            host, sep, port = self.bind_address.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"bind_address: expected host:port, got {self.bind_address!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file: tls_cert_file and tls_key_file go together")
        if self.insecure_http and self.tls_cert_file is not None:
            raise ConfigError(
                "insecure_http: plain HTTP serves no certificate; remove tls_cert_file and "
                "tls_key_file, or insecure_http"
            )
        for name in self.dns_names:
            if not _valid_dns_name(name):
                raise ConfigError(f"dns_names: {name!r} is not a DNS name")
        if not 1024 <= self.max_request_bytes <= 64 * 1024 * 1024:
            raise ConfigError(
                f"max_request_bytes: expected 1024 to 67108864, got {self.max_request_bytes}"
            )
        if self.request_timeout <= 0:
            raise ConfigError("request_timeout: must be a positive duration")
        if self.idle_timeout <= 0:
            raise ConfigError("idle_timeout: must be a positive duration")
