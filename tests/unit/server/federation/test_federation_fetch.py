"""Fetching a federated bundle: both profiles, and every way an endpoint can be wrong."""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo import Bundle, TrustDomain, generate_private_key
from server.federation.errors import BundleFetchFailed
from server.federation.fetch import MAX_BUNDLE_BYTES, fetch_bundle
from tests.helpers.webpki import WebCa

TD = TrustDomain.parse("partner.test")
BUNDLE = Bundle(TD, (), {"k1": generate_private_key().public_key()}, 4, 2)

Responder = Callable[[http.server.BaseHTTPRequestHandler], None]


def send(handler: http.server.BaseHTTPRequestHandler, body: bytes, status: int = 200) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextlib.contextmanager
def endpoint(cert: Path, key: Path, respond: Responder) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            respond(self)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_port}/bundle"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def web(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A web PKI certificate for localhost from a local CA the system trust now includes."""
    ca = WebCa()
    (tmp_path / "roots.pem").write_bytes(ca.root_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "roots.pem"))
    return ca.write(tmp_path, ["localhost"])


def test_https_web_fetches_and_parses_the_bundle(web: tuple[Path, Path]) -> None:
    """An https_web endpoint with a certificate the web PKI trusts gives its bundle."""
    with endpoint(*web, lambda h: send(h, BUNDLE.marshal())) as url:
        assert fetch_bundle(TD, url, "https_web") == BUNDLE


def test_https_web_refuses_an_untrusted_certificate(web: tuple[Path, Path], tmp_path: Path) -> None:
    """A certificate from a CA the system does not trust fails with the reason."""
    other = WebCa("other")
    cert, key = other.write(tmp_path / ".." / tmp_path.name, ["localhost"])
    with (
        endpoint(cert, key, lambda h: send(h, BUNDLE.marshal())) as url,
        pytest.raises(BundleFetchFailed, match="does not verify"),
    ):
        fetch_bundle(TD, url, "https_web")


def _spiffe_server_cert(tmp_path: Path, spiffe_id: str) -> tuple[Path, Path, bytes]:
    """A CA and an X509-SVID for ``spiffe_id`` (as a Credo server presents)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://partner.test")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "svid.pem", tmp_path / "svid.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, ca.public_bytes(serialization.Encoding.PEM)


def test_https_spiffe_checks_the_chain_and_the_endpoint_id(tmp_path: Path) -> None:
    """https_spiffe verifies the SVID against the given roots and its exact SPIFFE ID."""
    cert, key, roots = _spiffe_server_cert(tmp_path, "spiffe://partner.test/credo/server")
    with endpoint(cert, key, lambda h: send(h, BUNDLE.marshal())) as url:
        got = fetch_bundle(
            TD,
            url,
            "https_spiffe",
            endpoint_spiffe_id="spiffe://partner.test/credo/server",
            roots_pem=roots,
        )
        assert got == BUNDLE
        with pytest.raises(BundleFetchFailed, match=r"expected spiffe://partner\.test/other"):
            fetch_bundle(
                TD,
                url,
                "https_spiffe",
                endpoint_spiffe_id="spiffe://partner.test/other",
                roots_pem=roots,
            )
        with pytest.raises(BundleFetchFailed, match="does not verify"):
            fetch_bundle(
                TD,
                url,
                "https_spiffe",
                endpoint_spiffe_id="spiffe://partner.test/credo/server",
                roots_pem=WebCa().root_pem,
            )
        with pytest.raises(BundleFetchFailed, match="--trust-domain-bundle"):
            fetch_bundle(TD, url, "https_spiffe", endpoint_spiffe_id="spiffe://partner.test/x")


def _slow(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    with contextlib.suppress(OSError):
        for _ in range(100):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.1)


@pytest.mark.parametrize(
    ("respond", "message"),
    [
        pytest.param(lambda h: send(h, b"<html>hello</html>"), "not a SPIFFE bundle", id="garbage"),
        pytest.param(lambda h: send(h, b'{"keys": 3}'), "not a SPIFFE bundle", id="bad-json"),
        pytest.param(lambda h: send(h, b"{}", 500), "HTTP 500", id="server-error"),
        pytest.param(
            lambda h: send(h, b" " * (MAX_BUNDLE_BYTES + 10)), "more than", id="oversized"
        ),
        pytest.param(_slow, "longer than", id="slow"),
    ],
)
def test_a_bad_endpoint_is_one_clear_error(
    web: tuple[Path, Path], respond: Responder, message: str
) -> None:
    """Garbage, an error status, an oversized or a slow response: BundleFetchFailed."""
    with endpoint(*web, respond) as url, pytest.raises(BundleFetchFailed, match=message):
        fetch_bundle(TD, url, "https_web", deadline=2.0, timeout=2.0)


def test_a_bundle_of_another_trust_domain_is_refused(
    web: tuple[Path, Path], tmp_path: Path
) -> None:
    """A bundle whose CA names spiffe://partner.test is not mine.test's bundle."""
    _, _, roots = _spiffe_server_cert(tmp_path, "spiffe://partner.test/x")
    foreign = Bundle(TD, (x509.load_pem_x509_certificate(roots),), {}, 1).marshal()
    with (
        endpoint(*web, lambda h: send(h, foreign)) as url,
        pytest.raises(BundleFetchFailed, match=r"spiffe://partner.test, not trust domain mine"),
    ):
        fetch_bundle(TrustDomain.parse("mine.test"), url, "https_web")
