"""WIT-SVIDs end to end: a real `credo-server run` and `credo-agent run`; workloads fetch
WIT-SVIDs through the Workload API and authenticate HTTP requests to each other with them.

The independent checks use code we did not write: joserfc and PyJWT verify the WIT's
signature against the WIT keys of the server's SPIFFE bundle (``use: wit-svid``) and read its
standard header and claims; the private key the agent made is checked against ``cnf.jwk``.
The server runs with a 20 s WIT-SVID TTL, so the agent renews WITs within the test.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt as pyjwt
import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, KeySet

from credo import Bundle, WitSvid, create_wpt
from credo._proto import workload_pb2, workload_pb2_grpc
from credo.errors import WitSvidRevoked
from credo.revocation import JwtRevocationList
from credo.witsvid import private_key_from_jwk
from credo.wpt import WIT_HEADER, WPT_HEADER
from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    credo_agent_command,
    one_line_error,
    short_temp_dir,
    start_agent,
    start_server,
    wait_for,
)

pytest.importorskip("spiffe")

TD = "example.org"
ALPHA = f"spiffe://{TD}/wit/alpha"
BETA = f"spiffe://{TD}/wit/beta"
HEADER = (("workload.spiffe.io", "true"),)
WIT_TTL = 20
CALL_TIMEOUT = 30.0


@dataclass
class Deployment:
    server: ServerProcess
    agent: AgentProcess
    root: Path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = short_temp_dir("credo-wit-", mode=0o755)
    try:
        server_dir = tmp_path_factory.mktemp("wit-server")
        with start_server(
            server_dir, wit_svid_ttl=f"{WIT_TTL}s", http_bind_address="127.0.0.1:0"
        ) as server:
            agent = start_agent(server, root)
            with agent:
                for spiffe_id in (ALPHA, BETA):
                    create_entry(server, agent.spiffe_id, spiffe_id)
                wait_for(
                    lambda: sorted(agent.fetch_ids()) == [ALPHA, BETA],
                    60,
                    "both identities to reach the agent",
                )
                yield Deployment(server, agent, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stub(channel: grpc.Channel) -> Any:
    return workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]


def _first_wits(agent: AgentProcess) -> dict[str, Any]:
    """The first FetchWITSVID message, by SPIFFE ID."""
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        stream = _stub(channel).FetchWITSVID(
            workload_pb2.WITSVIDRequest(), metadata=HEADER, timeout=CALL_TIMEOUT
        )
        try:
            return {s.spiffe_id: s for s in next(stream).svids}
        finally:
            stream.cancel()


def _server_wit_keys(server: ServerProcess) -> KeySet:
    """The WIT keys of the server's SPIFFE bundle (``bundle show --format spiffe``), loaded
    by joserfc: the verifier's path does not go through the agent or credo's parser."""
    result = server.cli("bundle", "show", "--format", "spiffe", output=None)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    wit_keys = [k for k in doc["keys"] if k.get("use") == "wit-svid"]
    assert wit_keys, doc
    assert not {k["kid"] for k in wit_keys} & {
        k.get("kid") for k in doc["keys"] if k.get("use") == "jwt-svid"
    }
    # JOSE libraries know only use sig/enc: the verifier picks the wit-svid keys, then drops
    # the SPIFFE-specific member before handing them to joserfc.
    return KeySet.import_key_set(
        {"keys": [{k: v for k, v in key.items() if k != "use"} for key in wit_keys]}
    )


# --- the WIT-SVID itself -------------------------------------------------------------------


def test_wit_svid_and_key_checked_by_joserfc_and_pyjwt(deployment: Deployment) -> None:
    """A workload gets a WIT-SVID and its private key; joserfc verifies the signature with the
    bundle's wit-svid key, the header is typ wit+jwt with kid, the claims carry sub, exp, iat,
    jti and cnf.jwk (the workload's key, with alg) and no aud."""
    wits = _first_wits(deployment.agent)
    assert set(wits) == {ALPHA, BETA}
    item = wits[ALPHA]
    token = jose_jwt.decode(
        item.wit_svid, _server_wit_keys(deployment.server), algorithms=["ES256"]
    )
    assert token.header["typ"] == "wit+jwt" and token.header["alg"] == "ES256"
    assert token.header["kid"]
    claims = token.claims
    assert claims["sub"] == ALPHA
    assert "aud" not in claims
    assert claims["exp"] - claims["iat"] == WIT_TTL
    assert claims["exp"] > time.time()
    assert isinstance(claims["jti"], str) and claims["jti"] != wits[BETA].wit_svid
    jose_jwt.JWTClaimsRegistry(exp={"essential": True}, sub={"essential": True}).validate(claims)
    # The key in wit_svid_key (a JWK) is the one cnf.jwk binds.
    private = ECKey.import_key(json.loads(item.wit_svid_key))
    assert private.as_dict(private=False)["x"] == claims["cnf"]["jwk"]["x"]
    assert claims["cnf"]["jwk"]["alg"] == "ES256" and "d" not in claims["cnf"]["jwk"]
    # PyJWT agrees, with the public key of the same kid.
    kid = token.header["kid"]
    public = _server_wit_keys(deployment.server).get_by_kid(kid).as_dict(private=False)
    decoded = pyjwt.decode(item.wit_svid, pyjwt.PyJWK({**public, "alg": "ES256"}).key, ["ES256"])
    assert decoded["sub"] == ALPHA
    # The two identities got distinct key pairs.
    assert wits[BETA].wit_svid_key != item.wit_svid_key


# --- two workloads over HTTP ---------------------------------------------------------------

_VERIFIER = r"""
import http.server, json, sys
from credo import verify_request
from credo.errors import CredoError
from credo.workload_client import WorkloadApiClient

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        audience = f"http://127.0.0.1:{self.server.server_port}{self.path}"
        with WorkloadApiClient() as client:
            bundles = client.fetch_wit_bundles()
        try:
            proof = verify_request(dict(self.headers.items()), audience, bundles)
        except CredoError as err:
            status, body = 401, {"error": str(err)}
        else:
            status, body = 200, {"spiffe_id": proof.spiffe_id, "jti": proof.jti}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_port, flush=True)
server.serve_forever()
"""


@pytest.fixture
def verifier(deployment: Deployment) -> Iterator[str]:
    """A second workload: an HTTP server that authenticates callers by WIT + proof token,
    against the WIT bundles it fetches from the Workload API itself."""
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": deployment.agent.endpoint}
    proc = subprocess.Popen(
        [sys.executable, "-c", _VERIFIER], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/hello"
    finally:
        proc.terminate()
        proc.wait(10)


def _get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_second_workload_verifies_wit_and_proof_over_http(
    deployment: Deployment, verifier: str, tmp_path: Path
) -> None:
    """A request with the WIT and a proof bound to it is accepted as ALPHA; a proof with the
    wrong wth (another WIT's), the wrong aud, an expired exp, or no proof at all is refused."""
    wits = _first_wits(deployment.agent)
    alpha = WitSvid.parse_insecure(wits[ALPHA].wit_svid)
    key = private_key_from_jwk(wits[ALPHA].wit_svid_key)
    good = {WIT_HEADER: alpha.token, WPT_HEADER: create_wpt(alpha, key, verifier)}
    status, body = _get(verifier, good)
    assert (status, body["spiffe_id"]) == (200, ALPHA), body

    # wth: a proof made (with the same key) for another WIT that binds the same key.
    pem = tmp_path / "alpha.pem"
    pem.write_bytes(key.public_key().public_bytes(*_pem_spki()))
    other = deployment.server.cli_json(
        "wit", "mint", "--spiffe-id", ALPHA, "--public-key", str(pem)
    )["token"]
    beta = WitSvid.parse_insecure(wits[BETA].wit_svid)
    beta_key = private_key_from_jwk(wits[BETA].wit_svid_key)
    cases = {
        "wth": {WIT_HEADER: alpha.token, WPT_HEADER: create_wpt(other, key, verifier)},
        "signature": {WIT_HEADER: alpha.token, WPT_HEADER: create_wpt(beta, beta_key, verifier)},
        "aud": {WIT_HEADER: alpha.token, WPT_HEADER: create_wpt(alpha, key, verifier + "x")},
        "expired": {
            WIT_HEADER: alpha.token,
            WPT_HEADER: create_wpt(alpha, key, verifier, now=datetime.now(UTC) - timedelta(5)),
        },
        "Workload-Proof-Token header": {WIT_HEADER: alpha.token},
    }
    for word, headers in cases.items():
        status, body = _get(verifier, headers)
        assert status == 401 and word in body["error"], (word, body)


# --- renewal, authority rotation, CLI ------------------------------------------------------


@pytest.mark.slow
def test_wit_stream_pushes_renewed_wit_before_expiry(deployment: Deployment) -> None:
    """The FetchWITSVID stream pushes a new WIT (new key, new jti) at about half its
    lifetime, while the first one is still valid."""
    with grpc.insecure_channel(f"unix:{deployment.agent.socket}") as channel:
        stream = _stub(channel).FetchWITSVID(
            workload_pb2.WITSVIDRequest(), metadata=HEADER, timeout=3 * WIT_TTL
        )
        try:
            first = {s.spiffe_id: s for s in next(stream).svids}[ALPHA]
            # Each identity renews at its own jittered time: BETA's renewal may come first.
            second = first
            while second.wit_svid == first.wit_svid:
                second = {s.spiffe_id: s for s in next(stream).svids}[ALPHA]
            arrived = datetime.now(UTC)
        finally:
            stream.cancel()
    old, new = WitSvid.parse_insecure(first.wit_svid), WitSvid.parse_insecure(second.wit_svid)
    assert new.jti != old.jti and second.wit_svid_key != first.wit_svid_key
    assert new.expires_at > old.expires_at
    assert arrived < old.expires_at
    keys = _server_wit_keys(deployment.server)
    jose_jwt.decode(second.wit_svid, keys, algorithms=["ES256"])


def test_wit_authority_rotation_reaches_workloads(deployment: Deployment) -> None:
    """localauthority wit prepare publishes the next key in FetchWITBundles; after activate
    and taint of the old one, the agent drops WITs it signed and the stream pushes WITs
    signed by the new key."""
    server = deployment.server
    old_kid = server.cli_json("localauthority", "wit", "show")["active"]["authority_id"]
    with grpc.insecure_channel(f"unix:{deployment.agent.socket}") as channel:
        stub = _stub(channel)
        bundles = stub.FetchWITBundles(
            workload_pb2.WITBundlesRequest(), metadata=HEADER, timeout=60
        )
        wit_stream = stub.FetchWITSVID(workload_pb2.WITSVIDRequest(), metadata=HEADER, timeout=60)
        try:
            own = f"spiffe://{TD}"
            assert old_kid in next(bundles).bundles[own]
            first = WitSvid.parse_insecure(next(wit_stream).svids[0].wit_svid)
            assert first.key_id == old_kid
            new_kid = server.cli_json("localauthority", "wit", "prepare")["authority_id"]
            doc = json.loads(next(bundles).bundles[own])
            assert {k["kid"] for k in doc["keys"]} == {old_kid, new_kid}
            # A plain JWKS that a JOSE library loads as it is.
            assert len(KeySet.import_key_set(doc).keys) == 2
            server.cli_json("localauthority", "wit", "activate", "--authority-id", new_kid)
            server.cli_json("localauthority", "wit", "taint", "--authority-id", old_kid)
            deadline = time.monotonic() + 30
            kid = old_kid
            while kid != new_kid and time.monotonic() < deadline:
                kid = WitSvid.parse_insecure(next(wit_stream).svids[0].wit_svid).key_id
            assert kid == new_kid
        finally:
            bundles.cancel()
            wit_stream.cancel()
    server.cli_json("localauthority", "wit", "revoke", "--authority-id", old_kid)
    assert old_kid not in json.dumps(json.loads(_first_bundles(deployment.agent)))


def _first_bundles(agent: AgentProcess) -> str:
    deadline = time.monotonic() + 30
    while True:
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            stream = _stub(channel).FetchWITBundles(
                workload_pb2.WITBundlesRequest(), metadata=HEADER, timeout=CALL_TIMEOUT
            )
            try:
                text = str(next(stream).bundles[f"spiffe://{TD}"])
            finally:
                stream.cancel()
        if len(json.loads(text)["keys"]) == 1 or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_cli_fetch_wit_and_server_wit_mint(deployment: Deployment, tmp_path: Path) -> None:
    """`credo-agent api fetch wit` prints the WITs and writes token and key 0600; `credo-server
    wit mint` makes one (with a key pair, or for a given public key); bad input is one line."""
    agent, server = deployment.agent, deployment.server
    out_dir = tmp_path / "wit"
    result = subprocess.run(
        [
            *credo_agent_command(),
            "api",
            "fetch",
            "wit",
            "--socket",
            str(agent.socket),
            "--output",
            "json",
            "--write",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout.split("\nWrote")[0])
    assert {w["spiffe_id"] for w in listed} == {ALPHA, BETA}
    for name in ("wit.0.jwt", "wit.0.key.jwk"):
        assert stat.S_IMODE((out_dir / name).stat().st_mode) == 0o600
    token = (out_dir / "wit.0.jwt").read_text()
    key = private_key_from_jwk((out_dir / "wit.0.key.jwk").read_text())
    create_wpt(token, key, "https://x/")  # the written key is the WIT's cnf key

    minted = server.cli_json("wit", "mint", "--spiffe-id", f"spiffe://{TD}/minted", "--ttl", "2m")
    claims = jose_jwt.decode(minted["token"], _server_wit_keys(server), algorithms=["ES256"]).claims
    assert claims["sub"] == f"spiffe://{TD}/minted" and claims["exp"] - claims["iat"] == 120
    create_wpt(minted["token"], private_key_from_jwk(minted["private_key"]), "https://x/")

    pem = tmp_path / "pub.pem"
    pem.write_bytes(key.public_key().public_bytes(*_pem_spki()))
    bound = server.cli_json(
        "wit", "mint", "--spiffe-id", f"spiffe://{TD}/b", "--public-key", str(pem)
    )
    assert "private_key" not in bound
    create_wpt(bound["token"], key, "https://x/")

    bad_td = server.cli("wit", "mint", "--spiffe-id", "spiffe://other.org/x")
    assert "trust domain" in one_line_error(bad_td)
    (tmp_path / "junk.pem").write_text("junk")
    bad_key = server.cli(
        "wit", "mint", "--spiffe-id", ALPHA, "--public-key", str(tmp_path / "junk.pem")
    )
    assert bad_key.returncode != 0 and "not a PEM or DER public key" in bad_key.stderr
    assert "Traceback" not in bad_key.stderr


def _pem_spki() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo


def test_no_wit_or_key_in_logs(deployment: Deployment) -> None:
    """Neither the server's nor the agent's log holds a WIT-SVID or its private key."""
    wits = _first_wits(deployment.agent)
    logs = deployment.server.logs + deployment.agent.logs
    for item in wits.values():
        assert item.wit_svid.split(".")[1] not in logs
        assert json.loads(item.wit_svid_key)["d"] not in logs


# --- revocation ----------------------------------------------------------------------------


def _bundle(server: ServerProcess) -> Bundle:
    shown = server.cli("bundle", "show", "--format", "spiffe", output=None).stdout
    return Bundle.parse(TD, shown)


def _revocation_list(server: ServerProcess) -> JwtRevocationList:
    trust = ssl.create_default_context(cadata=server.bundle_pem())
    return JwtRevocationList.fetch(
        f"{server.http_url}/jwt-revocations", _bundle(server).jwt_bundle(), context=trust
    )


def test_revoking_a_wit_by_jti_reaches_agent_and_verifiers(deployment: Deployment) -> None:
    """`jwt revoke --jti` takes a WIT-SVID's jti: the signed list at /jwt-revocations carries
    it, so a verifier passing that list to WitSvid.parse_and_validate refuses the WIT (and
    still accepts the replacement); the agent drops the revoked WIT and its workload gets a
    new one; revoking again revokes nothing more."""
    server, agent = deployment.server, deployment.agent
    bundle = _bundle(server).wit_bundle()

    # A WIT just renewed (most of its 20 s left), so that it is still unexpired when the
    # verifier checks it after the CLI calls below.
    def renewed() -> str | None:
        token = str(_first_wits(agent)[ALPHA].wit_svid)
        left = WitSvid.parse_insecure(token).expires_at.timestamp() - time.time()
        return token if left > WIT_TTL - 4 else None

    old = str(wait_for(renewed, 2 * WIT_TTL, "a freshly renewed WIT-SVID", interval=0.5))
    jti = WitSvid.parse_insecure(old).jti
    assert jti
    out = server.cli_json("jwt", "revoke", "--jti", jti, "--reason", "wit leaked")
    assert [(j["jti"], j["spiffe_id"]) for j in out["revoked_jwts"]] == [(jti, ALPHA)]
    listed = _revocation_list(server)
    assert jti in listed
    with pytest.raises(WitSvidRevoked, match="revoked"):
        WitSvid.parse_and_validate(old, bundle, revoked=listed)
    assert server.cli_json("jwt", "revoke", "--jti", jti)["revoked_jwts"] == []
    wait_for(
        lambda: "dropped revoked WIT-SVIDs" in agent.logs,
        CALL_TIMEOUT,
        "the agent to drop the revoked WIT-SVID",
    )
    new = _first_wits(agent)[ALPHA].wit_svid
    assert WitSvid.parse_insecure(new).jti != jti
    assert str(WitSvid.parse_and_validate(new, bundle, revoked=listed).spiffe_id) == ALPHA
    records = server.cli_json("audit", "show", "--action", "jwt_svid.revoke")["records"]
    first = next(r for r in records if r["target"] == jti)
    assert first["details"]["reason"] == "wit leaked"
    assert first["details"]["revoked_jtis"] == [jti] and first["subject"] == ALPHA


def test_entry_revoke_and_wit_mint_revocation(deployment: Deployment) -> None:
    """`entry revoke` revokes the unexpired WIT-SVIDs issued for the entry and the workload's
    stream serves none for it again; a WIT minted with `wit mint` is revocable by its jti."""
    server, agent = deployment.server, deployment.agent
    minted = server.cli_json("wit", "mint", "--spiffe-id", f"spiffe://{TD}/minted-wit")
    minted_jti = WitSvid.parse_insecure(minted["token"]).jti
    out = server.cli_json("jwt", "revoke", "--jti", minted_jti)
    assert [j["jti"] for j in out["revoked_jwts"]] == [minted_jti]

    gamma = f"spiffe://{TD}/wit/gamma"
    entry_id = create_entry(server, agent.spiffe_id, gamma)
    wait_for(lambda: gamma in _first_wits(agent), 60, "a WIT-SVID for the new entry")
    issued = WitSvid.parse_insecure(_first_wits(agent)[gamma].wit_svid).jti
    out = server.cli_json("entry", "revoke", "--id", entry_id, "--reason", "compromised")
    revoked = {j["jti"]: j for j in out["revoked_jwts"]}
    assert issued in revoked
    assert revoked[issued]["entry_id"] == entry_id
    assert revoked[issued]["agent_id"] == agent.spiffe_id
    wait_for(lambda: gamma not in _first_wits(agent), 30, "the revoked entry's WIT to go")
    assert issued in _revocation_list(server)
