"""The HTTP front end of a running ``credo-server``: its own certificate, files, errors."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from tests.helpers.processes import credo_server_command, short_temp_dir, start_server
from tests.helpers.webpki import WebCa


def get(url: str, context: ssl.SSLContext) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def peer_certificate(url: str, context: ssl.SSLContext) -> x509.Certificate:
    host, port = url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_default_certificate_is_issued_by_the_servers_own_ca(tmp_path: Path) -> None:
    """With only --http-bind-address, the front end serves HTTPS with an X509-SVID of
    spiffe://<td>/credo/server for the configured DNS names, which verifies against the
    trust bundle; unknown paths answer the JSON error shape."""
    config = tmp_path / "server.toml"
    config.write_text('[server.http]\ndns_names = ["credo.example.test"]\n')
    with start_server(tmp_path, config=config, http_bind_address="127.0.0.1:0") as server:
        assert (server.data_dir / "http.addr").read_text().startswith("127.0.0.1:")
        trust = ssl.create_default_context(cadata=server.bundle_pem())
        leaf = peer_certificate(server.http_url, trust)
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            "spiffe://example.org/credo/server"
        ]
        assert {"credo.example.test", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
        status, headers, body = get(f"{server.http_url}/no/such/thing", trust)
        assert status == 404
        assert headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["error"] == "not_found"


def test_certificate_from_files_and_plain_http_only_when_asked(tmp_path: Path) -> None:
    """tls_cert_file/tls_key_file put a web PKI certificate on the front end."""
    ca = WebCa()
    cert, key = ca.write(tmp_path, ["localhost"])
    config = tmp_path / "server.toml"
    config.write_text(
        f'[server.http]\nbind_address = "127.0.0.1:0"\n'
        f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
    )
    with start_server(tmp_path, config=config) as server:
        trust = ssl.create_default_context(cadata=ca.root_pem.decode())
        status, _, _ = get(f"{server.http_url}/nothing", trust)
        assert status == 404
        leaf = peer_certificate(server.http_url, trust)
        assert leaf.issuer == ca.cert.subject


def test_insecure_http_serves_plain_http(tmp_path: Path) -> None:
    """insecure_http = true (behind a TLS-terminating proxy) serves plain HTTP."""
    config = tmp_path / "server.toml"
    config.write_text('[server.http]\nbind_address = "127.0.0.1:0"\ninsecure_http = true\n')
    with start_server(tmp_path, config=config) as server:
        url = server.http_url.replace("https://", "http://")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url}/nothing", timeout=10)
        assert missing.value.code == 404
        assert json.loads(missing.value.read())["error"] == "not_found"
        with urllib.request.urlopen(f"{url}/bundle", timeout=10) as response:
            assert "keys" in json.loads(response.read())


def test_unreadable_certificate_files_are_one_line_errors(tmp_path: Path) -> None:
    """A tls_cert_file that is not a certificate stops the server with one clear line."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    config = tmp_path / "server.toml"
    config.write_text(
        f'[server.http]\nbind_address = "127.0.0.1:0"\n'
        f'tls_cert_file = "{bad}"\ntls_key_file = "{bad}"\n'
    )
    result = subprocess.run(
        [
            *credo_server_command(),
            "run",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path / "d"),
            "--bind-address",
            "127.0.0.1:0",
            "--admin-socket",
            str(short_temp_dir() / "a.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "http.tls_cert_file" in result.stderr
