"""Errors raised by the ``credo`` SPIFFE model.

Every error Credo raises on purpose is a :class:`CredoError`; every one caused by bad
input is also a :class:`ValueError`. Each carries data (``text``, ``reason``) so callers
can act on it without parsing the message.

::

    CredoError
    ├── InvalidSpiffeId (also ValueError)             text is not a SPIFFE ID
    │   └── InvalidTrustDomain                        text is not a trust domain name
    ├── InvalidSelector (also ValueError)             text is not 'type:value'
    ├── InvalidKey (also ValueError)                  key bytes unreadable / key type unsupported
    ├── BundleError (also ValueError)                 bundle bytes malformed
    ├── X509SvidError (also ValueError)               an X509-SVID was refused
    │   ├── InvalidX509Svid                           malformed: unparsable, key mismatch, ...
    │   │   ├── NoUriSan                              leaf has no URI SAN
    │   │   ├── MultipleUriSans                       leaf has more than one URI SAN
    │   │   ├── LeafIsCa                              leaf has cA=true
    │   │   ├── BadKeyUsage                           leaf key usage wrong
    │   │   └── SigningCertNotCa                      intermediate is not a usable CA
    │   ├── X509SvidExpired                           a chain cert is past NotAfter
    │   ├── X509SvidNotYetValid                       a chain cert is before NotBefore
    │   └── UntrustedChain                            no bundle / chain leads to no authority
    ├── JwtSvidError (also ValueError)                a JWT-SVID was refused
    │   ├── InvalidJwtSvid                            malformed header or claims
    │   ├── UnsupportedJwtAlgorithm                   alg not RS/ES/PS 256/384/512
    │   ├── JwtSvidExpired                            exp is in the past
    │   ├── JwtAudienceMismatch                       none of the expected audiences present
    │   ├── JwtIssuerMismatch                         iss missing or not the expected issuer
    │   ├── JwtSvidRevoked                            its jti is in the revocation list given
    │   └── UntrustedJwtSvid                          no bundle for the trust domain / bad signature
    │       └── UnknownJwtKey                         kid not in the trust domain's bundle
    ├── InvalidWorkloadApiEndpoint (also ValueError)  not a Workload API socket address
    ├── WorkloadApiError                              a Workload API call failed
    └── ConfigError (also ValueError)                 a setting is missing, unknown or bad
"""

from __future__ import annotations

__all__ = [
    "BadKeyUsage",
    "BundleError",
    "CredoError",
    "InvalidJwtSvid",
    "InvalidKey",
    "InvalidSelector",
    "InvalidSpiffeId",
    "InvalidTrustDomain",
    "InvalidX509Svid",
    "JwtAudienceMismatch",
    "JwtIssuerMismatch",
    "JwtSvidError",
    "JwtSvidExpired",
    "JwtSvidRevoked",
    "LeafIsCa",
    "MultipleUriSans",
    "NoUriSan",
    "SigningCertNotCa",
    "UnknownJwtKey",
    "UnsupportedJwtAlgorithm",
    "UntrustedChain",
    "UntrustedJwtSvid",
    "X509SvidError",
    "X509SvidExpired",
    "X509SvidNotYetValid",
]


class CredoError(Exception):
    """Root of every error Credo raises on purpose."""


class InvalidSpiffeId(CredoError, ValueError):
    """Text is not a valid SPIFFE ID; ``reason`` names the broken rule."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid SPIFFE ID {text[:100]!r}: {reason}")


class InvalidTrustDomain(InvalidSpiffeId):
    """Text is not a valid trust domain name."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        ValueError.__init__(self, f"invalid trust domain {text[:100]!r}: {reason}")


class InvalidSelector(CredoError, ValueError):
    """Text is not a ``type:value`` selector."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid selector {text[:100]!r}: {reason}")


class _ReasonError(CredoError, ValueError):
    """Base for errors that carry one ``reason`` and prefix it with a fixed subject."""

    _subject = "error"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{self._subject}: {reason}")


class InvalidKey(_ReasonError):
    """Private or public key bytes are unreadable, or the key type is unsupported."""

    _subject = "invalid key"


class BundleError(_ReasonError):
    """Bundle bytes (PEM, DER, JWKS or SPIFFE bundle) are malformed."""

    _subject = "invalid bundle"


class X509SvidError(_ReasonError):
    """An X509-SVID (or its chain) was refused; ``reason`` says why."""

    _subject = "invalid X509-SVID"


class InvalidX509Svid(X509SvidError):
    """The X509-SVID is malformed: unparsable, bad shape, or the key does not match."""


class NoUriSan(InvalidX509Svid):
    """The leaf certificate has no URI SAN, so it carries no SPIFFE ID."""


class MultipleUriSans(InvalidX509Svid):
    """The leaf certificate has more than one URI SAN; exactly one is allowed."""


class LeafIsCa(InvalidX509Svid):
    """The leaf certificate has ``cA=true`` (or no basic constraints saying otherwise)."""


class BadKeyUsage(InvalidX509Svid):
    """The leaf's key usage misses digitalSignature or sets keyCertSign/cRLSign."""


class SigningCertNotCa(InvalidX509Svid):
    """A signing (intermediate) certificate is not a CA, lacks keyCertSign, or has a path."""


class X509SvidExpired(X509SvidError):
    """A certificate in the chain is past its NotAfter."""


class X509SvidNotYetValid(X509SvidError):
    """A certificate in the chain is before its NotBefore."""


class UntrustedChain(X509SvidError):
    """No bundle for the trust domain, or the chain does not lead to one of its authorities."""


class JwtSvidError(_ReasonError):
    """A JWT-SVID was refused; ``reason`` says why."""

    _subject = "invalid JWT-SVID"


class InvalidJwtSvid(JwtSvidError):
    """The token is malformed, or a required header or claim is missing or wrong."""


class UnsupportedJwtAlgorithm(JwtSvidError):
    """The ``alg`` header is not one of RS/ES/PS 256/384/512."""


class JwtSvidExpired(JwtSvidError):
    """The ``exp`` claim is in the past (beyond the allowed leeway)."""


class JwtAudienceMismatch(JwtSvidError):
    """None of the expected audiences is in the ``aud`` claim."""


class JwtIssuerMismatch(JwtSvidError):
    """The caller asked for an issuer and the ``iss`` claim is missing or another one."""


class JwtSvidRevoked(JwtSvidError):
    """The token's ``jti`` is in the revocation list the caller gave."""


class UntrustedJwtSvid(JwtSvidError):
    """No bundle for the token's trust domain, or its signature does not verify."""


class UnknownJwtKey(UntrustedJwtSvid):
    """The ``kid`` header names no key in the trust domain's JWT bundle."""


# --- Workload API client errors (credo.workload_client) ---------------------------------
#
#   CredoError
#   ├── InvalidWorkloadApiEndpoint (also ValueError)  not a Workload API socket address
#   └── WorkloadApiError                              the Workload API call failed


class InvalidWorkloadApiEndpoint(CredoError, ValueError):
    """The Workload API address is not ``unix:///abs/path``, ``unix:/abs/path`` or ``tcp://IP:port``."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid Workload API endpoint {text[:200]!r}: {reason}")


class WorkloadApiError(CredoError):
    """A Workload API call failed; ``code`` is the gRPC status name (``PERMISSION_DENIED``)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"workload API call failed ({code}): {message}")


__all__ += ["InvalidWorkloadApiEndpoint", "WorkloadApiError"]


# --- configuration (both processes) -----------------------------------------------------
#
#   CredoError
#   └── ConfigError (also ValueError)                 a setting is missing, unknown or bad


class ConfigError(CredoError, ValueError):
    """A setting is missing, unknown or out of range; the message names it by its TOML key
    (``agent.workload_attestor.unix.workload_size_limit: must be >= 0``)."""


__all__ += ["ConfigError"]


# --- WIT-SVIDs and Workload Proof Tokens (credo.witsvid, credo.wpt) ----------------------
#
#   CredoError
#   └── WitSvidError (also ValueError)                a WIT-SVID or its proof was refused
#       ├── InvalidWitSvid                            malformed header, claims or cnf key
#       ├── WitSvidExpired                            exp is in the past (or nbf ahead)
#       ├── UntrustedWitSvid                          no WIT bundle / unknown kid / bad signature
#       ├── WitSvidRevoked                            its jti is in the revocation list given
#       └── InvalidWorkloadProof                      the Workload Proof Token was refused


class WitSvidError(_ReasonError):
    """A WIT-SVID (or the proof of possession that must come with it) was refused."""

    _subject = "invalid WIT-SVID"


class InvalidWitSvid(WitSvidError):
    """The token is malformed, or a required header, claim or ``cnf`` key is missing or wrong."""


class WitSvidExpired(WitSvidError):
    """The ``exp`` claim is in the past, or ``nbf`` in the future (beyond the leeway)."""


class UntrustedWitSvid(WitSvidError):
    """No WIT bundle for the token's trust domain, no key for its ``kid``, or a bad signature."""


class WitSvidRevoked(WitSvidError):
    """The token's ``jti`` is in the revocation source the verifier passed (the server's
    signed list at ``/jwt-revocations`` carries revoked WIT-SVIDs with the JWTs)."""


class InvalidWorkloadProof(WitSvidError):
    """The Workload Proof Token is malformed, expired, for another audience, not bound to
    the WIT (``wth``) or to the tokens sent with it (``ath``/``tth``/``oth``), or not signed
    with the WIT's ``cnf`` key."""

    _subject = "invalid workload proof token"


__all__ += [
    "InvalidWitSvid",
    "InvalidWorkloadProof",
    "UntrustedWitSvid",
    "WitSvidError",
    "WitSvidExpired",
    "WitSvidRevoked",
]


# --- delegated access tokens (credo.access_token) -----------------------------------------
#
#   CredoError
#   ├── AccessTokenError (also ValueError)            an access token was refused
#   │   ├── InvalidAccessToken                        malformed, wrong typ/iss, bad claims
#   │   ├── AccessTokenExpired                        exp is in the past (or nbf/iat future)
#   │   ├── AccessTokenAudienceMismatch               aud is not the expected audience
#   │   ├── InsufficientScope                         a required scope is not granted
#   │   └── UntrustedAccessToken                      unknown key or bad signature
#   └── AccessTokenKeysUnavailable                    the issuer's keys could not be fetched


class AccessTokenError(_ReasonError):
    """A delegated access token (RFC 9068 JWT from Credo's token endpoint) was refused."""

    _subject = "access token refused"


class InvalidAccessToken(AccessTokenError):
    """Not a JWT access token of the expected issuer, or its claims are malformed."""


class AccessTokenExpired(AccessTokenError):
    """``exp`` is in the past, or ``nbf``/``iat`` in the future."""


class AccessTokenRevoked(AccessTokenError):
    """The token's ``jti`` is in the revocation source (signed list or introspection)."""


class AccessTokenAudienceMismatch(AccessTokenError):
    """``aud`` does not name the resource server."""


class InsufficientScope(AccessTokenError):
    """The token does not grant every required scope; ``missing`` lists them."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(f"scope {' '.join(missing)} is not granted")


class UntrustedAccessToken(AccessTokenError):
    """Signed by a key the issuer does not publish, or the signature does not verify."""


class AccessTokenKeysUnavailable(CredoError):
    """The issuer's metadata or JWKS could not be fetched; the token was not checked."""


__all__ += [
    "AccessTokenAudienceMismatch",
    "AccessTokenError",
    "AccessTokenExpired",
    "AccessTokenKeysUnavailable",
    "AccessTokenRevoked",
    "InsufficientScope",
    "InvalidAccessToken",
    "UntrustedAccessToken",
]


# --- token exchange client (credo.token_exchange) -----------------------------------------
#
#   CredoError
#   └── TokenExchangeRefused                          the token endpoint refused the exchange


class TokenExchangeRefused(CredoError):
    """The token endpoint refused the exchange: ``error`` (RFC 6749 code), ``description``."""

    def __init__(self, status: int, error: str, description: str) -> None:
        self.status = status
        self.error = error
        self.description = description
        super().__init__(f"token exchange refused ({error}): {description}")


__all__ += ["TokenExchangeRefused"]
