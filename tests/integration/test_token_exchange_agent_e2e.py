"""A workload exchanges a person's token through its node agent: ``credo-agent api exchange``
and ``credo.TokenExchangeClient``, both getting the JWT-SVID from the Workload API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import credo
from tests.helpers.processes import (
    create_entry,
    credo_agent_command,
    short_temp_dir,
    start_agent,
    start_server,
    wait_for,
)

TD = "example.org"
IDP = "https://login.example.com"
GIT = "https://git.example.com"
WORKLOAD = f"spiffe://{TD}/agents/coder"


@pytest.mark.slow
def test_agent_cli_and_client_exchange_as_the_workload(tmp_path: Path) -> None:
    """The workload's own SVID authenticates it; the token names it as actor for alice."""
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key()))
    jwk.update(kid="k1", alg="RS256")
    (tmp_path / "idp.jwks").write_text(json.dumps({"keys": [jwk]}))
    config = tmp_path / "server.toml"
    config.write_text(
        "[server.delegation.issuers.corp]\n"
        f'issuer = "{IDP}"\njwks_file = "{tmp_path / "idp.jwks"}"\naudience = ["credo"]\n'
    )
    now = int(time.time())
    person = jwt.encode(
        {"iss": IDP, "sub": "alice", "aud": "credo", "iat": now, "exp": now + 600},
        idp_key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    subject_file = tmp_path / "alice.jwt"
    subject_file.write_text(person)
    root = short_temp_dir("credo-xchg-", mode=0o755)
    try:
        with start_server(tmp_path, config=config, http_bind_address="127.0.0.1:0") as server:
            server.cli_json(
                "delegation", "create", "--agent-id", WORKLOAD, "--subject-issuer", "corp",
                "--scope", "repo:read", "--scope", "repo:write", "--audience", GIT,
            )  # fmt: skip
            endpoint = f"{server.http_url}/oauth2/token"
            with start_agent(server, root) as agent:
                create_entry(server, agent.spiffe_id, WORKLOAD, extra=["--owner", "alice@x.org"])
                wait_for(lambda: agent.fetch_ids() == [WORKLOAD], 60, "the SVID")
                env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": agent.endpoint}
                result = subprocess.run(
                    [*credo_agent_command(), "api", "exchange", "--token-endpoint", endpoint,
                     "--subject-token", "-", "--audience", GIT, "--scope", "repo:read",
                     "--output", "json"],
                    input=person, capture_output=True, text=True, timeout=60, env=env,
                )  # fmt: skip
                assert result.returncode == 0, result.stderr
                answer = json.loads(result.stdout)
                claims = jwt.decode(answer["access_token"], options={"verify_signature": False})
                assert (claims["sub"], claims["act"], claims["scope"]) == (
                    "alice",
                    {"sub": WORKLOAD},
                    "repo:read",
                )
                assert claims["credo_owner"] == "alice@x.org"
                refused = subprocess.run(
                    [*credo_agent_command(), "api", "exchange", "--token-endpoint", endpoint,
                     "--subject-token", str(subject_file), "--audience", "https://nope"],
                    capture_output=True, text=True, timeout=60, env=env,
                )  # fmt: skip
                assert refused.returncode != 0
                assert "invalid_target" in refused.stderr and "Traceback" not in refused.stderr
                client = credo.TokenExchangeClient(endpoint, workload_api=agent.endpoint)
                token = client.exchange(person, audience=GIT, scope=["repo:write"])
                assert token.scope == "repo:write" and token.expires_in > 0
                assert "eyJ" not in repr(token)
    finally:
        shutil.rmtree(root, ignore_errors=True)
