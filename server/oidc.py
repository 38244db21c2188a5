"""OIDC discovery for JWT-SVIDs: ``/.well-known/openid-configuration`` and the JWKS.

What a relying party that never saw a Credo server (AWS IAM, GCP workload identity
federation, Azure federated credentials, a model API) needs to trust JWT-SVIDs: given the
issuer URL (``jwt_issuer``, the ``iss`` of every JWT-SVID), it fetches

* ``<issuer>/.well-known/openid-configuration`` (OpenID Connect Discovery 1.0, 3):
  ``issuer``, ``jwks_uri`` (``<issuer>/keys``, SPIRE's path),
  ``id_token_signing_alg_values_supported`` (the algorithms of the keys in the bundle),
  ``response_types_supported = ["id_token"]``, ``subject_types_supported = ["public"]``,
  ``claims_supported``; served only when ``jwt_issuer`` is set (there is no issuer
  otherwise);
* ``<issuer>/keys``: every JWT authority of the trust domain's bundle as a plain RFC 7517
  JWK (``use: sig``, ``kid``, ``alg``): the prepared key (published before it signs
  anything), the active one, and old ones until they leave the bundle, so a token signed
  just before a rotation still verifies.

Both answer with ``Cache-Control: public, max-age=<spiffe_refresh_hint>`` (a tenth of the
key lifetime, at most 5 minutes: far shorter than the time between a key's publication and
its first signature, so caches always hold the next key in time), an ``ETag`` (a hash of
the body) honoured by ``If-None-Match`` (304), and ``Access-Control-Allow-Origin: *``.
The routes are added to the HTTP front end by ``server/app.py`` with :func:`oidc_routes`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from credo.bundle import Bundle, public_key_to_jwk
from credo.keys import jwt_algorithm_for
from server.http import HttpError

__all__ = ["DISCOVERY_PATH", "JWKS_PATH", "discovery_document", "jwks_document", "oidc_routes"]

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/keys"
_MAX_AGE_DEFAULT = 300
_CLAIMS = ["sub", "aud", "exp", "iat", "iss", "jti"]


def jwks_document(bundle: Bundle) -> dict[str, Any]:
    """Every JWT authority of ``bundle`` as an RFC 7517 JWK Set for OIDC relying parties."""
    keys = []
    for kid, key in sorted(bundle.jwt_authorities.items()):
        keys.append(
            {**public_key_to_jwk(key), "use": "sig", "kid": kid, "alg": jwt_algorithm_for(key)}
        )
    return {"keys": keys}


def discovery_document(issuer: str, bundle: Bundle) -> dict[str, Any]:
    """The OpenID Provider Metadata of ``issuer`` for the keys in ``bundle``."""
    algorithms = sorted({jwt_algorithm_for(k) for k in bundle.jwt_authorities.values()})
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}{JWKS_PATH}",
        # No authorization endpoint: tokens come from the Workload API. Relying parties
        # still expect the key, and these two lists, to be present.
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms or ["ES256"],
        "claims_supported": _CLAIMS,
        "scopes_supported": ["openid"],
    }


def _cached_json(request: web.Request, doc: dict[str, Any], max_age: int) -> web.StreamResponse:
    body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {
        "Cache-Control": f"public, max-age={max_age}",
        "ETag": etag,
        "Access-Control-Allow-Origin": "*",
    }
    if etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)


def oidc_routes(own_bundle: Callable[[], Bundle], jwt_issuer: str) -> list[web.RouteDef]:
    """The discovery and JWKS routes. ``own_bundle`` reads the trust domain's bundle (it may
    block: it is called in a worker thread); ``jwt_issuer`` may be "" (JWKS only)."""

    async def bundle() -> Bundle:
        return await asyncio.to_thread(own_bundle)

    def max_age(b: Bundle) -> int:
        return b.refresh_hint if b.refresh_hint else _MAX_AGE_DEFAULT

    async def keys(request: web.Request) -> web.StreamResponse:
        b = await bundle()
        return _cached_json(request, jwks_document(b), max_age(b))

    async def discovery(request: web.Request) -> web.StreamResponse:
        if not jwt_issuer:
            raise HttpError(
                404, "OIDC discovery is off: the server has no jwt_issuer", error="not_found"
            )
        b = await bundle()
        return _cached_json(request, discovery_document(jwt_issuer, b), max_age(b))

    paths = {""}
    # An issuer with a path (https://example.org/tenant) has its documents under that path
    # (OpenID Connect Discovery 1.0, 4.1); a proxy may also strip it: serve both.
    issuer_path = urlsplit(jwt_issuer).path.rstrip("/") if jwt_issuer else ""
    if issuer_path:
        paths.add(issuer_path)
    routes = []
    for prefix in sorted(paths):
        routes.append(web.get(prefix + DISCOVERY_PATH, discovery, allow_head=True))
        routes.append(web.get(prefix + JWKS_PATH, keys, allow_head=True))
    return routes
