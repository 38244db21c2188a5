"""`credo-server run --datastore postgresql://...` as a real process on a fresh PostgreSQL database.

Needs PostgreSQL at 127.0.0.1:5432 (user ``postgres``, no password), or ``CREDO_TEST_POSTGRES``
set to another server's admin URL; skipped with the reason if it cannot be reached. Each test
creates its own ``credo_it_<random>`` database and drops it afterwards.

Two servers sharing one database (high availability) are covered in test_server_ha.py.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from credo import Bundle, verify_x509_svid
from credo._proto.credo.server.v1 import agent_pb2, agent_pb2_grpc
from credo.keys import generate_private_key
from tests.helpers.processes import ServerProcess, start_server
from tests.helpers.server import make_csr

psycopg = pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")

TD = "example.org"
ADMIN_URL = os.environ.get("CREDO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin_connection() -> Any:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    try:
        conn = _admin_connection()
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}".splitlines()[0])
    name = f"credo_it_{secrets.token_hex(6)}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fetch_bundle(server: ServerProcess) -> Bundle:
    """`credo-server bundle show --format spiffe`, parsed."""
    result = server.cli("bundle", "show", "--format", "spiffe", output=None)
    assert result.returncode == 0, result.stderr
    return Bundle.parse(TD, result.stdout.encode())


def attest(server: ServerProcess, token: str, bundle: Bundle) -> str:
    """Node-attest with ``token`` over TLS; the agent's SPIFFE ID."""
    target = "localhost:" + server.address.rpartition(":")[2]
    creds = grpc.ssl_channel_credentials(root_certificates=bundle.marshal_pem())
    with grpc.secure_channel(target, creds) as channel:
        resp = agent_pb2_grpc.AgentStub(channel).AttestAgent(
            agent_pb2.AttestAgentRequest(
                attestation_data=agent_pb2.AttestationData(
                    type="join_token", payload=token.encode()
                ),
                csr=make_csr(generate_private_key()),
            ),
            timeout=30,
        )
    chain = [x509.load_der_x509_certificate(c) for c in resp.svid.cert_chain]
    assert str(verify_x509_svid(chain, bundle.x509_bundle())) == resp.svid.spiffe_id
    return str(resp.svid.spiffe_id)


def table_count(database_url: str, table: str) -> int:
    """Rows in ``table``, read straight from PostgreSQL (proof the server wrote there)."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def test_entries_agents_and_bundle_survive_a_restart_on_postgres(
    tmp_path: Path, database_url: str
) -> None:
    """On PostgreSQL, entries, agents, CA and bundle written by the server survive a restart."""
    with start_server(
        tmp_path, trust_domain=TD, datastore=database_url, attestation_rate_limit=100
    ) as server:
        assert not list(server.data_dir.glob("*.sqlite3*")), "the server fell back to SQLite"
        bundle = fetch_bundle(server)
        agent_id = attest(server, server.cli_json("token", "generate")["token"], bundle)

        created = []
        for name, uid in (("web", "1000"), ("db", "2000"), ("cache", "3000")):
            (entry,) = server.cli_json(
                "entry", "create", "--spiffe-id", f"spiffe://{TD}/{name}", "--parent-id",
                agent_id, "--selector", f"unix:uid:{uid}", "--dns", f"{name}.local",
            )["entries"]  # fmt: skip
            created.append(entry)
        web, db, cache = created
        (updated,) = server.cli_json("entry", "update", "--id", web["id"], "--hint", "frontend")[
            "entries"
        ]
        assert updated["hint"] == "frontend"
        server.cli_json("entry", "delete", "--id", cache["id"])
        duplicate = server.cli(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/db", "--parent-id", agent_id,
            "--selector", "unix:uid:2000",
        )  # fmt: skip
        assert duplicate.returncode != 0 and "already exists" in duplicate.stderr

        entries_before = {e["id"]: e for e in server.cli_json("entry", "show")["entries"]}
        assert set(entries_before) == {web["id"], db["id"]}
        assert table_count(database_url, "registration_entries") == 2
        agents_before = server.cli_json("agent", "list")
        assert agent_id in str(agents_before)
        authority_before = server.cli_json("localauthority", "x509", "show")["active"]
        bundle_before = fetch_bundle(server)

        server.restart()

        assert not list(server.data_dir.glob("*.sqlite3*")), "the server fell back to SQLite"
        entries_after = {e["id"]: e for e in server.cli_json("entry", "show")["entries"]}
        assert entries_after == entries_before
        assert entries_after[web["id"]]["hint"] == "frontend"
        assert server.cli_json("entry", "count") == {"count": 2}
        assert server.cli_json("agent", "list") == agents_before
        assert server.cli_json("agent", "show", "--spiffe-id", agent_id)
        assert server.cli_json("localauthority", "x509", "show")["active"] == authority_before
        bundle_after = fetch_bundle(server)
        assert bundle_after.x509_authorities == bundle_before.x509_authorities
        assert dict(bundle_after.jwt_authorities) == dict(bundle_before.jwt_authorities)
        assert bundle_after.sequence_number >= bundle_before.sequence_number

        # The restarted server still attests and signs with the same CA.
        second = attest(server, server.cli_json("token", "generate")["token"], bundle_after)
        assert second != agent_id
        assert server.cli_json("agent", "count") == {"count": 2}
        assert "Traceback" not in server.logs
