"""The bootstrap bundle from a URL (``trust_bundle_url``, SPIRE's agent setting).

Instead of a copied ``bundle.pem`` that goes stale when the CA rotates, the agent fetches
the bundle it trusts for its first attestation over HTTPS from a URL the operator trusts,
typically the server's bundle endpoint (``https://<server>:<port>/bundle``) served with a
web PKI certificate (``[server.http] tls_cert_file``). The URL's certificate is checked
against the system's roots (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` apply) and its host name.
``trust_bundle_format`` says what the URL serves: ``pem`` (CA certificates) or ``spiffe``
(a SPIFFE bundle, as the bundle endpoint serves it).

Bounded (:data:`MAX_BYTES`, ``timeout``); every failure is one
:class:`~node_agent.attestation.errors.NoAgentCredentials` line.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from typing import Final

from cryptography import x509

from credo.bundle import Bundle, load_certificates
from credo.errors import BundleError
from credo.spiffe_id import TrustDomain
from node_agent.attestation.errors import NoAgentCredentials

__all__ = ["BUNDLE_FORMATS", "MAX_BYTES", "fetch_bootstrap_bundle"]

BUNDLE_FORMATS: Final = ("pem", "spiffe")
MAX_BYTES: Final = 1024 * 1024


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: one could lead to plain http or another host."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def fetch_bootstrap_bundle(
    url: str, fmt: str, trust_domain: TrustDomain, *, timeout: float = 10.0
) -> tuple[x509.Certificate, ...]:
    """The X.509 authorities served at ``url``; blocking (run it in a thread)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json, */*"})
    opener = urllib.request.build_opener(
        _NoRedirect(), urllib.request.HTTPSHandler(context=ssl.create_default_context())
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            data = response.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as err:
        raise NoAgentCredentials(f"trust_bundle_url {url} answered HTTP {err.code}") from None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            reason = f"its certificate does not verify ({reason.verify_message})"
        raise NoAgentCredentials(f"cannot fetch trust_bundle_url {url}: {reason}") from None
    except (OSError, ValueError) as err:
        raise NoAgentCredentials(f"cannot fetch trust_bundle_url {url}: {err}") from None
    if len(data) > MAX_BYTES:
        raise NoAgentCredentials(f"trust_bundle_url {url} sent more than {MAX_BYTES} bytes")
    try:
        if fmt == "spiffe":
            certs = tuple(Bundle.parse(trust_domain, data).x509_authorities)
        else:
            certs = tuple(load_certificates(data))
    except (BundleError, ValueError) as err:
        raise NoAgentCredentials(
            f"trust_bundle_url {url} did not serve a {fmt} bundle "
            f"(trust_bundle_format = {fmt!r}): {err}"
        ) from None
    if not certs:
        raise NoAgentCredentials(f"trust_bundle_url {url} served a bundle with no CA")
    return certs
