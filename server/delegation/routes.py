"""The authorization server's endpoints on the HTTP front end (thin: parse, call, render).

========================================  ==========================================
``POST /oauth2/token``                    RFC 8693 token exchange (form-encoded)
``POST /oauth2/introspect``               RFC 7662 introspection, for allowed SPIFFE IDs
``POST /oauth2/revoke``                   RFC 7009 revocation of a delegated token (by an
                                          agent, or by the person with their own token)
``GET /oauth2/jwks``                      the keys that sign access tokens (JWKS)
``GET /.well-known/oauth-authorization-server``  RFC 8414 metadata
========================================  ==========================================

Refusals are :class:`~server.delegation.errors.OAuthError`\\ s from the exchange, rendered
here into the front end's one error shape (``{"error", "error_description"}``), with
``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Collection, Mapping
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509

from credo.bundle import public_key_to_jwk
from credo.keys import jwt_algorithm_for
from server import audit
from server.datastore.errors import NotFound
from server.delegation.errors import (
    InvalidClient,
    InvalidRequest,
    OAuthError,
    UnauthorizedClient,
)
from server.delegation.exchange import (
    ACCESS_TOKEN_TYPE,
    AT_JWT,
    GRANT_TYPE,
    JWT_SPIFFE_ASSERTION,
    SUBJECT_ISSUER_CLAIM,
    SUBJECT_TOKEN_TYPES,
    TOKEN_PATH,
    TokenExchange,
    actor_chain,
)
from server.delegation.subjects import check_times, unverified_claims
from server.http import HttpError, json_response

__all__ = ["INTROSPECT_PATH", "JWKS_PATH", "METADATA_PATH", "REVOKE_PATH", "delegation_routes"]

INTROSPECT_PATH = "/oauth2/introspect"
REVOKE_PATH = "/oauth2/revoke"
JWKS_PATH = "/oauth2/jwks"
METADATA_PATH = "/.well-known/oauth-authorization-server"
_FORM = "application/x-www-form-urlencoded"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _http_error(err: OAuthError) -> HttpError:
    return HttpError(err.status, err.description, error=err.error, headers=_NO_STORE)


def peer_chain(request: web.Request) -> list[x509.Certificate] | None:
    """The client certificate the TLS handshake verified (mutual TLS), or None."""
    tls = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = tls.getpeercert(binary_form=True) if tls is not None else None
    return [_certificate(der)] if der else None


@functools.lru_cache(maxsize=1024)
def _certificate(der: bytes) -> x509.Certificate:
    """The parsed certificate (a keep-alive client presents the same one on every request)."""
    return x509.load_der_x509_certificate(der)


async def _form_fields(request: web.Request) -> list[tuple[str, str]]:
    if request.content_type != _FORM:
        raise _http_error(InvalidRequest(f"the request body must be {_FORM}"))
    try:
        form = await request.post()
    except ValueError:
        raise _http_error(InvalidRequest("the request body is not a valid form")) from None
    fields: list[tuple[str, str]] = []
    for name, value in form.items():
        if not isinstance(value, str):
            raise _http_error(InvalidRequest(f"{name[:64]} must be a form value, not a file"))
        fields.append((name, value))
    return fields


class DelegationEndpoints:
    """The handlers; ``exchange`` does the work, ``introspection_allowed`` guards introspect."""

    def __init__(self, exchange: TokenExchange, introspection_allowed: Collection[str]) -> None:
        self.exchange = exchange
        self.introspection_allowed = frozenset(introspection_allowed)

    async def token(self, request: web.Request) -> web.StreamResponse:
        fields = await _form_fields(request)
        try:
            result = await asyncio.to_thread(
                self.exchange.exchange, fields, peer_chain=peer_chain(request)
            )
        except OAuthError as err:
            raise _http_error(err) from None
        return json_response(result.response, headers=_NO_STORE)

    def _introspect(
        self, fields: list[tuple[str, str]], chain: list[x509.Certificate] | None
    ) -> dict[str, Any]:
        form = self.exchange.parse_form(fields)
        caller = self.exchange.authenticate(form, chain)
        if str(caller) not in self.introspection_allowed:
            raise InvalidClient(
                f"{caller} may not introspect tokens; add it to "
                "[server.delegation] introspection_allowed"
            )
        token = form.get("token")
        if not token:
            raise InvalidRequest("token is required")
        return self.introspect_token(token)

    def introspect_token(self, token: str) -> dict[str, Any]:
        """RFC 7662: ``{"active": false}`` for anything not a live, unrevoked token of this
        server."""
        inactive: dict[str, Any] = {"active": False}
        claims = self._verified_claims(token)
        if claims is None:
            return inactive
        recorded = self.exchange.datastore.fetch_delegated_token(str(claims.get("jti", "")))
        if recorded is not None and recorded.revoked_at:
            return inactive
        out = {"active": True, "token_type": "Bearer"}
        for name in ("sub", "act", "scope", "exp", "iat", "client_id", "aud", "iss", "jti"):
            if name in claims:
                out[name] = claims[name]
        if "credo_owner" in claims:
            out["credo_owner"] = claims["credo_owner"]
        return out

    def _verified_claims(self, token: str) -> dict[str, Any] | None:
        """The claims of a live access token signed by this server, else None."""
        inactive = None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return inactive
        if header.get("typ") != AT_JWT:
            return inactive
        key = self.exchange.bundle().jwt_bundle().get_key(str(header.get("kid", "")))
        if key is None:
            return inactive
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[jwt_algorithm_for(key)],
                issuer=self.exchange.issuer(),
                options={
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp", "sub", "act"],
                },
            )
            check_times(claims, self.exchange.clock(), 0, "token")
        except (jwt.PyJWTError, OAuthError):
            return inactive
        return dict(claims)

    def _revoke(self, fields: list[tuple[str, str]], chain: list[x509.Certificate] | None) -> None:
        """RFC 7009: the caller may revoke a token issued to it (``client_id``), one whose
        chain it is in, or one issued for it (``aud``); unknown or dead tokens are no error.

        A person (no client credentials) authenticates with ``subject_token``: their own
        token from a trusted subject issuer, as at the token endpoint. They may revoke a
        token issued on their behalf (same ``sub`` and subject issuer)."""
        form = self.exchange.parse_form(fields)
        person: tuple[str, str] | None = None
        if chain is None and "client_assertion" not in form and "subject_token" in form:
            person = self._person(form["subject_token"])
            actor = audit.Actor("person", person[0])
        else:
            caller = self.exchange.authenticate(form, chain)
            actor = audit.Actor("workload", str(caller))
        token = form.get("token")
        if not token:
            raise InvalidRequest("token is required")
        hint = form.get("token_type_hint")
        if hint is not None and hint not in ("access_token", "refresh_token"):
            raise InvalidRequest("token_type_hint must be access_token")
        claims = self._verified_claims(token)
        if claims is None or not isinstance(claims.get("jti"), str):
            return  # RFC 7009 2.2: an invalid token is no error
        if person is not None:
            if (claims.get("sub"), claims.get(SUBJECT_ISSUER_CLAIM)) != person:
                raise UnauthorizedClient(
                    f"{person[0]} may not revoke this token: it was not issued on their behalf"
                )
        else:
            aud = claims.get("aud")
            audiences = aud if isinstance(aud, list) else [aud]
            if actor.id not in (*actor_chain(claims.get("act")), *audiences):
                raise UnauthorizedClient(
                    f"{actor.id} may not revoke this token: it was not issued to or for {actor.id}"
                )
        try:
            with audit.acting_as(actor):
                self.exchange.datastore.revoke_delegated_token(
                    str(claims["jti"]), f"revoked by {actor.kind} {actor.id} (RFC 7009)"
                )
        except NotFound:
            return

    def _person(self, subject_token: str) -> tuple[str, str]:
        """(sub, issuer) of a person's own token from a trusted subject issuer; a token this
        server issued is not a person's credential (InvalidClient / InvalidGrant)."""
        iss = unverified_claims(subject_token).get("iss")
        if iss == self.exchange.issuer():
            raise InvalidClient(
                "subject_token must be the person's own token from their identity provider, "
                "not a token this server issued"
            )
        issuer = self.exchange.subjects.for_iss(iss)
        verified = issuer.verify(subject_token)
        return verified.sub, issuer.config.issuer

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        fields = await _form_fields(request)
        try:
            await asyncio.to_thread(self._revoke, fields, peer_chain(request))
        except OAuthError as err:
            raise _http_error(err) from None
        return web.Response(status=200, headers=_NO_STORE)

    async def introspect(self, request: web.Request) -> web.StreamResponse:
        fields = await _form_fields(request)
        try:
            body = await asyncio.to_thread(self._introspect, fields, peer_chain(request))
        except OAuthError as err:
            raise _http_error(err) from None
        return json_response(body, headers=_NO_STORE)

    async def jwks(self, request: web.Request) -> web.StreamResponse:
        bundle = await asyncio.to_thread(self.exchange.bundle)
        keys = []
        for kid, key in sorted(bundle.jwt_authorities.items()):
            jwk = public_key_to_jwk(key)
            jwk.update(kid=kid, use="sig", alg=jwt_algorithm_for(key))
            keys.append(jwk)
        return json_response({"keys": keys}, cache_control="max-age=60")

    def metadata_document(self) -> Mapping[str, Any]:
        base = self.exchange.issuer().rstrip("/")
        return {
            "issuer": self.exchange.issuer(),
            "token_endpoint": base + TOKEN_PATH,
            "introspection_endpoint": base + INTROSPECT_PATH,
            "revocation_endpoint": base + REVOKE_PATH,
            "revocation_endpoint_auth_methods_supported": ["spiffe_jwt", "tls_client_auth"],
            "jwks_uri": base + JWKS_PATH,
            "grant_types_supported": [GRANT_TYPE],
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": ["spiffe_jwt", "tls_client_auth"],
            "client_assertion_types_supported": [JWT_SPIFFE_ASSERTION],
            "introspection_endpoint_auth_methods_supported": ["spiffe_jwt", "tls_client_auth"],
            "token_endpoint_auth_signing_alg_values_supported": ["ES256", "ES384", "RS256"],
            "subject_token_types_supported": list(SUBJECT_TOKEN_TYPES),
            "issued_token_types_supported": [ACCESS_TOKEN_TYPE],
        }

    async def metadata(self, request: web.Request) -> web.StreamResponse:
        return json_response(dict(self.metadata_document()), cache_control="max-age=300")


def delegation_routes(endpoints: DelegationEndpoints) -> list[web.AbstractRouteDef]:
    """The routes to add to the HTTP front end."""
    return [
        web.post(TOKEN_PATH, endpoints.token),
        web.post(INTROSPECT_PATH, endpoints.introspect),
        web.post(REVOKE_PATH, endpoints.revoke),
        web.get(JWKS_PATH, endpoints.jwks),
        web.get(METADATA_PATH, endpoints.metadata),
    ]
