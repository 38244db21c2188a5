"""Secrets on a real `credo-server run` process: key files, logs, and the CLI's bad-input errors.

The server runs with ``--log-level debug`` (the chattiest setting) through node attestation,
X.509-SVID signing (agent endpoint and `x509 mint`), JWT-SVID signing (agent endpoint and
`jwt mint`) and `token generate`; then its data dir and its complete log output are searched
for every secret it handled.
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from credo import Bundle, load_private_key
from credo._proto.credo.server.v1 import agent_pb2, agent_pb2_grpc
from credo.keys import generate_private_key, private_key_to_pkcs8_pem
from tests.helpers.processes import ServerProcess, start_server
from tests.helpers.server import make_csr

TD = "example.org"
PARENT = f"spiffe://{TD}/credo/agent/join_token/security-test"


# --- helpers --------------------------------------------------------------------------


def fetch_bundle(server: ServerProcess) -> Bundle:
    """`credo-server bundle show --format spiffe`, parsed."""
    result = server.cli("bundle", "show", "--format", "spiffe", output=None)
    assert result.returncode == 0, result.stderr
    return Bundle.parse(TD, result.stdout.encode())


def attest(server: ServerProcess, token: str) -> tuple[Any, list[bytes], str]:
    """Node-attest with ``token`` over TLS; (agent key, agent SVID chain DER, agent ID)."""
    key = generate_private_key()
    target = "localhost:" + server.address.rpartition(":")[2]
    creds = grpc.ssl_channel_credentials(root_certificates=fetch_bundle(server).marshal_pem())
    with grpc.secure_channel(target, creds) as channel:
        resp = agent_pb2_grpc.AgentStub(channel).AttestAgent(
            agent_pb2.AttestAgentRequest(
                attestation_data=agent_pb2.AttestationData(
                    type="join_token", payload=token.encode()
                ),
                csr=make_csr(key),
            ),
            timeout=30,
        )
    return key, list(resp.svid.cert_chain), resp.svid.spiffe_id


def agent_channel(server: ServerProcess, key: Any, chain: list[bytes]) -> grpc.Channel:
    """An mTLS channel to the agent endpoint presenting the agent SVID."""
    target = "localhost:" + server.address.rpartition(":")[2]
    chain_pem = b"".join(
        x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM) for c in chain
    )
    creds = grpc.ssl_channel_credentials(
        root_certificates=fetch_bundle(server).marshal_pem(),
        private_key=private_key_to_pkcs8_pem(key),
        certificate_chain=chain_pem,
    )
    return grpc.secure_channel(target, creds)


def _b64(data: bytes) -> list[str]:
    return [
        base64.b64encode(data).decode(),
        base64.urlsafe_b64encode(data).decode().rstrip("="),
    ]


def key_fingerprints(pem: bytes) -> list[str]:
    """Strings that would reveal the private key in ``pem`` if they appeared in a log."""
    key = load_private_key(pem)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    found = _b64(der)
    body = [ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----")]
    found.append("".join(body))
    found.extend(ln for ln in body if len(ln) >= 24)  # any single PEM line
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        scalar = key.private_numbers().private_value.to_bytes(size, "big")
        found.extend([*_b64(scalar), scalar.hex()])  # the JWK 'd' and the raw scalar
    elif isinstance(key, rsa.RSAPrivateKey):
        d = key.private_numbers().d
        raw = d.to_bytes((d.bit_length() + 7) // 8, "big")
        found.extend([*_b64(raw), raw.hex()])
    return found


# --- secrets at rest and in logs -------------------------------------------------------


@pytest.fixture
def debug_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server logging at debug level, with a fast rotation check and generous rate limits."""
    with start_server(
        tmp_path,
        trust_domain=TD,
        log_level="debug",
        attestation_rate_limit=100,
        rotation_check_interval=0.5,
    ) as running:
        yield running


def test_key_files_are_private_and_no_secret_reaches_the_logs(
    debug_server: ServerProcess,
) -> None:
    """Key files are 0600, no temp file remains, and no key, token or JWT is in the debug log."""
    server = debug_server
    secrets: dict[str, str] = {}  # secret string -> what it is

    token = server.cli_json("token", "generate")["token"]
    alias_token = server.cli_json("token", "generate", "--spiffe-id", f"spiffe://{TD}/node/alias")[
        "token"
    ]
    unused_token = server.cli_json("token", "generate", "--ttl", "60")["token"]
    for t in (token, alias_token, unused_token):
        secrets[t] = "join token"

    agent_key, agent_chain, agent_id = attest(server, token)
    _, _, alias_agent_id = attest(server, alias_token)
    assert token in agent_id and alias_token in alias_agent_id
    secrets.update(
        dict.fromkeys(key_fingerprints(private_key_to_pkcs8_pem(agent_key)), "agent key")
    )

    (entry,) = server.cli_json(
        "entry", "create", "--spiffe-id", f"spiffe://{TD}/secure/web", "--parent-id", agent_id,
        "--selector", "unix:uid:1000",
    )["entries"]  # fmt: skip

    with agent_channel(server, agent_key, agent_chain) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        signed = stub.BatchNewX509SVID(
            agent_pb2.BatchNewX509SVIDRequest(
                params=[agent_pb2.NewX509SVIDParams(entry_id=entry["id"], csr=make_csr())]
            ),
            timeout=30,
        )
        assert signed.results[0].status.code == 0
        jwt_reply = stub.NewJWTSVID(
            agent_pb2.NewJWTSVIDRequest(entry_id=entry["id"], audience=["db"]), timeout=30
        )
    jwts = [jwt_reply.svid.token]

    minted = server.cli_json("x509", "mint", "--spiffe-id", f"spiffe://{TD}/secure/minted")
    assert "PRIVATE KEY" in minted["private_key"]
    secrets.update(dict.fromkeys(key_fingerprints(minted["private_key"].encode()), "minted key"))
    write_dir = server.data_dir.parent / "minted"
    write_dir.mkdir()
    server.cli("x509", "mint", "--spiffe-id", f"spiffe://{TD}/secure/w", "--write", str(write_dir))
    jwts.append(
        server.cli_json("jwt", "mint", "--spiffe-id", f"spiffe://{TD}/secure/j", "--audience", "x")[
            "token"
        ]
    )
    for jwt in jwts:
        assert jwt.count(".") == 2
        secrets[jwt] = "JWT-SVID"
        secrets[jwt.rsplit(".", 1)[1]] = "JWT-SVID signature"

    # A rotation step and a restart exercise key writes, reconciliation and reloads.
    server.cli_json("localauthority", "x509", "prepare")
    server.cli_json("localauthority", "jwt", "prepare")
    server.restart()
    server.stop()

    # --- keys at rest ---
    key_files = []
    for path in sorted(server.data_dir.rglob("*")):
        assert not path.name.startswith(".tmp-"), f"temporary file left behind: {path}"
        assert not path.name.endswith((".tmp", ".partial")), f"temporary file left: {path}"
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes():
            key_files.append(path)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} is not 0600"
            secrets.update(dict.fromkeys(key_fingerprints(path.read_bytes()), f"key {path.name}"))
    names = {p.name for p in key_files}
    assert any(n.startswith("x509-ca-") for n in names), names
    assert any(n.startswith("jwt-") for n in names), names
    keys_dir = server.data_dir / "keys"
    assert {p.parent for p in key_files} == {keys_dir}, "a private key outside the keys dir"
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((write_dir / "key.pem").stat().st_mode) == 0o600

    # --- the complete log output ---
    logs = server.logs
    assert "attested" in logs.lower() or "attest" in logs.lower(), "logs do not cover attestation"
    assert "DEBUG" in logs, "the server did not log at debug level"
    assert "PRIVATE KEY" not in logs
    leaked = sorted({what for secret, what in secrets.items() if secret in logs})
    assert not leaked, f"secrets in the server log: {leaked}"
    # Agent IDs carry a join token: logs shorten it to its first 8 characters.
    assert f"join_token/{token[:8]}" in logs


def test_admin_socket_is_private(tmp_path: Path) -> None:
    """The admin socket is mode 0600 in a 0700 directory."""
    with start_server(tmp_path, trust_domain=TD) as server:
        assert stat.S_IMODE(server.admin_socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(server.admin_socket.parent.stat().st_mode) == 0o700


# --- bad input through the CLI ---------------------------------------------------------


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed CLI run: non-zero exit, no traceback, no stdout."""
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout.strip() == "", result.stdout
    return lines[0]


BAD_INPUT: list[tuple[str, list[str], str]] = [
    (
        "malformed SPIFFE ID",
        ["entry", "create", "--spiffe-id", "not-a-spiffe-id", "--parent-id", PARENT,
         "--selector", "unix:uid:1000"],
        "--spiffe-id",
    ),
    (
        "selector without a type",
        ["entry", "create", "--spiffe-id", f"spiffe://{TD}/b", "--parent-id", PARENT,
         "--selector", "uid1000"],
        "selector",
    ),
    (
        "SPIFFE ID in another trust domain",
        ["entry", "create", "--spiffe-id", "spiffe://other.org/b", "--parent-id", PARENT,
         "--selector", "unix:uid:1000"],
        "spiffe_id",
    ),
    (
        "parent ID in another trust domain",
        ["entry", "create", "--spiffe-id", f"spiffe://{TD}/b", "--parent-id",
         "spiffe://other.org/agent", "--selector", "unix:uid:1000"],
        "parent_id",
    ),
    (
        "negative TTL",
        ["entry", "create", "--spiffe-id", f"spiffe://{TD}/b", "--parent-id", PARENT,
         "--selector", "unix:uid:1000", "--x509-svid-ttl", "-5"],
        "--x509-svid-ttl",
    ),
    (
        "zero TTL",
        ["entry", "create", "--spiffe-id", f"spiffe://{TD}/b", "--parent-id", PARENT,
         "--selector", "unix:uid:1000", "--jwt-svid-ttl", "0"],
        "--jwt-svid-ttl",
    ),
    (
        "duplicate entry",
        ["entry", "create", "--spiffe-id", f"spiffe://{TD}/a", "--parent-id", PARENT,
         "--selector", "unix:uid:1000"],
        "already exists",
    ),
    ("unknown entry id (show)", ["entry", "show", "--id", "no-such-entry"], "not found"),
    ("unknown entry id (update)", ["entry", "update", "--id", "no-such-entry", "--hint", "h"],
     "not found"),
    ("unknown entry id (delete)", ["entry", "delete", "--id", "no-such-entry"], "not found"),
    (
        "unknown agent",
        ["agent", "ban", "--spiffe-id", f"spiffe://{TD}/credo/agent/join_token/nobody"],
        "not found",
    ),
    (
        "mint in another trust domain",
        ["x509", "mint", "--spiffe-id", "spiffe://other.org/w"],
        "trust domain",
    ),
    (
        "unknown authority",
        ["localauthority", "x509", "activate", "--authority-id", "no-such-authority"],
        "not found",
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the bad-input cases, holding the entry the duplicate case repeats."""
    with start_server(tmp_path_factory.mktemp("cli"), trust_domain=TD) as running:
        running.cli_json(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/a", "--parent-id", PARENT,
            "--selector", "unix:uid:1000",
        )  # fmt: skip
        yield running


@pytest.mark.parametrize(
    ("case", "args", "expected", "output"),
    # Half the cases with --output text, half with --output json: errors look the same.
    [(*c, ("text", "json")[i % 2]) for i, c in enumerate(BAD_INPUT)],
    ids=[c[0] for c in BAD_INPUT],
)
def test_bad_input_gives_one_line_and_changes_nothing(
    cli_server: ServerProcess, case: str, args: list[str], expected: str, output: str
) -> None:
    """Bad CLI input exits non-zero with one stderr line naming the problem; no entry changes
    (what the server holds is read over the admin API, so each case starts one CLI process)."""
    before = cli_server.entries()
    line = one_line_failure(cli_server.cli(*args, output=output))
    assert expected in line, line
    assert cli_server.entries() == before
    assert cli_server.entry_count() == len(before)


def test_bad_batch_creates_nothing(cli_server: ServerProcess, tmp_path: Path) -> None:
    """A --data batch with one bad entry is refused as a whole: one line, no entry created."""
    before = cli_server.entry_count()
    doc = {
        "entries": [
            {"spiffe_id": f"spiffe://{TD}/batch/ok", "parent_id": PARENT,
             "selectors": [{"type": "unix", "value": "uid:1"}]},
            {"spiffe_id": "spiffe://other.org/batch/bad", "parent_id": PARENT,
             "selectors": [{"type": "unix", "value": "uid:2"}]},
        ]
    }  # fmt: skip
    data = tmp_path / "batch.json"
    data.write_text(json.dumps(doc))
    line = one_line_failure(cli_server.cli("entry", "create", "--data", str(data)))
    assert "other.org" in line, line
    assert cli_server.entry_count() == before
    assert [e for e in cli_server.entries() if e.spiffe_id == f"spiffe://{TD}/batch/ok"] == []
