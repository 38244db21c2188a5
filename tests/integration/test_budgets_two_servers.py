"""Budgets across two ``credo-server`` processes sharing one PostgreSQL database: agents
racing both servers for the last units get exactly the budget, never one token more."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers.processes import create_entry, start_server, wait_for

psycopg = pytest.importorskip("psycopg")

TD = "example.org"
IDP = "https://login.example.com"
GIT = "https://git.example.com"
AGENT = f"spiffe://{TD}/agents/racer"
ADMIN_URL = os.environ.get("CREDO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test; dropped afterwards."""
    try:
        conn = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}".splitlines()[0])
    name = f"credo_budget_{secrets.token_hex(6)}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.slow
@pytest.mark.postgres
def test_two_servers_racing_for_a_budget_grant_exactly_the_limit(
    tmp_path: Path, database_url: str
) -> None:
    """*=10/1h, 40 exchanges spread over both servers at once: exactly 10 succeed."""
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key()))
    jwk.update(kid="k1", alg="RS256")
    (tmp_path / "idp.jwks").write_text(json.dumps({"keys": [jwk]}))
    config = tmp_path / "server.toml"
    config.write_text(
        "[server.delegation.issuers.corp]\n"
        f'issuer = "{IDP}"\njwks_file = "{tmp_path / "idp.jwks"}"\naudience = ["credo"]\n'
    )
    flags: dict[str, Any] = {
        "config": config,
        "datastore": database_url,
        "http_bind_address": "127.0.0.1:0",
    }
    with (
        start_server(tmp_path, data_dir=tmp_path / "a", **flags) as a,
        start_server(tmp_path, data_dir=tmp_path / "b", **flags) as b,
    ):
        create_entry(a, f"spiffe://{TD}/host", AGENT)
        a.cli_json(
            "delegation", "create", "--agent-id", AGENT, "--subject-issuer", "corp",
            "--scope", "repo:read", "--audience", GIT, "--budget", "*=10/1h",
        )  # fmt: skip
        # Both CAs in one file: the union bundle once both servers have published.
        wait_for(lambda: a.bundle_pem().count("BEGIN CERTIFICATE") >= 2, 30, "the union bundle")
        ca_file = tmp_path / "bundle.pem"
        ca_file.write_text(a.bundle_pem())
        minted = a.cli_json("x509", "mint", "--spiffe-id", AGENT)
        cert, key = tmp_path / "racer.pem", tmp_path / "racer.key"
        cert.write_text(minted["x509_svid"])
        key.write_text(minted["private_key"])
        now = int(time.time())
        person = jwt.encode(
            {"iss": IDP, "sub": "alice", "aud": "credo", "iat": now, "exp": now + 600},
            idp_key,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": person,
            "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
            "audience": GIT,
        }
        urls = [f"{s.http_url}/oauth2/token" for s in (a, b)]
        # B trusts A's CA (and so the racer's SVID) once its bundle cache (1 s) has it.
        wait_for(
            lambda: requests.post(
                urls[1], data={**form, "audience": "https://probe"},
                cert=(str(cert), str(key)), verify=str(ca_file), timeout=10,
            ).json()["error"] == "invalid_target",
            30, "server B to authenticate the racer",
        )  # fmt: skip

        def exchange(i: int) -> int:
            response = requests.post(
                urls[i % 2], data=form, cert=(str(cert), str(key)), verify=str(ca_file), timeout=30
            )
            if response.status_code != 200:
                assert response.json()["error"] == "unauthorized_client", response.text
            return response.status_code

        with ThreadPoolExecutor(max_workers=20) as pool:
            statuses = list(pool.map(exchange, range(40)))
        assert statuses.count(200) == 10, statuses
        (policy,) = b.cli_json("delegation", "list")["policies"]
        (use,) = b.cli_json("delegation", "budget", "show", "--id", policy["id"])["budgets"]
        assert (use["used"], use["remaining"], use["refused"]) == (10, 0, 30)
