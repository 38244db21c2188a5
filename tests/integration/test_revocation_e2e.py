"""Revocation end to end: a real `credo-server run`, a real `credo-agent run`, a workload's
open FetchX509SVID stream (raw gRPC), the `credo-server x509|entry|agent` CLI, and
independent CRL checks with pyca/cryptography and `openssl verify -crl_check`.

One server and one agent (module scope) with two entries for this process's uid; the
tests run in file order: a serial is revoked (the SVID is replaced), then an entry (its
SVID leaves the stream for good), then the agent is banned.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import secrets
import shutil
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from credo import Bundle, JwtSvid
from credo._proto import workload_pb2, workload_pb2_grpc
from credo.bundle import load_certificates
from credo.errors import JwtSvidRevoked
from credo.revocation import JwtRevocationList
from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    one_line_error,
    short_temp_dir,
    start_agent,
    start_server,
    wait_for,
)

TD = "example.org"
ALPHA = f"spiffe://{TD}/revoke/alpha"
BETA = f"spiffe://{TD}/revoke/beta"
HEADER = (("workload.spiffe.io", "true"),)
WAIT = 30.0

pytestmark = pytest.mark.slow


class Stream:
    """A workload's FetchX509SVID stream, read by a thread into a queue."""

    def __init__(self, agent: AgentProcess) -> None:
        self._channel = grpc.insecure_channel(f"unix:{agent.socket}")
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)  # type: ignore[no-untyped-call]
        self._call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
        self.messages: queue.Queue[Any] = queue.Queue()
        self.latest: Any = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                self.messages.put(message)
        except grpc.RpcError as err:
            self.messages.put(err)

    def until(self, predicate: Any, what: str) -> Any:
        """The first message (from now on, the latest counted) that satisfies ``predicate``."""
        if self.latest is not None and predicate(self.latest):
            return self.latest
        while True:
            try:
                message = self.messages.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"no stream message with {what} in {WAIT}s") from None
            if isinstance(message, grpc.RpcError):
                raise AssertionError(f"the stream ended: {message}")
            self.latest = message
            if predicate(message):
                return message

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


@dataclass
class Deployment:
    server: ServerProcess
    agent: AgentProcess
    stream: Stream
    entry_ids: dict[str, str]
    root: Path
    revoked_serials: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = short_temp_dir("credo-rev-")
    try:
        with start_server(
            tmp_path_factory.mktemp("revoke-server"), http_bind_address="127.0.0.1:0"
        ) as server:
            agent = start_agent(server, root)
            with agent:
                ids = {s: create_entry(server, agent.spiffe_id, s) for s in (ALPHA, BETA)}
                wait_for(lambda: sorted(agent.fetch_ids()) == [ALPHA, BETA], 60, "both SVIDs")
                stream = Stream(agent)
                try:
                    stream.until(lambda m: _ids(m) == {ALPHA, BETA}, "both SVIDs")
                    yield Deployment(server, agent, stream, ids, root)
                finally:
                    stream.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _ids(message: Any) -> set[str]:
    return {s.spiffe_id for s in message.svids}


def _leaf(message: Any, spiffe_id: str) -> x509.Certificate:
    (svid,) = [s for s in message.svids if s.spiffe_id == spiffe_id]
    return load_certificates(svid.x509_svid)[0]


def _ca(message: Any) -> x509.Certificate:
    return load_certificates(message.svids[0].bundle)[-1]


def _stub(agent: AgentProcess) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"unix:{agent.socket}")
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]


def _fetch_jwt(agent: AgentProcess, spiffe_id: str) -> str:
    channel, stub = _stub(agent)
    with channel:
        reply = stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["db"], spiffe_id=spiffe_id),
            metadata=HEADER,
            timeout=WAIT,
        )
    return str(reply.svids[0].svid)


def _validate(agent: AgentProcess, token: str) -> grpc.StatusCode:
    """OK, or the status ValidateJWTSVID refused the token with."""
    channel, stub = _stub(agent)
    with channel:
        try:
            stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience="db", svid=token),
                metadata=HEADER,
                timeout=WAIT,
            )
        except grpc.RpcError as err:
            assert "revoked" in str(err.details()), err.details()
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _jti(token: str) -> str:
    body = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["jti"])


def _issuing_ca(message: Any, leaf: x509.Certificate) -> x509.Certificate:
    """The bundle's CA whose SubjectKeyIdentifier is the leaf's AuthorityKeyIdentifier."""
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    (ca,) = [
        c
        for c in load_certificates(message.svids[0].bundle)
        if c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        == aki.key_identifier
    ]
    return ca


def _crls(message: Any) -> list[x509.CertificateRevocationList]:
    return [x509.load_der_x509_crl(der) for der in message.crl]


def _revokes(message: Any, serial: int) -> bool:
    return any(c.get_revoked_certificate_by_serial_number(serial) for c in _crls(message))


def _openssl_verify(tmp: Path, ca: x509.Certificate, crls: list[Any], leaf: Any) -> Any:
    (tmp / "ca.pem").write_bytes(ca.public_bytes(Encoding.PEM))
    (tmp / "crl.pem").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in crls))
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(Encoding.PEM))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            str(tmp / "ca.pem"),
            "-CRLfile",
            str(tmp / "crl.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_workloads_get_a_signed_crl_from_the_start(deployment: Deployment) -> None:
    """The stream carries the authority's CRL (signed by the CA in the bundle, revoking
    nothing yet, with a CRL number and a short nextUpdate)."""
    message = deployment.stream.latest
    ca = _ca(message)
    (crl,) = _crls(message)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.subject
    assert len(crl) == 0
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 1
    assert crl.next_update_utc is not None
    assert (crl.next_update_utc - crl.last_update_utc).total_seconds() <= 700


def test_revoking_a_serial_replaces_the_svid_and_lists_it_in_the_crl(
    deployment: Deployment, tmp_path: Path
) -> None:
    """`x509 revoke --serial` puts the serial in the CRL the workload receives, the agent
    replaces the SVID (the entry is not revoked), openssl and cryptography reject the old
    certificate with that CRL and accept the new one; revoking again changes nothing."""
    stream, server = deployment.stream, deployment.server
    old = _leaf(stream.latest, ALPHA)
    serial = format(old.serial_number, "x")
    out = server.cli_json("x509", "revoke", "--serial", serial, "--reason", "key leaked")
    assert [s["serial"] for s in out["revoked"]] == [serial]
    assert out["revoked"][0]["spiffe_id"] == ALPHA

    message = stream.until(
        lambda m: (
            _revokes(m, old.serial_number)
            and ALPHA in _ids(m)
            and _leaf(m, ALPHA).serial_number != old.serial_number
        ),
        "the serial in the CRL and a new ALPHA SVID",
    )
    deployment.revoked_serials.append(old.serial_number)
    new = _leaf(message, ALPHA)
    assert _ids(message) == {ALPHA, BETA}
    ca, crls = _ca(message), _crls(message)
    assert all(c.is_signature_valid(ca.public_key()) for c in crls)  # type: ignore[arg-type]
    assert not any(c.get_revoked_certificate_by_serial_number(new.serial_number) for c in crls)

    refused = _openssl_verify(tmp_path, ca, crls, old)
    assert refused.returncode != 0
    assert "revoked" in (refused.stdout + refused.stderr)
    accepted = _openssl_verify(tmp_path, ca, crls, new)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr

    again = server.cli("x509", "revoke", "--serial", serial.upper(), output=None)
    assert again.returncode == 0, again.stderr
    assert "already revoked" in again.stdout


def test_revoking_a_jti_makes_validation_refuse_it(deployment: Deployment) -> None:
    """`jwt revoke --jti` makes the agent's ValidateJWTSVID refuse the token, and the agent
    hands out a new JWT-SVID (another jti) instead of its cached one."""
    agent, server = deployment.agent, deployment.server
    token = _fetch_jwt(agent, ALPHA)
    assert _validate(agent, token) == grpc.StatusCode.OK
    jti = _jti(token)
    out = server.cli_json("jwt", "revoke", "--jti", jti, "--reason", "leaked")
    assert [j["jti"] for j in out["revoked_jwts"]] == [jti]
    wait_for(
        lambda: _validate(agent, token) == grpc.StatusCode.INVALID_ARGUMENT,
        WAIT,
        "ValidateJWTSVID to refuse the revoked token",
    )
    fresh = _fetch_jwt(agent, ALPHA)
    assert _jti(fresh) != jti
    assert _validate(agent, fresh) == grpc.StatusCode.OK

    # A resource server without a round trip per token: the signed list from the HTTP
    # front end, verified with the trust domain's JWT bundle, as a revocation source.
    shown = server.cli("bundle", "show", "--format", "spiffe", output=None).stdout
    bundle = Bundle.parse(TD, shown).jwt_bundle()
    trust = ssl.create_default_context(cadata=server.bundle_pem())
    revoked = JwtRevocationList.fetch(f"{server.http_url}/jwt-revocations", bundle, context=trust)
    assert jti in revoked
    with pytest.raises(JwtSvidRevoked):
        JwtSvid.parse_and_validate(token, bundle, ["db"], revoked=revoked)
    assert JwtSvid.parse_and_validate(fresh, bundle, ["db"], revoked=revoked).jwt_id == _jti(fresh)
    again = server.cli_json("jwt", "revoke", "--jti", jti)
    assert again["revoked_jwts"] == []
    assert "no JWT-SVID, WIT-SVID or delegated token with jti" in one_line_error(
        server.cli("jwt", "revoke", "--jti", "unknown-jti", output=None)
    )


def test_revoking_an_entry_drops_its_svid_for_good(deployment: Deployment) -> None:
    """`entry revoke` removes the entry's SVID from the open stream, lists its serial in
    the delivered CRL, makes ValidateJWTSVID refuse the entry's JWT-SVIDs, and the agent
    never gets an SVID for it again."""
    stream, server = deployment.stream, deployment.server
    old = _leaf(stream.latest, BETA)
    beta_jwt = _fetch_jwt(deployment.agent, BETA)
    out = server.cli_json("entry", "revoke", "--id", deployment.entry_ids[BETA], "--reason", "x")
    assert out["entry_newly_revoked"] is True
    assert [s["serial"] for s in out["revoked"]] == [format(old.serial_number, "x")]
    assert [j["jti"] for j in out["revoked_jwts"]] == [_jti(beta_jwt)]

    message = stream.until(
        lambda m: _ids(m) == {ALPHA} and _revokes(m, old.serial_number),
        "BETA gone and its serial in the CRL",
    )
    deployment.revoked_serials.append(old.serial_number)
    assert _revokes(message, deployment.revoked_serials[0])
    assert deployment.agent.fetch_ids() == [ALPHA]
    wait_for(
        lambda: _validate(deployment.agent, beta_jwt) == grpc.StatusCode.INVALID_ARGUMENT,
        WAIT,
        "ValidateJWTSVID to refuse the revoked entry's token",
    )

    again = server.cli_json("entry", "revoke", "--id", deployment.entry_ids[BETA])
    assert again["revoked"] == [] and again["entry_newly_revoked"] is False
    # The server keeps refusing the entry: a fresh workload call still sees only ALPHA, and
    # the server's own CRL list agrees with what the workload received.
    assert deployment.agent.fetch_ids() == [ALPHA]
    listed = server.cli_json("x509", "crl")["crls"]
    serials = {
        r.serial_number for item in listed for r in x509.load_pem_x509_crl(item["crl"].encode())
    }
    assert set(deployment.revoked_serials) <= serials


def test_crls_are_served_over_http(deployment: Deployment) -> None:
    """`GET /crl/<authority-id>.crl` on the HTTP front end answers the same DER CRL the
    workload received; an unknown authority is a 404 in the JSON error shape."""
    server = deployment.server
    trust = ssl.create_default_context(cadata=server.bundle_pem())
    message = deployment.stream.latest
    issuer = _issuing_ca(message, _leaf(message, ALPHA))
    authority_id = issuer.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value.digest.hex()
    with urllib.request.urlopen(
        f"{server.http_url}/crl/{authority_id}.crl", context=trust, timeout=10
    ) as response:
        assert response.headers["Content-Type"] == "application/pkix-crl"
        body = response.read()
    assert body in list(message.crl)
    crl = x509.load_der_x509_crl(body)
    assert crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    assert all(crl.get_revoked_certificate_by_serial_number(s) for s in deployment.revoked_serials)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{server.http_url}/crl/00ff.crl", context=trust, timeout=10)
    assert info.value.code == 404
    assert json.loads(info.value.read())["error"] == "not_found"


def test_revocation_refuses_bad_input_and_changes_nothing(deployment: Deployment) -> None:
    """Unknown or malformed serials and unknown entries: one-line errors, nothing revoked."""
    server = deployment.server
    before = server.cli_json("x509", "crl")["crls"]
    assert "no X.509-SVID with serial abcdef was issued" in one_line_error(
        server.cli("x509", "revoke", "--serial", "ABCDEF", output=None)
    )
    assert "not a hex serial number" in one_line_error(
        server.cli("x509", "revoke", "--serial", "xyz", output=None)
    )
    assert "not found" in one_line_error(
        server.cli("entry", "revoke", "--id", "no-such-entry", output=None)
    )
    assert "reason" in one_line_error(
        server.cli(
            "entry", "revoke", "--id", deployment.entry_ids[ALPHA], "--reason", "a\nb", output=None
        )
    )
    assert deployment.agent.fetch_ids() == [ALPHA]
    assert server.cli_json("x509", "crl")["crls"] == before


def test_crls_survive_a_server_restart(deployment: Deployment) -> None:
    """After a restart the stored CRL still lists the revoked serials and agents get it
    again on their new sync stream."""
    deployment.server.restart()
    listed = deployment.server.cli_json("x509", "crl")["crls"]
    serials = {
        r.serial_number for item in listed for r in x509.load_pem_x509_crl(item["crl"].encode())
    }
    assert set(deployment.revoked_serials) <= serials
    stream = Stream(deployment.agent)
    try:
        message = stream.until(lambda m: _ids(m) == {ALPHA}, "ALPHA after the restart")
        assert all(_revokes(message, s) for s in deployment.revoked_serials)
    finally:
        stream.close()


def test_banning_the_agent_revokes_what_it_obtained(deployment: Deployment) -> None:
    """`agent ban` revokes every unexpired SVID the agent obtained: the workload's current
    SVID and the agent's own SVID appear in the CRL."""
    server, agent = deployment.server, deployment.agent
    current = _leaf(deployment.stream.latest, ALPHA)
    node = server.cli_json("agent", "show", "--spiffe-id", agent.spiffe_id)
    server.cli_json("agent", "ban", "--spiffe-id", agent.spiffe_id, "--reason", "stolen")

    def revoked_serials() -> set[int]:
        listed = server.cli_json("x509", "crl")["crls"]
        return {
            r.serial_number for item in listed for r in x509.load_pem_x509_crl(item["crl"].encode())
        }

    agent_serial = int(node["cert_serial"], 16)
    wait_for(
        lambda: {current.serial_number, agent_serial} <= revoked_serials(),
        WAIT,
        "the workload's and the agent's SVIDs in the CRL",
    )
    assert server.cli_json("agent", "show", "--spiffe-id", agent.spiffe_id)["banned"] is True


# --- two servers on one PostgreSQL database ---------------------------------------------

ADMIN_URL = os.environ.get("CREDO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test; dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}".splitlines()[0])
    name = f"credo_rev_{secrets.token_hex(6)}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_revocations_are_audited_with_what_they_revoked(deployment: Deployment) -> None:
    """`x509 revoke`, `jwt revoke` and `entry revoke` each leave one record by the admin
    (reason, serials and jtis revoked, the entry's owner); a repeat is recorded too, with
    nothing revoked; the chain verifies."""
    server, agent = deployment.server, deployment.agent
    minted = server.cli_json("x509", "mint", "--spiffe-id", f"spiffe://{TD}/minted")
    serial = format(x509.load_pem_x509_certificate(minted["x509_svid"].encode()).serial_number, "x")
    server.cli_json("x509", "revoke", "--serial", serial, "--reason", "laptop lost")
    minted_jwt = server.cli_json(
        "jwt", "mint", "--spiffe-id", f"spiffe://{TD}/minted", "--audience", "db"
    )
    token = str(minted_jwt["token"])
    server.cli_json("jwt", "revoke", "--jti", _jti(token), "--reason", "leaked")
    gamma = f"spiffe://{TD}/gamma"
    entry_id = create_entry(
        server, agent.spiffe_id, gamma, "unix:uid:4545", extra=["--owner", "carol"]
    )
    server.cli_json("entry", "revoke", "--id", entry_id, "--reason", "compromised")
    server.cli_json("entry", "revoke", "--id", entry_id)

    def show(action: str) -> list[dict[str, Any]]:
        return list(server.cli_json("audit", "show", "--action", action)["records"])

    (by_serial,) = [r for r in show("x509_svid.revoke") if r["target"] == serial]
    assert by_serial["subject"] == f"spiffe://{TD}/minted"
    assert by_serial["actor_kind"] == "admin"
    assert by_serial["details"]["reason"] == "laptop lost"
    assert by_serial["details"]["revoked_serials"] == [serial]
    (by_jti,) = [r for r in show("jwt_svid.revoke") if r["target"] == _jti(token)]
    assert (by_jti["subject"], by_jti["details"]["reason"]) == (f"spiffe://{TD}/minted", "leaked")
    assert by_jti["details"]["revoked_jtis"] == [_jti(token)]
    first, repeat = [r for r in show("entry.revoke") if r["target"] == entry_id]
    assert (first["subject"], first["owner"], first["actor_kind"]) == (gamma, "carol", "admin")
    assert first["details"]["reason"] == "compromised" and first["details"]["newly_revoked"]
    assert repeat["details"]["newly_revoked"] is False
    assert repeat["details"]["revoked_serials"] == []
    trace = server.cli_json("audit", "trace", "--spiffe-id", gamma)["records"]
    assert "entry.revoke" in [r["action"] for r in trace]
    assert token not in server.cli("audit", "export", output=None).stdout
    assert server.cli("audit", "verify", output=None).returncode == 0


@pytest.mark.postgres
def test_revocation_through_one_server_reaches_agents_of_the_other(
    tmp_path: Path, database_url: str
) -> None:
    """Two servers on one PostgreSQL database: an entry revoked through server B leaves the
    stream of a workload whose agent is connected to server A, and A (which holds the
    issuing CA's key) re-signs its CRL with the serial, which the workload receives."""
    root = short_temp_dir("credo-rev2-")
    try:
        a = start_server(tmp_path, data_dir=tmp_path / "a", datastore=database_url)
        with a, start_server(tmp_path, data_dir=tmp_path / "b", datastore=database_url) as b:
            agent = start_agent(a, root)
            with agent:
                entry_id = create_entry(a, agent.spiffe_id, ALPHA)
                keep = create_entry(a, agent.spiffe_id, BETA)
                assert keep
                wait_for(lambda: sorted(agent.fetch_ids()) == [ALPHA, BETA], 60, "both SVIDs")
                stream = Stream(agent)
                try:
                    message = stream.until(lambda m: _ids(m) == {ALPHA, BETA}, "both SVIDs")
                    old = _leaf(message, ALPHA)
                    b.cli_json("entry", "revoke", "--id", entry_id, "--reason", "via b")
                    message = stream.until(
                        lambda m: _ids(m) == {BETA} and _revokes(m, old.serial_number),
                        "ALPHA gone and its serial in A's CRL",
                    )
                    # The CRL listing the serial is signed by the CA that issued the SVID.
                    issuer = _issuing_ca(message, old)
                    (listing,) = [
                        c
                        for c in _crls(message)
                        if c.get_revoked_certificate_by_serial_number(old.serial_number)
                    ]
                    assert listing.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
                finally:
                    stream.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
