"""Credo: SPIFFE workload identity for AI agents and the services they call.

The shared SPIFFE model: IDs, SVIDs, bundles and errors. Import from here, not from the
submodules; ``credo.__all__`` is the supported surface.
"""

from __future__ import annotations

from credo import errors
from credo.access_token import AccessToken, verify_access_token
from credo.bundle import Bundle, BundleSet, JwtBundle, WitBundle, X509Bundle
from credo.errors import (
    AccessTokenError,
    BundleError,
    CredoError,
    InvalidJwtSvid,
    InvalidKey,
    InvalidSelector,
    InvalidSpiffeId,
    InvalidTrustDomain,
    InvalidWorkloadProof,
    InvalidX509Svid,
    JwtSvidError,
    TokenExchangeRefused,
    WitSvidError,
    WorkloadApiError,
    X509SvidError,
)
from credo.jwtsvid import JwtSvid, sign_jwt_svid
from credo.keys import (
    KeyType,
    generate_private_key,
    jwt_algorithm_for,
    load_private_key,
    private_key_to_pkcs8_der,
    private_key_to_pkcs8_pem,
)
from credo.selector import Selector
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.token_exchange import TokenExchangeClient
from credo.witsvid import WitSvid, sign_wit_svid
from credo.workload_client import WorkloadApiClient, X509Context
from credo.wpt import WorkloadProof, create_wpt, verify_request, verify_wpt
from credo.x509svid import (
    X509Svid,
    ca_certificate_template,
    sign_x509_svid,
    verify_x509_svid,
    x509_svid_template,
)

__all__ = [
    "AccessToken",
    "AccessTokenError",
    "Bundle",
    "BundleError",
    "BundleSet",
    "CredoError",
    "InvalidJwtSvid",
    "InvalidKey",
    "InvalidSelector",
    "InvalidSpiffeId",
    "InvalidTrustDomain",
    "InvalidWorkloadProof",
    "InvalidX509Svid",
    "JwtBundle",
    "JwtSvid",
    "JwtSvidError",
    "KeyType",
    "Selector",
    "SpiffeId",
    "TokenExchangeClient",
    "TokenExchangeRefused",
    "TrustDomain",
    "WitBundle",
    "WitSvid",
    "WitSvidError",
    "WorkloadApiClient",
    "WorkloadApiError",
    "WorkloadProof",
    "X509Bundle",
    "X509Context",
    "X509Svid",
    "X509SvidError",
    "ca_certificate_template",
    "create_wpt",
    "errors",
    "generate_private_key",
    "jwt_algorithm_for",
    "load_private_key",
    "private_key_to_pkcs8_der",
    "private_key_to_pkcs8_pem",
    "sign_jwt_svid",
    "sign_wit_svid",
    "sign_x509_svid",
    "verify_access_token",
    "verify_request",
    "verify_wpt",
    "verify_x509_svid",
    "x509_svid_template",
]
