"""The audit trail with real processes: `credo-server run` (SQLite and PostgreSQL), a real
`credo-agent run`, a workload fetching SVIDs, the `credo-server audit` commands, and
tampering done directly in the SQLite file or the PostgreSQL table.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from credo._proto import workload_pb2, workload_pb2_grpc
from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from tests.helpers.processes import (
    ServerProcess,
    create_entry,
    credo_agent_command,
    one_line_error,
    run_cli,
    start_agent,
    start_server,
    wait_for,
)
from tests.helpers.server import attest_with_join_token

psycopg = pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")

TD = "example.org"
WORKLOAD = f"spiffe://{TD}/audit/workload"
HEADER = (("workload.spiffe.io", "true"),)
ADMIN_URL = os.environ.get("CREDO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


def _pg_admin() -> Any:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test; dropped afterwards."""
    try:
        conn = _pg_admin()
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}".splitlines()[0])
    name = f"credo_audit_{secrets.token_hex(6)}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Backend:
    """Direct SQL on the server's database, behind the server's back (the tamperer)."""

    def __init__(self, server: ServerProcess, pg_url: str | None) -> None:
        self.server = server
        self.pg_url = pg_url

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.pg_url is not None:
            with psycopg.connect(self.pg_url, autocommit=True) as conn:
                cur = conn.execute(sql.replace("?", "%s"), params)
                return list(cur.fetchall()) if cur.description else []
        conn = sqlite3.connect(self.server.datastore_path, timeout=10)
        try:
            with conn:
                cur = conn.execute(sql, params)
                return list(cur.fetchall())
        finally:
            conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def deployment(
    request: pytest.FixtureRequest, tmp_path: Path, root: Path
) -> Iterator[tuple[ServerProcess, Backend, Any]]:
    """A server on each backend, with an agent joined to it."""
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    flags = {"datastore": url} if url else {}
    with start_server(tmp_path, **flags) as server:
        agent = start_agent(server, root)
        with agent:
            yield server, Backend(server, url), agent


def _records(server: ServerProcess, *args: str) -> list[dict[str, Any]]:
    return list(server.cli_json("audit", "show", *args)["records"])


def _workload_stub(agent: Any) -> Any:
    channel = grpc.insecure_channel(f"unix:{agent.socket}")
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]


def _fetch_svids(agent: Any) -> tuple[x509.Certificate, bytes, str]:
    """The workload's X509-SVID (leaf), its private key, and a JWT-SVID, via the Workload API."""
    channel, stub = _workload_stub(agent)
    with channel:

        def first() -> Any:
            try:
                stream = stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=30
                )
                try:
                    return next(stream)
                finally:
                    stream.cancel()
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.PERMISSION_DENIED:
                    return None
                raise

        response = wait_for(first, 60, "the workload's X509-SVID")
        svid = response.svids[0]
        leaf = x509.load_der_x509_certificate(svid.x509_svid[: _der_length(svid.x509_svid)])
        jwt = (
            stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(audience=["audit-test"]), metadata=HEADER, timeout=30
            )
            .svids[0]
            .svid
        )
    return leaf, bytes(svid.x509_svid_key), jwt


def _fetch_wit(agent: Any) -> tuple[str, str]:
    """The workload's WIT-SVID and its private key (JWK JSON), via FetchWITSVID."""
    channel, stub = _workload_stub(agent)
    with channel:
        stream = stub.FetchWITSVID(workload_pb2.WITSVIDRequest(), metadata=HEADER, timeout=30)
        try:
            svid = next(stream).svids[0]
        finally:
            stream.cancel()
    return svid.wit_svid, svid.wit_svid_key


def _der_length(der: bytes) -> int:
    """Length of the first DER element (the leaf) in a concatenated chain."""
    if der[1] & 0x80 == 0:
        return 2 + der[1]
    n = der[1] & 0x7F
    return 2 + n + int.from_bytes(der[2 : 2 + n], "big")


def _verify(server: ServerProcess) -> tuple[int, str]:
    result = server.cli("audit", "verify", output=None)
    return result.returncode, (result.stdout + result.stderr).strip()


def test_every_action_is_recorded_once_by_its_actor_and_verifies(
    deployment: tuple[ServerProcess, Backend, Any],
) -> None:
    """Token, attestation, entry changes, X.509, JWT and WIT issuance, ban and eviction
    each appear once with the right actor; the chain verifies; no record holds a secret;
    the agent's local log names the process each SVID went to."""
    server, _, agent = deployment
    entry_id = create_entry(server, agent.spiffe_id, WORKLOAD)
    leaf, key_der, jwt = _fetch_svids(agent)
    wit, wit_key = _fetch_wit(agent)
    serial = format(leaf.serial_number, "x")
    server.cli_json(
        "entry",
        "update",
        "--id",
        entry_id,
        "--parent-id",
        agent.spiffe_id,
        "--spiffe-id",
        WORKLOAD,
        "--selector",
        f"unix:uid:{os.getuid()}",
        "--hint",
        "audited",
    )
    server.cli_json("entry", "delete", "--id", entry_id)
    agent.stop()
    server.cli_json("agent", "ban", "--spiffe-id", agent.spiffe_id)
    server.cli_json("agent", "evict", "--spiffe-id", agent.spiffe_id)

    records = _records(server)
    by_action: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_action.setdefault(rec["action"], []).append(rec)
    admin = re.compile(rf"^uid={os.getuid()} pid=\d+$")

    (token_rec,) = by_action["join_token.create"]
    assert token_rec["actor_kind"] == "admin" and admin.match(token_rec["actor"])
    (attest,) = [r for r in by_action["agent.attest"] if r["outcome"] == "allowed"]
    assert attest["subject"] == agent.spiffe_id and attest["actor_kind"] == "node"
    (created,) = by_action["entry.create"]
    assert (created["subject"], created["target"]) == (WORKLOAD, entry_id)
    assert created["actor_kind"] == "admin" and admin.match(created["actor"])
    issued = [r for r in by_action["x509_svid.issue"] if r["target"] == serial]
    assert len(issued) == 1
    assert issued[0]["subject"] == WORKLOAD
    assert (issued[0]["actor_kind"], issued[0]["actor"]) == ("agent", agent.spiffe_id)
    assert issued[0]["details"]["entry_id"] == entry_id
    assert issued[0]["details"]["expires_at"] == int(leaf.not_valid_after_utc.timestamp())
    jwt_jti = json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "=="))["jti"]
    jwt_recs = [r for r in by_action["jwt_svid.issue"] if r["target"] == jwt_jti]
    assert len(jwt_recs) == 1 and jwt_recs[0]["subject"] == WORKLOAD
    assert jwt_recs[0]["actor"] == agent.spiffe_id
    assert jwt_recs[0]["details"]["aud"] == ["audit-test"]
    wit_jti = json.loads(base64.urlsafe_b64decode(wit.split(".")[1] + "=="))["jti"]
    (wit_rec,) = [r for r in by_action["wit_svid.issue"] if r["target"] == wit_jti]
    assert (wit_rec["subject"], wit_rec["actor"]) == (WORKLOAD, agent.spiffe_id)
    for action in ("entry.update", "entry.delete", "agent.ban", "agent.evict"):
        (rec,) = by_action[action]
        assert rec["actor_kind"] == "admin" and admin.match(rec["actor"]), rec
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert _verify(server)[0] == 0

    # No secret in any record: the JWT, the workload key, PEM blocks, JWT shapes, and the
    # join token before it was used up.
    exported = server.cli("audit", "export", output=None).stdout
    assert jwt not in exported and JWT_SHAPE.search(exported) is None
    assert wit not in exported and json.loads(wit_key)["d"] not in exported
    assert "BEGIN" not in exported
    assert base64.b64encode(key_der).decode()[:40] not in exported
    assert key_der.hex()[:40] not in exported
    token = agent.joined_token
    before_use = exported.split('"join_token.consume"')[0]
    assert token not in before_use

    # The agent's local log says which process was handed which SVID.
    shown = subprocess.run(
        [
            *credo_agent_command(),
            "audit",
            "show",
            "--data-dir",
            str(agent.data_dir),
            "--serial",
            serial,
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (delivery,) = json.loads(shown.stdout)["records"]
    assert (delivery["action"], delivery["subject"]) == ("x509_svid.deliver", WORKLOAD)
    assert delivery["details"]["pid"] == os.getpid()
    assert delivery["details"]["uid"] == os.getuid()
    assert f"unix:uid:{os.getuid()}" in delivery["details"]["selectors"]
    local = "".join(p.read_text() for p in (agent.data_dir / "audit").iterdir())
    jwt_sha = hashlib.sha256(jwt.encode()).hexdigest()
    assert jwt_sha in local and jwt not in local and JWT_SHAPE.search(local) is None
    assert hashlib.sha256(wit.encode()).hexdigest() in local and wit not in local
    verified = subprocess.run(
        [*credo_agent_command(), "audit", "verify", "--data-dir", str(agent.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0 and "audit log intact" in verified.stdout


def test_tampering_in_the_database_makes_verify_fail_at_that_record(
    deployment: tuple[ServerProcess, Backend, Any],
) -> None:
    """Editing, deleting or swapping one row in SQLite or PostgreSQL: `audit verify` names
    that record and exits 1; put back, the chain verifies again."""
    server, db, agent = deployment
    create_entry(server, agent.spiffe_id, WORKLOAD)
    create_entry(server, agent.spiffe_id, WORKLOAD + "2")
    assert _verify(server)[0] == 0
    seq = int(_records(server, "--action", "entry.create")[0]["seq"])

    (original,) = db.execute("SELECT subject FROM audit_records WHERE seq = ?", (seq,))
    db.execute("UPDATE audit_records SET subject = ? WHERE seq = ?", (f"spiffe://{TD}/x", seq))
    code, text = _verify(server)
    assert code == 1
    assert text == (
        f"Error: audit chain broken at record {seq}: its contents do not match its hash "
        "(modified after it was written)"
    )
    db.execute("UPDATE audit_records SET subject = ? WHERE seq = ?", (original[0], seq))
    assert _verify(server)[0] == 0

    columns = [r[0] for r in db.execute("SELECT * FROM audit_records WHERE seq = ?", (seq,))]
    row = db.execute("SELECT * FROM audit_records WHERE seq = ?", (seq,))[0]
    db.execute("DELETE FROM audit_records WHERE seq = ?", (seq,))
    code, text = _verify(server)
    assert code == 1 and f"broken at record {seq}: record {seq} is missing" in text
    db.execute(f"INSERT INTO audit_records VALUES ({', '.join('?' for _ in row)})", tuple(row))
    assert columns and _verify(server)[0] == 0

    db.execute("UPDATE audit_records SET seq = -1 WHERE seq = ?", (seq,))
    db.execute("UPDATE audit_records SET seq = ? WHERE seq = ?", (seq, seq + 1))
    db.execute("UPDATE audit_records SET seq = ? WHERE seq = -1", (seq + 1,))
    code, text = _verify(server)
    assert code == 1 and f"broken at record {seq}:" in text


def test_trace_tells_the_life_of_one_identity(
    deployment: tuple[ServerProcess, Backend, Any],
) -> None:
    """`audit trace` lists, in order: the node attestation of the parent, the registration
    by the admin, the credentials with serials, and the removal."""
    server, _, agent = deployment
    entry_id = create_entry(server, agent.spiffe_id, WORKLOAD)
    leaf, _, _ = _fetch_svids(agent)
    server.cli_json("entry", "delete", "--id", entry_id)
    trace = server.cli_json("audit", "trace", "--spiffe-id", WORKLOAD)["records"]
    actions = [r["action"] for r in trace]
    assert actions[0] == "agent.attest" and trace[0]["subject"] == agent.spiffe_id
    assert actions.index("entry.create") < actions.index("x509_svid.issue")
    assert actions[-1] == "entry.delete"
    assert format(leaf.serial_number, "x") in [r["target"] for r in trace]
    assert [r["seq"] for r in trace] == sorted(r["seq"] for r in trace)
    text = server.cli("audit", "trace", "--spiffe-id", WORKLOAD, output=None).stdout
    assert f"Trace of {WORKLOAD}" in text and "entry.create  allowed  by admin" in text


def _forger_chain() -> tuple[Any, list[bytes]]:
    """A key and a self-signed certificate claiming to be the trust domain's server."""
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from credo.keys import generate_private_key

    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forger")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{TD}/credo/server")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return key, [cert.public_bytes(serialization.Encoding.DER)]


def _rehash(
    lines: list[str],
    index: int,
    change: Callable[[dict[str, Any]], None],
    *,
    resign: bool = False,
) -> list[str]:
    """A forger's export: change record ``lines[index]`` and recompute every hash after
    it; with ``resign``, re-sign the checkpoints with the forger's own key."""
    from server.audit import Actor, AuditRecord, chain_record
    from server.audit.checkpoint import checkpoint_details, checkpoint_message, sign_message
    from server.audit.records import PendingRecord

    key, chain = _forger_chain()
    hashes: dict[int, str] = {}
    out = list(lines[:index])
    for line in lines[1:index]:
        hashes[json.loads(line)["seq"]] = json.loads(line)["hash"]
    prev = json.loads(lines[index - 1])["hash"] if index > 1 else "0" * 64
    for line in lines[index:]:
        data = json.loads(line)
        if len(out) == index:
            change(data)
        if resign and data["action"] == "audit.checkpoint":
            covered = json.loads(data["details"])["seq"]
            signature = sign_message(key, checkpoint_message(covered, hashes[covered]))
            details = checkpoint_details(covered, hashes[covered], signature, chain)
            data["details"] = json.dumps(details, sort_keys=True, separators=(",", ":"))
        rec: AuditRecord = chain_record(
            PendingRecord(
                action=data["action"],
                actor=Actor(data["actor_kind"], data["actor"]),
                subject=data["subject"],
                target=data["target"],
                owner=data["owner"],
                outcome=data["outcome"],
                reason=data["reason"],
                request_id=data["request_id"],
                details=json.loads(data["details"]),
            ),
            seq=data["seq"],
            time_ms=data["time_ms"],
            prev_hash=prev,
        )
        data.update(prev_hash=prev, hash=rec.hash, details=rec.details)
        hashes[data["seq"]] = rec.hash
        prev = rec.hash
        out.append(json.dumps(data, sort_keys=True, separators=(",", ":")))
    header = json.loads(out[0])
    header["head_hash"] = prev
    out[0] = json.dumps(header, sort_keys=True, separators=(",", ":"))
    return out


def test_export_verifies_offline_and_fails_after_a_one_byte_change(
    tmp_path: Path,
) -> None:
    """`audit export` then `audit verify --file [--bundle]` with the server gone; one
    changed byte anywhere in a record, a record cut off the end, or a rewrite with every
    hash recomputed (caught by the signed checkpoint) fails with the record named."""
    with start_server(tmp_path) as server:
        for i in range(3):
            server.cli_json("token", "generate")
            server.cli_json(
                "entry",
                "create",
                "--spiffe-id",
                f"spiffe://{TD}/e{i}",
                "--parent-id",
                f"spiffe://{TD}/agent",
                "--selector",
                "unix:uid:1",
            )
        export = tmp_path / "audit.jsonl"
        result = server.cli("audit", "export", "--file", str(export), output=None)
        assert result.returncode == 0, result.stderr
        assert export.stat().st_mode & 0o777 == 0o600
        bundle = tmp_path / "bundle.pem"
        bundle.write_text(server.bundle_pem())
    missing_socket = str(tmp_path / "nope.sock")

    def verify_file(path: Path, *extra: str) -> Any:
        return run_cli(missing_socket, "audit", "verify", "--file", str(path), *extra, output=None)

    ok = verify_file(export, "--bundle", str(bundle))
    assert ok.returncode == 0, ok.stderr
    assert "audit chain intact" in ok.stdout
    assert "signed checkpoints, the newest covering" in ok.stdout
    lines = export.read_text().splitlines()
    assert json.loads(lines[-1])["action"] == "audit.checkpoint"

    def retarget(data: dict[str, Any]) -> None:
        data["target"] = "forged"

    # A rewrite with every hash recomputed: the first checkpoint after it disagrees...
    first_checkpoint = next(
        json.loads(line)["seq"]
        for line in lines[4:]
        if json.loads(line)["action"] == "audit.checkpoint"
    )
    forged = tmp_path / "forged.jsonl"
    forged.write_text("\n".join(_rehash(lines, 3, retarget)) + "\n")
    assert one_line_error(verify_file(forged)).startswith(
        f"Error: audit chain broken at record {first_checkpoint}: checkpoint signed record"
    )
    # ... and checkpoints re-signed by the forger pass on their own, but not the bundle.
    resigned = tmp_path / "resigned.jsonl"
    resigned.write_text("\n".join(_rehash(lines, 3, retarget, resign=True)) + "\n")
    assert verify_file(resigned).returncode == 0
    assert one_line_error(verify_file(resigned, "--bundle", str(bundle))).startswith(
        f"Error: audit chain broken at record {first_checkpoint}: checkpoint is not signed "
        "by a server of this trust domain"
    )
    record = json.loads(lines[4])
    for field, offset in (("target", 0), ("time_ms", 0), ("hash", 5), ("details", 2)):
        raw = lines[4]
        value = json.dumps(record[field]) if field != "time_ms" else str(record[field])
        at = raw.index(f'"{field}":') + len(f'"{field}":') + offset + 1
        flipped = raw[:at] + ("1" if raw[at] != "1" else "2") + raw[at + 1 :]
        assert flipped != raw and value
        bad = tmp_path / f"bad-{field}.jsonl"
        bad.write_text("\n".join([*lines[:4], flipped, *lines[5:]]) + "\n")
        result = verify_file(bad)
        assert result.returncode == 1, (field, result.stdout)
        message = one_line_error(result)
        assert f"record {record['seq']}" in message or "line 5" in message, message
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:-1]) + "\n")
    result = verify_file(cut)
    assert result.returncode == 1 and "removed from or added to the end" in result.stderr


def test_bad_input_is_refused_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """A --since in the future, a malformed SPIFFE ID, an unknown file: one line, exit 1."""
    with start_server(tmp_path) as server:
        before = len(_records(server))
        cases: list[tuple[list[str], str]] = [
            (["audit", "show", "--since", "2999-01-01T00:00:00Z"], "--since is in the future"),
            (["audit", "show", "--spiffe-id", "not-an-id"], "--spiffe-id"),
            (["audit", "show", "--since", "yesterday"], "invalid time"),
            (["audit", "verify", "--file", str(tmp_path / "missing.jsonl")], "cannot read"),
        ]
        for args, words in cases:
            result = server.cli(*args, output=None)
            assert result.returncode == 1, args
            assert words in one_line_error(result), (args, result.stderr)
        assert len(_records(server)) == before
        with server.admin_channel() as channel:
            stub = admin_pb2_grpc.AuditStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ListAuditRecords(admin_pb2.ListAuditRecordsRequest(since_ms=2**62), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_refused_attestation_is_recorded(tmp_path: Path) -> None:
    """A join token that does not exist: refused, and the refusal is in the trail."""
    with start_server(tmp_path) as server:
        with server.admin_channel() as channel:
            bundle: types_pb2.Bundle = admin_pb2_grpc.BundlesStub(channel).GetBundle(
                admin_pb2.GetBundleAdminRequest(), timeout=10
            )
        with pytest.raises(grpc.RpcError):
            attest_with_join_token(server.agent_target, bundle, "no-such-token")
        (refused,) = _records(server, "--action", "agent.attest")
        assert refused["outcome"] == "refused"
        assert refused["reason"] == "join token does not exist or has already been used"
        assert refused["actor_kind"] == "node" and refused["actor"]
        assert "no-such-token" not in json.dumps(refused)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_servers_appending_concurrently_make_one_chain(tmp_path: Path, pg_url: str) -> None:
    """Two servers on one PostgreSQL, four writers each, thousands of records: one
    gap-free chain that `audit verify` accepts on either server."""
    a = start_server(tmp_path, data_dir=tmp_path / "a", datastore=pg_url)
    try:
        b = start_server(tmp_path, data_dir=tmp_path / "b", datastore=pg_url)
        try:
            per_writer = 300
            errors: list[BaseException] = []

            def writer(server: ServerProcess) -> Callable[[], None]:
                def run() -> None:
                    try:
                        with server.admin_channel() as channel:
                            stub = admin_pb2_grpc.AgentsStub(channel)
                            for _ in range(per_writer):
                                stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(), timeout=30)
                    except BaseException as err:  # reported below
                        errors.append(err)

                return run

            threads = [threading.Thread(target=writer(s)) for s in (a, b) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
            tokens = _records(a, "--action", "join_token.create")
            assert len(tokens) == 8 * per_writer
            for server in (a, b):
                result = server.cli_json("audit", "verify")
                assert result["ok"] is True
                assert result["checked"] == result["last_seq"] >= 8 * per_writer
        finally:
            b.close()
    finally:
        a.close()


def test_authority_and_bundle_changes_are_recorded_by_the_admin(tmp_path: Path) -> None:
    """prepare, activate, taint and revoke of the X.509 CA, and a federated bundle set and
    deleted: each once, by the admin caller (rotation the server does itself is by the
    server). The admin actor is the uid and pid the kernel reports for the connection, not
    what the caller declares in its metadata."""
    with start_server(tmp_path) as server:
        with grpc.insecure_channel(f"unix:{server.admin_socket}") as channel:
            admin_pb2_grpc.AgentsStub(channel).CreateJoinToken(
                admin_pb2.CreateJoinTokenRequest(),
                metadata=[("credo-admin-uid", "0"), ("credo-admin-pid", "1")],
                timeout=30,
            )
        (forged,) = _records(server, "--action", "join_token.create")
        assert (forged["actor_kind"], forged["actor"]) == (
            "admin",
            f"uid={os.getuid()} pid={os.getpid()}",
        )
        startup = _records(server, "--action", "authority.")
        assert startup and {r["actor_kind"] for r in startup} == {"server"}
        old = server.cli_json("localauthority", "x509", "show")["active"]["authority_id"]
        new = server.cli_json("localauthority", "x509", "prepare")["authority_id"]
        server.cli_json("localauthority", "x509", "activate", "--authority-id", new)
        server.cli_json("localauthority", "x509", "taint", "--authority-id", old)
        server.cli_json("localauthority", "x509", "revoke", "--authority-id", old)
        pem = tmp_path / "partner.pem"
        pem.write_text(server.bundle_pem())
        server.cli_json("bundle", "set", "--trust-domain", "partner.example", "--path", str(pem))
        server.cli_json("bundle", "delete", "--trust-domain", "partner.example")
        after = [r for r in _records(server) if r["actor_kind"] == "admin"]
        got = [
            (r["action"], r["target"])
            for r in after
            if r["action"] not in ("bundle.update", "join_token.create")
        ]
        assert got == [
            ("authority.prepare", new),
            ("authority.deactivate", old),
            ("authority.activate", new),
            ("authority.taint", old),
            ("authority.revoke", old),
            ("bundle.set", "partner.example"),
            ("bundle.delete", "partner.example"),
        ]
        republished = [r for r in after if r["action"] == "bundle.update"]
        assert republished and {r["target"] for r in republished} == {TD}
        assert _verify(server)[0] == 0


def test_prune_keeps_the_rest_verifiable(tmp_path: Path) -> None:
    """`audit prune --before-seq N` deletes older records; `audit verify` and an export
    checked against the bundle still pass; a bad --before-seq is one line and changes
    nothing."""
    with start_server(tmp_path) as server:
        for _ in range(3):
            server.cli_json("token", "generate")
        head = _records(server)[-1]["seq"]
        for args, words in (
            (["--before-seq", "1"], "--before-seq"),
            (["--before-seq", str(head + 50)], f"audit record {head + 50} not found"),
        ):
            result = server.cli("audit", "prune", *args, output=None)
            assert words in one_line_error(result), result.stderr
        assert _records(server)[0]["seq"] == 1
        assert server.cli_json("audit", "prune", "--before-seq", str(head - 1)) == {
            "pruned": head - 2
        }
        records = _records(server)
        assert records[0]["seq"] == head - 1 and records[-1]["action"] == "audit.prune"
        assert records[-1]["actor_kind"] == "admin"
        assert _verify(server)[0] == 0
        export = tmp_path / "pruned.jsonl"
        assert server.cli("audit", "export", "--file", str(export), output=None).returncode == 0
        bundle = tmp_path / "bundle.pem"
        bundle.write_text(server.bundle_pem())
        result = server.cli(
            "audit", "verify", "--file", str(export), "--bundle", str(bundle), output=None
        )
        assert result.returncode == 0, result.stderr
