"""`credo-server` run as a real process and administered through its real CLI (subprocesses)."""

from __future__ import annotations

import json
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from credo.bundle import Bundle
from tests.helpers.processes import ServerProcess, start_server

TD = "example.org"
AGENT = f"spiffe://{TD}/credo/agent/join_token/cli-test"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A running credo-server on a temp data dir, socket and free port."""
    with start_server(tmp_path, trust_domain=TD) as running:
        yield running


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed CLI run (exit 1, no traceback)."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


def test_entries_and_bundle_survive_a_restart(server: ServerProcess) -> None:
    """Create, show, update, delete and count entries; after a restart, entries and CA remain."""
    assert server.cli("healthcheck", output=None).stdout.strip() == "server is healthy"

    created = server.cli_json(
        "entry", "create", "--spiffe-id", f"spiffe://{TD}/web", "--parent-id", AGENT,
        "--selector", "unix:uid:1000", "--selector", "unix:gid:1000", "--dns", "web.local",
    )["entries"]  # fmt: skip
    (web,) = created
    assert web["id"]
    assert web["spiffe_id"] == f"spiffe://{TD}/web"
    assert web["parent_id"] == AGENT
    assert sorted(s["value"] for s in web["selectors"]) == ["gid:1000", "uid:1000"]
    assert web["dns_names"] == ["web.local"]

    (db,) = server.cli_json(
        "entry", "create", "--spiffe-id", f"spiffe://{TD}/db", "--parent-id", AGENT,
        "--selector", "unix:uid:2000",
    )["entries"]  # fmt: skip
    assert server.cli_json("entry", "count") == {"count": 2}

    shown = server.cli_json("entry", "show", "--id", web["id"])["entries"]
    assert [e["id"] for e in shown] == [web["id"]]
    by_id = server.cli_json("entry", "show", "--spiffe-id", f"spiffe://{TD}/db")["entries"]
    assert [e["id"] for e in by_id] == [db["id"]]
    by_selector = server.cli_json("entry", "show", "--selector", "unix:uid:1000")["entries"]
    assert [e["id"] for e in by_selector] == [web["id"]]
    assert {e["id"] for e in server.cli_json("entry", "show")["entries"]} == {web["id"], db["id"]}

    (updated,) = server.cli_json(
        "entry", "update", "--id", web["id"], "--x509-svid-ttl", "10m", "--hint", "frontend"
    )["entries"]
    assert updated["x509_svid_ttl"] == 600 and updated["hint"] == "frontend"
    assert updated["dns_names"] == ["web.local"]

    deleted = server.cli_json("entry", "delete", "--id", db["id"])["entries"]
    assert [e["id"] for e in deleted] == [db["id"]]
    assert server.cli_json("entry", "count") == {"count": 1}
    assert "entry not found" in one_line_error(server.cli("entry", "show", "--id", db["id"]))

    token = server.cli_json("token", "generate", "--ttl", "5m")
    assert token["token"] and token["expires_at"] > time.time()
    assert server.cli_json("agent", "list") == {"agents": []}
    assert server.cli_json("agent", "count") == {"count": 0}

    pem = server.cli("bundle", "show", output=None).stdout
    authorities = x509.load_pem_x509_certificates(pem.encode())
    assert authorities
    jwks = server.cli("bundle", "show", "--format", "spiffe", output=None).stdout
    spiffe = Bundle.parse(TD, jwks.encode())
    assert list(spiffe.x509_authorities) == authorities
    assert spiffe.jwt_authorities

    assert server.stop() == 0  # SIGTERM is a clean shutdown
    server.start()

    (after,) = server.cli_json("entry", "show")["entries"]
    assert after == updated
    after_pem = server.cli("bundle", "show", output=None).stdout
    assert x509.load_pem_x509_certificates(after_pem.encode()) == authorities


def test_bad_requests_are_one_line_against_the_real_server(server: ServerProcess) -> None:
    """The server's refusals (duplicates, unknown ids, foreign trust domain) are one line."""
    args = ["entry", "create", "--spiffe-id", f"spiffe://{TD}/dup", "--parent-id", AGENT,
            "--selector", "unix:uid:1"]  # fmt: skip
    server.cli_json(*args)
    assert "already exists" in one_line_error(server.cli(*args))
    assert "not found" in one_line_error(server.cli("entry", "delete", "--id", "no-such-id"))
    assert "not found" in one_line_error(
        server.cli("agent", "show", "--spiffe-id", f"spiffe://{TD}/credo/agent/join_token/x")
    )
    foreign = server.cli(
        "entry", "create", "--spiffe-id", "spiffe://other.org/web", "--parent-id", AGENT,
        "--selector", "unix:uid:1",
    )  # fmt: skip
    assert "spiffe://other.org/web" in one_line_error(foreign)
    assert server.cli_json("entry", "count") == {"count": 1}


def test_batch_create_from_a_file(server: ServerProcess, tmp_path: Path) -> None:
    """`entry create --data FILE` creates every entry of the batch in one call."""
    path = tmp_path / "entries.json"
    path.write_text(
        json.dumps(
            {
                "entries": [
                    {"spiffe_id": f"spiffe://{TD}/batch/{i}", "parent_id": AGENT,
                     "selectors": [{"type": "unix", "value": f"uid:{i}"}]}
                    for i in range(20)
                ]
            }
        )
    )  # fmt: skip
    created = server.cli_json("entry", "create", "--data", str(path))["entries"]
    assert len(created) == 20
    assert server.cli_json("entry", "count") == {"count": 20}


def test_node_alias_entry(server: ServerProcess) -> None:
    """`entry create --node` makes a node-alias entry parented to the server's ID."""
    (entry,) = server.cli_json(
        "entry", "create", "--node", "--spiffe-id", f"spiffe://{TD}/nodes/linux",
        "--selector", "join_token:abc",
    )["entries"]  # fmt: skip
    assert entry["node_alias"] is True
    assert entry["parent_id"] == f"spiffe://{TD}/credo/server"


def test_mint_svids(server: ServerProcess, tmp_path: Path) -> None:
    """`x509 mint --write` writes an SVID chaining to the bundle; `jwt mint` prints a token."""
    out_dir = tmp_path / "minted"
    server.cli_json("x509", "mint", "--spiffe-id", f"spiffe://{TD}/mint", "--write", str(out_dir))
    assert stat.S_IMODE((out_dir / "key.pem").stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificates((out_dir / "svid.pem").read_bytes())[0]
    roots = x509.load_pem_x509_certificates((out_dir / "bundle.pem").read_bytes())
    assert leaf.issuer in [r.subject for r in roots]
    minted = server.cli(
        "jwt", "mint", "--spiffe-id", f"spiffe://{TD}/mint", "--audience", "api", output=None
    )
    assert minted.stdout.strip().count(".") == 2


def test_localauthority_show(server: ServerProcess) -> None:
    """`localauthority x509 show` reports an active authority with an id and expiry."""
    state = server.cli_json("localauthority", "x509", "show")
    assert state["active"]["authority_id"]
    assert state["active"]["expires_at"] > time.time()
