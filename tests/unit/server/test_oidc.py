"""OIDC discovery documents and their routes (server/oidc.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from aiohttp import web

from credo import Bundle, KeyType, generate_private_key
from server.http import HttpConfig, HttpFrontend
from server.oidc import discovery_document, jwks_document, oidc_routes
from server.telemetry import Metrics

EC = generate_private_key(KeyType.EC_P384).public_key()
RSA = generate_private_key(KeyType.RSA_2048).public_key()
BUNDLE = Bundle("example.org", (), {"ec": EC, "rsa": RSA}, sequence_number=3, refresh_hint=20)


def test_jwks_lists_every_jwt_authority_for_signature_checks() -> None:
    """Each JWT authority becomes a JWK with use=sig, its kid and the alg it signs with."""
    keys = {k["kid"]: k for k in jwks_document(BUNDLE)["keys"]}
    assert set(keys) == {"ec", "rsa"}
    assert (keys["ec"]["kty"], keys["ec"]["crv"], keys["ec"]["alg"]) == ("EC", "P-384", "ES384")
    assert (keys["rsa"]["kty"], keys["rsa"]["alg"]) == ("RSA", "RS256")
    assert all(k["use"] == "sig" and "x5c" not in k for k in keys.values())


def test_discovery_names_the_issuer_jwks_and_algorithms_in_use() -> None:
    """The metadata carries what relying parties require, algorithms from the bundle."""
    doc = discovery_document("https://oidc.example.org", BUNDLE)
    assert doc["issuer"] == "https://oidc.example.org"
    assert doc["jwks_uri"] == "https://oidc.example.org/keys"
    assert doc["id_token_signing_alg_values_supported"] == ["ES384", "RS256"]
    assert doc["response_types_supported"] == ["id_token"]
    assert doc["subject_types_supported"] == ["public"]


def test_an_issuer_with_a_path_is_served_under_that_path(tmp_path: Path) -> None:
    """https://host/tenant-a has its discovery at /tenant-a/.well-known/... (and at the
    root, for a proxy that strips the path); max-age follows spiffe_refresh_hint."""

    async def body() -> None:
        frontend = HttpFrontend(
            HttpConfig(bind_address="127.0.0.1:0", insecure_http=True),
            certificate=None,
            metrics=Metrics(),
            data_dir=tmp_path,
        )
        frontend.add_routes(oidc_routes(lambda: BUNDLE, "https://x.org/tenant-a"))
        await frontend.start()
        try:
            async with aiohttp.ClientSession() as session:
                for path in (
                    "/tenant-a/.well-known/openid-configuration",
                    "/.well-known/openid-configuration",
                ):
                    async with session.get(frontend.url + path) as response:
                        assert response.status == 200
                        assert response.headers["Cache-Control"] == "public, max-age=20"
                        assert (
                            json.loads(await response.read())["jwks_uri"]
                            == "https://x.org/tenant-a/keys"
                        )
                async with session.get(frontend.url + "/tenant-a/keys") as response:
                    assert response.status == 200
                    assert response.headers["Access-Control-Allow-Origin"] == "*"
        finally:
            await frontend.close()

    asyncio.run(body())


def test_routes_are_aiohttp_route_defs() -> None:
    """oidc_routes gives route definitions the front end adds (GET and HEAD)."""
    routes = oidc_routes(lambda: BUNDLE, "")
    assert all(isinstance(r, web.RouteDef) for r in routes)
    assert {r.path for r in routes} == {"/.well-known/openid-configuration", "/keys"}
