"""OIDC discovery for JWT-SVIDs: independent OIDC clients find the keys from the issuer URL.

A relying party that never saw a Credo server (here PyJWT's ``PyJWKClient`` and joserfc,
as AWS/GCP/Azure would) is given only ``jwt_issuer``, fetches discovery and the JWKS over
real HTTPS from a running ``credo-server``, and verifies a JWT-SVID a workload fetched
through the Workload API with py-spiffe, before and after a JWT key rotation.
"""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import jwt
import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    credo_agent_command,
    free_port,
    start_agent,
    start_server,
    wait_for,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
WORKLOAD = "spiffe://example.org/ai/pr-reviewer"
AUDIENCE = "sts.amazonaws.com"


def get_json(url: str, trust: ssl.SSLContext, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, context=trust, timeout=10) as response:
        return response.status, dict(response.headers), json.loads(response.read())


def fetch_token(agent: AgentProcess, audience: str) -> str:
    with agent.client() as client:
        return str(client.fetch_jwt_svid(audience={audience}).token)


def verify_with_pyjwt(token: str, issuer: str, audience: str, trust: ssl.SSLContext) -> Any:
    """What a relying party does: discovery from the issuer alone, then the JWKS, then verify."""
    _, _, meta = get_json(f"{issuer}/.well-known/openid-configuration", trust)
    keys = jwt.PyJWKClient(meta["jwks_uri"], ssl_context=trust, cache_jwk_set=False)
    key = keys.get_signing_key_from_jwt(token)
    return jwt.decode(
        token,
        key.key,
        algorithms=meta["id_token_signing_alg_values_supported"],
        audience=audience,
        issuer=meta["issuer"],
        options={"require": ["exp", "iat", "iss", "sub", "aud", "jti"]},
    )


def verify_with_joserfc(token: str, jwks_uri: str, trust: ssl.SSLContext) -> Any:
    _, _, jwks = get_json(jwks_uri, trust)
    return jose_jwt.decode(token, KeySet.import_key_set(jwks)).claims


def authority(server: ServerProcess, slot: str) -> str:
    return str(server.cli_json("localauthority", "jwt", "show")[slot]["authority_id"])


@pytest.mark.slow
def test_oidc_clients_verify_jwt_svids_across_a_jwt_key_rotation(
    tmp_path: Path, root: Path
) -> None:
    """PyJWT's PyJWKClient and joserfc, given only the issuer URL, verify a py-spiffe
    JWT-SVID; after a JWT key rotation old and new tokens both verify, until the old key
    leaves the bundle."""
    port = free_port()
    issuer = f"https://localhost:{port}"
    with (
        start_server(tmp_path, http_bind_address=f"127.0.0.1:{port}", jwt_issuer=issuer) as server,
        start_agent(server, root) as agent,
    ):
        create_entry(server, agent.spiffe_id, WORKLOAD)
        wait_for(agent.fetch_ids, 30, "the SVID")
        trust = ssl.create_default_context(cadata=server.bundle_pem())

        status, headers, meta = get_json(f"{issuer}/.well-known/openid-configuration", trust)
        assert status == 200
        assert meta["issuer"] == issuer
        assert meta["jwks_uri"] == f"{issuer}/keys"
        assert meta["id_token_signing_alg_values_supported"] == ["ES256"]
        assert meta["response_types_supported"] == ["id_token"]
        assert meta["subject_types_supported"] == ["public"]
        assert headers["Cache-Control"].startswith("public, max-age=")

        old = fetch_token(agent, AUDIENCE)
        claims = verify_with_pyjwt(old, issuer, AUDIENCE, trust)
        assert claims["sub"] == WORKLOAD
        assert claims["iss"] == issuer
        assert verify_with_joserfc(old, meta["jwks_uri"], trust)["sub"] == WORKLOAD

        # ETag: an unchanged JWKS is a 304; the rotation changes it.
        _, keys_headers, jwks = get_json(meta["jwks_uri"], trust)
        assert all(k["use"] == "sig" and k["kid"] and k["alg"] == "ES256" for k in jwks["keys"])
        with pytest.raises(urllib.error.HTTPError) as not_modified:
            get_json(meta["jwks_uri"], trust, {"If-None-Match": keys_headers["ETag"]})
        assert not_modified.value.code == 304

        old_kid = authority(server, "active")
        new_kid = server.cli_json("localauthority", "jwt", "prepare")["authority_id"]
        # The prepared key is published before it signs anything.
        _, rotated_headers, jwks = get_json(meta["jwks_uri"], trust)
        assert {old_kid, new_kid} <= {k["kid"] for k in jwks["keys"]}
        assert rotated_headers["ETag"] != keys_headers["ETag"]
        server.cli_json("localauthority", "jwt", "activate", "--authority-id", new_kid)

        new = fetch_token(agent, "https://api.openai.example")
        assert jwt.get_unverified_header(new)["kid"] == new_kid
        assert jwt.get_unverified_header(old)["kid"] == old_kid
        assert (
            verify_with_pyjwt(new, issuer, "https://api.openai.example", trust)["sub"] == WORKLOAD
        )
        assert verify_with_pyjwt(old, issuer, AUDIENCE, trust)["sub"] == WORKLOAD

        server.cli_json("localauthority", "jwt", "taint", "--authority-id", old_kid)
        server.cli_json("localauthority", "jwt", "revoke", "--authority-id", old_kid)
        _, _, jwks = get_json(meta["jwks_uri"], trust)
        assert old_kid not in {k["kid"] for k in jwks["keys"]}
        with pytest.raises(jwt.PyJWKClientError):
            verify_with_pyjwt(old, issuer, AUDIENCE, trust)
        assert verify_with_pyjwt(new, issuer, "https://api.openai.example", trust)

        # credo's own validation checks iss only when asked for one.
        result = subprocess.run(
            [
                *credo_agent_command(),
                "api",
                "validate",
                "jwt",
                "--socket",
                str(agent.socket),
                "--audience",
                "https://api.openai.example",
                "--issuer",
                "https://someone-else.example",
                "--svid",
                "-",
            ],
            input=new,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1
        assert "is not the expected" in result.stderr


def test_discovery_is_off_without_jwt_issuer_but_the_jwks_is_served(tmp_path: Path) -> None:
    """Without jwt_issuer there is no issuer to describe: discovery is a JSON 404, and
    /keys still serves the JWT authorities."""
    with start_server(tmp_path, http_bind_address="127.0.0.1:0") as server:
        trust = ssl.create_default_context(cadata=server.bundle_pem())
        with pytest.raises(urllib.error.HTTPError) as missing:
            get_json(f"{server.http_url}/.well-known/openid-configuration", trust)
        assert missing.value.code == 404
        assert "jwt_issuer" in json.loads(missing.value.read())["error_description"]
        _, _, jwks = get_json(f"{server.http_url}/keys", trust)
        assert len(jwks["keys"]) >= 1


class FakeModelApi(http.server.BaseHTTPRequestHandler):
    """A model provider's token endpoint: verifies the subject JWT through the issuer's
    OIDC discovery (as Anthropic and OpenAI do) and answers an OAuth token response."""

    issuer = ""
    trust: ssl.SSLContext
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body)
        token = body.get("assertion") or body.get("subject_token")
        try:
            claims = verify_with_pyjwt(token, self.issuer, "https://api.anthropic.com", self.trust)
            reply, status = (
                {
                    "access_token": "sk-ant-oat01-fake",
                    "expires_in": 600,
                    "token_type": "Bearer",
                    "sub": claims["sub"],
                },
                200,
            )
        except jwt.PyJWTError as err:
            reply, status = {"error": "invalid_grant", "error_description": str(err)}, 400
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.slow
def test_the_model_api_example_exchanges_a_jwt_svid_offline(tmp_path: Path, root: Path) -> None:
    """docs/examples/model_api_token.py gets a JWT-SVID from the Workload API and exchanges it
    at a (local) token endpoint that trusts the issuer through discovery; the access token is
    not printed unless asked."""
    port = free_port()
    issuer = f"https://localhost:{port}"
    with (
        start_server(tmp_path, http_bind_address=f"127.0.0.1:{port}", jwt_issuer=issuer) as server,
        start_agent(server, root) as agent,
    ):
        create_entry(server, agent.spiffe_id, WORKLOAD)
        wait_for(agent.fetch_ids, 30, "the SVID")
        FakeModelApi.issuer = issuer
        FakeModelApi.trust = ssl.create_default_context(cadata=server.bundle_pem())
        provider = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeModelApi)
        thread = threading.Thread(target=provider.serve_forever, daemon=True)
        thread.start()
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    str(EXAMPLES / "model_api_token.py"),
                    "anthropic",
                    "--audience",
                    "https://api.anthropic.com",
                    "--token-url",
                    f"http://127.0.0.1:{provider.server_port}/v1/oauth/token",
                    "--federation-rule-id",
                    "fdrl_test",
                    "--organization-id",
                    "00000000-0000-0000-0000-000000000000",
                    "--service-account-id",
                    "svac_test",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "SPIFFE_ENDPOINT_SOCKET": agent.endpoint},
            )
        finally:
            provider.shutdown()
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert reply["sub"] == WORKLOAD
        assert reply["spiffe_id"] == WORKLOAD
        assert "access_token" not in reply
        sent = FakeModelApi.seen[-1]
        assert sent["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        assert sent["federation_rule_id"] == "fdrl_test"
