"""Fetch one federated bundle from its bundle endpoint (SPIFFE Federation, 5).

* ``https_web``: the endpoint's certificate is checked against the system's web PKI roots
  (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` work as for any OpenSSL program) and the URL's
  host name;
* ``https_spiffe``: the endpoint presents an X509-SVID that must chain to ``roots`` (the
  last bundle of the endpoint's trust domain) and carry exactly ``endpoint_spiffe_id``;
  host names are not checked (SPIFFE authenticates the ID, not the name).

Bounded: connect, TLS and each read within ``timeout`` seconds and the whole response
within ``deadline``; at most :data:`MAX_BUNDLE_BYTES` of body. Whatever goes wrong is one
:class:`BundleFetchFailed` with a line a person can act on. Blocking: run it in a thread.
"""

from __future__ import annotations

import http.client
import ssl
import time
from urllib.parse import urlsplit

from cryptography import x509

from credo.bundle import Bundle
from credo.errors import BundleError
from credo.spiffe_id import TrustDomain
from server.federation.errors import BundleFetchFailed
from server.federation.relationships import PROFILE_HTTPS_SPIFFE

__all__ = ["MAX_BUNDLE_BYTES", "fetch_bundle"]

MAX_BUNDLE_BYTES = 1024 * 1024
_CHUNK = 64 * 1024


def _context(profile: str, roots_pem: bytes) -> ssl.SSLContext:
    if profile == PROFILE_HTTPS_SPIFFE:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        if not roots_pem:
            raise BundleFetchFailed(
                "no bundle of the endpoint's trust domain to verify it with; give the first "
                "one with --trust-domain-bundle"
            )
        ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
        return ctx
    return ssl.create_default_context()


def _check_spiffe_id(der: bytes | None, expected: str) -> None:
    if der is None:
        raise BundleFetchFailed("the endpoint presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [expected]:
        raise BundleFetchFailed(
            f"the endpoint's SVID is for {', '.join(uris) or 'no SPIFFE ID'}, expected {expected}"
        )


def _check_trust_domain(bundle: Bundle, td: TrustDomain) -> None:
    """Refuse a bundle whose CA certificates name another trust domain (their URI SAN)."""
    for cert in bundle.x509_authorities:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if (
                uri.startswith("spiffe://")
                and uri.removeprefix("spiffe://").split("/")[0] != td.name
            ):
                raise BundleFetchFailed(f"the bundle is for {uri}, not trust domain {td.name}")


def fetch_bundle(
    trust_domain: TrustDomain,
    url: str,
    profile: str,
    *,
    endpoint_spiffe_id: str = "",
    roots_pem: bytes = b"",
    timeout: float = 10.0,
    deadline: float = 30.0,
) -> Bundle:
    """GET ``url`` and parse the answer as ``trust_domain``'s SPIFFE bundle."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    ctx = _context(profile, roots_pem)
    started = time.monotonic()
    conn = http.client.HTTPSConnection(host, parts.port or 443, context=ctx, timeout=timeout)
    try:
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as err:
            raise BundleFetchFailed(
                f"{url}: the endpoint's certificate does not verify: {err.verify_message}"
            ) from None
        except ssl.SSLError as err:
            raise BundleFetchFailed(f"{url}: TLS failed: {err.reason or err}") from None
        except (TimeoutError, OSError) as err:
            raise BundleFetchFailed(f"{url}: cannot connect: {err.strerror or err}") from None
        if profile == PROFILE_HTTPS_SPIFFE:
            assert isinstance(conn.sock, ssl.SSLSocket)
            _check_spiffe_id(conn.sock.getpeercert(binary_form=True), endpoint_spiffe_id)
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise BundleFetchFailed(f"{url}: answered HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_BUNDLE_BYTES:
                raise BundleFetchFailed(
                    f"{url}: the bundle is {length} bytes, more than {MAX_BUNDLE_BYTES}"
                )
            body = bytearray()
            while True:
                if time.monotonic() - started > deadline:
                    raise BundleFetchFailed(f"{url}: the bundle took longer than {deadline:g}s")
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                body += chunk
                if len(body) > MAX_BUNDLE_BYTES:
                    raise BundleFetchFailed(
                        f"{url}: the bundle is larger than {MAX_BUNDLE_BYTES} bytes"
                    )
        except (TimeoutError, OSError, http.client.HTTPException) as err:
            raise BundleFetchFailed(f"{url}: {type(err).__name__}: {err}") from None
    finally:
        conn.close()
    try:
        bundle = Bundle.parse(trust_domain, bytes(body))
    except (BundleError, ValueError) as err:
        raise BundleFetchFailed(f"{url}: not a SPIFFE bundle: {err}") from None
    _check_trust_domain(bundle, trust_domain)
    return bundle
