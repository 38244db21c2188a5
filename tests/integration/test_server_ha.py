"""High availability: two `credo-server run` processes on one PostgreSQL database, and an agent
that fails over between them.

Each server keeps its own CA and JWT key (private keys in its own data dir, rows in the shared
``authorities`` table tagged with its ``<data-dir>/server_id``); the bundle both serve is the
union of every server's authorities. Needs PostgreSQL at 127.0.0.1:5432 (user ``postgres``, no
password) or ``CREDO_TEST_POSTGRES``; each test creates its own ``credo_ha_<random>`` database
and drops it afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from credo import Bundle, verify_x509_svid
from credo.jwtsvid import JwtSvid
from tests.helpers.processes import (
    ServerProcess,
    create_entry,
    short_temp_dir,
    start_agent,
    start_server,
    wait_for,
)

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
    name = f"credo_ha_{secrets.token_hex(6)}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_pair(
    tmp_path: Path, database_url: str, **flags: Any
) -> tuple[ServerProcess, ServerProcess]:
    """Start servers A then B on the same database, each with its own data dir and port."""
    a = start_server(tmp_path, data_dir=tmp_path / "a", datastore=database_url, **flags)
    try:
        b = start_server(tmp_path, data_dir=tmp_path / "b", datastore=database_url, **flags)
    except BaseException:
        a.close()
        raise
    return a, b


def fetch_bundle(server: ServerProcess) -> Bundle:
    """`credo-server bundle show --format spiffe`, parsed."""
    result = server.cli("bundle", "show", "--format", "spiffe", output=None)
    assert result.returncode == 0, result.stderr
    return Bundle.parse(TD, result.stdout.encode())


def ski(cert: x509.Certificate) -> str:
    """The SubjectKeyIdentifier (hex) of ``cert``: an X.509 authority id."""
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def issuer_id(leaf: x509.Certificate) -> str:
    """The AuthorityKeyIdentifier (hex) of ``leaf``: the id of the CA that signed it."""
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    return aki.key_identifier.hex()


def active(server: ServerProcess, kind: str) -> str:
    """The id of the server's own active authority of ``kind`` (`localauthority ... show`)."""
    return str(server.cli_json("localauthority", kind, "show")["active"]["authority_id"])


def own_ids(server: ServerProcess) -> dict[str, str]:
    """The server's active X.509 and JWT authority ids."""
    return {"x509": active(server, "x509"), "jwt": active(server, "jwt")}


def has_authorities(bundle: Bundle, *servers: dict[str, str]) -> bool:
    """Whether ``bundle`` holds every given server's X.509 authority and JWT key."""
    x509_ids = {ski(c) for c in bundle.x509_authorities}
    return all(s["x509"] in x509_ids and s["jwt"] in bundle.jwt_authorities for s in servers)


def mint_x509(server: ServerProcess, spiffe_id: str) -> list[x509.Certificate]:
    """`credo-server x509 mint` against ``server``; the certificate chain."""
    out = server.cli_json("x509", "mint", "--spiffe-id", spiffe_id)
    return x509.load_pem_x509_certificates(out["x509_svid"].encode())


def mint_jwt(server: ServerProcess, spiffe_id: str) -> str:
    """`credo-server jwt mint` against ``server``; the token."""
    return str(
        server.cli_json("jwt", "mint", "--spiffe-id", spiffe_id, "--audience", "ha")["token"]
    )


def assert_cross_verifies(a: ServerProcess, b: ServerProcess) -> None:
    """SVIDs minted by each server verify against the bundle served by the other."""
    for signer, verifier in ((a, b), (b, a)):
        bundle = fetch_bundle(verifier)
        workload = f"spiffe://{TD}/minted/{signer.data_dir.name}"
        chain = mint_x509(signer, workload)
        assert issuer_id(chain[0]) == active(signer, "x509")
        assert str(verify_x509_svid(chain, bundle.x509_bundle())) == workload
        token = mint_jwt(signer, workload)
        svid = JwtSvid.parse_and_validate(token, bundle.jwt_bundle(), ["ha"])
        assert str(svid.spiffe_id) == workload


def test_two_servers_on_one_database_keep_their_own_cas_and_share_the_bundle(
    tmp_path: Path, database_url: str
) -> None:
    """Two servers on one database each keep their own CA and publish the union bundle."""
    a, b = start_pair(tmp_path, database_url, trust_domain=TD)
    with a, b:
        id_a = (a.data_dir / "server_id").read_text().strip()
        id_b = (b.data_dir / "server_id").read_text().strip()
        assert id_a and id_b and id_a != id_b
        ids_a, ids_b = own_ids(a), own_ids(b)
        assert ids_a["x509"] != ids_b["x509"] and ids_a["jwt"] != ids_b["jwt"]

        for server in (a, b):

            def union(s: ServerProcess = server) -> Bundle | None:
                found = fetch_bundle(s)
                return found if has_authorities(found, ids_a, ids_b) else None

            bundle = wait_for(union, 30, f"the union bundle from {server.data_dir.name}")
            assert len(bundle.x509_authorities) == 2 and len(bundle.jwt_authorities) == 2
        assert_cross_verifies(a, b)

        # Restarting either server keeps the other's authorities (and its own).
        seq_before = fetch_bundle(a).sequence_number
        b.restart()
        assert own_ids(a) == ids_a and own_ids(b) == ids_b
        assert has_authorities(fetch_bundle(a), ids_a, ids_b)
        a.restart()
        assert own_ids(a) == ids_a and own_ids(b) == ids_b
        bundle = fetch_bundle(b)
        assert has_authorities(bundle, ids_a, ids_b)
        assert bundle.sequence_number >= seq_before
        assert_cross_verifies(a, b)
        for server in (a, b):
            assert "dropped authority" not in server.logs, server.logs
            assert "Traceback" not in server.logs, server.logs

        # An entry created through A is visible through B.
        entry_id = create_entry(a, f"spiffe://{TD}/agent", f"spiffe://{TD}/shared", "unix:uid:42")
        shown = b.cli_json("entry", "show", "--id", entry_id)
        entries = shown["entries"] if "entries" in shown else [shown.get("entry", shown)]
        assert [e["id"] for e in entries] == [entry_id]
        assert entries[0]["spiffe_id"] == f"spiffe://{TD}/shared"


def _workload_svid(agent: Any, spiffe_id: str) -> x509.Certificate | None:
    """The leaf of the workload's X.509-SVID for ``spiffe_id`` (py-spiffe), or None."""
    from spiffe.workloadapi.errors import WorkloadApiError

    try:
        with agent.client() as client:
            svids = client.fetch_x509_svids(timeout=30)
    except WorkloadApiError:
        return None
    for svid in svids:
        if str(svid.spiffe_id) == spiffe_id:
            return svid.leaf  # type: ignore[no-any-return]
    return None


def _workload_bundle_ids(agent: Any) -> set[str]:
    """The X.509 authority ids in the workload's bundle for the trust domain (py-spiffe)."""
    from spiffe import TrustDomain

    with agent.client() as client:
        bundles = client.fetch_x509_bundles(timeout=30)
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(TD))
    return {ski(c) for c in bundle.x509_authorities} if bundle is not None else set()


def test_agent_fails_over_to_the_second_server_when_the_first_dies(
    tmp_path: Path, database_url: str
) -> None:
    """An agent attested via A keeps syncing and renewing through B after A is SIGKILLed."""
    a, b = start_pair(tmp_path, database_url, trust_domain=TD, x509_svid_ttl="20s")
    root = short_temp_dir()
    try:
        with a, b:
            ids_a, ids_b = own_ids(a), own_ids(b)
            wait_for(lambda: has_authorities(fetch_bundle(a), ids_a, ids_b), 30, "the union bundle")
            with start_agent(a, root, trust_domain=TD, server_address=b.address) as agent:
                web = f"spiffe://{TD}/web"
                create_entry(a, agent.spiffe_id, web)
                leaf = wait_for(lambda: _workload_svid(agent, web), 60, "the first SVID via A")
                assert issuer_id(leaf) == ids_a["x509"]

                # B rotates while the agent talks to A: the new CA reaches the workload.
                prepared = b.cli_json("localauthority", "x509", "prepare")
                prepared = prepared.get("prepared", prepared)
                new_b = str(prepared["authority_id"])
                wait_for(lambda: new_b in _workload_bundle_ids(agent), 60, "B's new CA via A")

                a.kill()

                # A new entry created through B reaches the workload through B.
                db = f"spiffe://{TD}/db"
                create_entry(b, agent.spiffe_id, db)
                wait_for(lambda: db in agent.fetch_ids(), 90, "the entry created on B")

                # SVIDs keep being renewed, now signed by B's CA (A is dead).
                def renewed_by_b() -> bool:
                    cert = _workload_svid(agent, web)
                    return cert is not None and issuer_id(cert) == ids_b["x509"]

                wait_for(renewed_by_b, 90, "the web SVID renewed by B")
                leaf_db = _workload_svid(agent, db)
                assert leaf_db is not None and issuer_id(leaf_db) == ids_b["x509"]
                assert leaf_db.not_valid_after_utc > datetime.now(UTC)

                # The agent's own SVID is renewed against B too (its serial changes on B).
                def node_serial() -> str:
                    out = b.cli_json("agent", "show", "--spiffe-id", agent.spiffe_id)
                    node = out.get("agent", out)
                    return str(node.get("cert_serial", ""))

                first_serial = node_serial()
                wait_for(lambda: node_serial() != first_serial, 60, "the agent SVID renewed on B")
                assert agent.running, agent.logs
                assert "failing over" in agent.logs
                assert "Traceback" not in b.logs, b.logs
    finally:
        shutil.rmtree(root, ignore_errors=True)
