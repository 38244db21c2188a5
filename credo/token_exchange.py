"""For workloads: exchange a person's token for a delegated one, :class:`TokenExchangeClient`.

The client gets the workload's JWT-SVID from the Workload API (audience: the token
endpoint), sends it as ``client_assertion`` (``...:client-assertion-type:jwt-spiffe``) with
the RFC 8693 form, and returns the response::

    client = credo.TokenExchangeClient("https://credo.example.com:8443/oauth2/token")
    answer = client.exchange(alice_id_token, audience="https://git.example.com",
                             scope=["repo:read"])
    answer.access_token, answer.expires_in, answer.scope

By default the token endpoint's certificate is checked against the trust domain's X.509
bundle from the Workload API (the server's own certificate); pass ``ssl_context`` for a
web PKI one. A refusal raises :class:`TokenExchangeRefused` with the RFC error code.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from credo.errors import CredoError, TokenExchangeRefused
from credo.spiffe_id import SpiffeId
from credo.workload_client import WorkloadApiClient

__all__ = ["TokenExchangeClient", "TokenExchangeRefused", "TokenResponse"]

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class TokenResponse:
    """The RFC 8693 response."""

    access_token: str
    issued_token_type: str
    token_type: str
    expires_in: int
    scope: str

    def __repr__(self) -> str:  # never print the token by accident
        return f"TokenResponse(scope={self.scope!r}, expires_in={self.expires_in})"


class TokenExchangeClient:
    """Calls a Credo token endpoint as the workload's SPIFFE ID (see the module docstring)."""

    def __init__(
        self,
        token_endpoint: str,
        *,
        workload_api: str | None = None,
        spiffe_id: SpiffeId | str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not token_endpoint.startswith("https://"):
            raise ValueError(f"token_endpoint must be an https:// URL, got {token_endpoint!r}")
        self.token_endpoint = token_endpoint
        self._workload_api = workload_api
        self._spiffe_id = spiffe_id
        self._ssl_context = ssl_context
        self._timeout = timeout

    def _assertion_and_context(self) -> tuple[str, ssl.SSLContext]:
        with WorkloadApiClient(self._workload_api, timeout=self._timeout) as client:
            svids = client.fetch_jwt_svids([self.token_endpoint], self._spiffe_id)
            context = self._ssl_context
            if context is None:
                bundles = client.fetch_x509_bundles()
                bundle = bundles.get_x509_bundle_for_trust_domain(svids[0].spiffe_id.trust_domain)
                pem = bundle.marshal_pem().decode() if bundle is not None else ""
                if not pem:
                    raise CredoError("the Workload API gave no X.509 bundle to trust the server")
                context = ssl.create_default_context(cadata=pem)
        return svids[0].token, context

    def exchange(
        self,
        subject_token: str,
        *,
        audience: str,
        scope: Iterable[str] = (),
        subject_token_type: str = ID_TOKEN,
    ) -> TokenResponse:
        """Exchange ``subject_token`` for a delegated access token for ``audience``."""
        assertion, context = self._assertion_and_context()
        form = {
            "grant_type": GRANT_TYPE,
            "client_assertion_type": JWT_SPIFFE,
            "client_assertion": assertion,
            "subject_token": subject_token,
            "subject_token_type": subject_token_type,
            "audience": audience,
        }
        scopes = " ".join(scope)
        if scopes:
            form["scope"] = scopes
        request = urllib.request.Request(
            self.token_endpoint,
            data=urllib.parse.urlencode(form).encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=context) as r:
                body = json.loads(r.read(_MAX_BYTES))
        except urllib.error.HTTPError as err:
            try:
                doc = json.loads(err.read(_MAX_BYTES))
            except ValueError:
                doc = {}
            raise TokenExchangeRefused(
                err.code,
                str(doc.get("error", "server_error")),
                str(doc.get("error_description", err.reason)),
            ) from None
        except (urllib.error.URLError, OSError) as err:
            raise CredoError(
                f"cannot reach the token endpoint {self.token_endpoint}: {err}"
            ) from None
        return TokenResponse(
            access_token=str(body["access_token"]),
            issued_token_type=str(body["issued_token_type"]),
            token_type=str(body["token_type"]),
            expires_in=int(body["expires_in"]),
            scope=str(body.get("scope", "")),
        )
