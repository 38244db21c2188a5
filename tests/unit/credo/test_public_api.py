"""The public surface of ``credo`` is exactly the intended set of names."""

from __future__ import annotations

import credo

EXPECTED = {
    # SPIFFE nouns
    "TrustDomain",
    "SpiffeId",
    "Selector",
    "X509Svid",
    "JwtSvid",
    "X509Bundle",
    "JwtBundle",
    "Bundle",
    "BundleSet",
    # WIT-SVIDs and their proof of possession (WIMSE Workload Proof Token)
    "WitSvid",
    "WitBundle",
    "sign_wit_svid",
    "create_wpt",
    "verify_wpt",
    "verify_request",
    "WorkloadProof",
    # the Workload API client
    "WorkloadApiClient",
    "X509Context",
    "WorkloadApiError",
    # keys
    "KeyType",
    "generate_private_key",
    "load_private_key",
    "private_key_to_pkcs8_der",
    "private_key_to_pkcs8_pem",
    "jwt_algorithm_for",
    # templates, signing, verification
    "x509_svid_template",
    "ca_certificate_template",
    "sign_x509_svid",
    "verify_x509_svid",
    "sign_jwt_svid",
    # delegated access tokens (resource servers)
    "AccessToken",
    "verify_access_token",
    "AccessTokenError",
    # delegated access tokens (workloads)
    "TokenExchangeClient",
    "TokenExchangeRefused",
    # errors (the roots of each branch; the leaves live in credo.errors)
    "errors",
    "CredoError",
    "InvalidSpiffeId",
    "InvalidTrustDomain",
    "InvalidSelector",
    "InvalidKey",
    "BundleError",
    "X509SvidError",
    "InvalidX509Svid",
    "JwtSvidError",
    "InvalidJwtSvid",
    "WitSvidError",
    "InvalidWorkloadProof",
}


def test_all_is_exactly_the_intended_surface() -> None:
    """credo.__all__ lists exactly the intended public names, no more and no fewer."""
    assert set(credo.__all__) == EXPECTED
    assert len(credo.__all__) == len(EXPECTED)


def test_every_exported_name_exists() -> None:
    """Every name in credo.__all__ is importable from credo."""
    for name in credo.__all__:
        assert getattr(credo, name) is not None, name


# Errors that report a failed call rather than bad input, so are not ValueErrors.
NOT_INPUT_ERRORS = {
    "CredoError",
    "WorkloadApiError",
    "AccessTokenKeysUnavailable",
    "TokenExchangeRefused",
}


def test_every_error_is_a_credo_error_and_input_errors_are_value_errors() -> None:
    """Every class in credo.errors derives from CredoError; bad-input ones also from ValueError."""
    for name in credo.errors.__all__:
        cls = getattr(credo.errors, name)
        assert issubclass(cls, credo.CredoError), name
        if name not in NOT_INPUT_ERRORS:
            assert issubclass(cls, ValueError), name
