"""The CLI against the real admin API, served in-process by ``server.app.serve`` on a temp dir."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from credo.bundle import Bundle
from server.cli.main import cli
from server.config import load_config

app = pytest.importorskip("server.app", reason="server.app is not written yet")

TD = "example.org"
AGENT = f"spiffe://{TD}/credo/agent/join_token/cli-unit"


@pytest.fixture(scope="module")
def socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server (SQLite in a temp dir) running in a background thread; its admin socket."""
    data_dir = tmp_path_factory.mktemp("server")
    socket_dir = tempfile.mkdtemp(prefix="credo-")
    path = f"{socket_dir}/private/api.sock"
    config = load_config(
        None,
        {
            "trust_domain": TD,
            "data_dir": str(data_dir),
            "admin_socket": path,
            "bind_address": "127.0.0.1:0",
        },
    )
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["stop"] = asyncio.Event()
        await app.serve(config, ready=lambda _info: ready.set(), stop=state["stop"])

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the test below, not swallowed
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=target, name="credo-server", daemon=True)
    thread.start()
    assert ready.wait(60), "server did not start in 60s"
    if "error" in state:
        raise state["error"]
    try:
        yield path
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        shutil.rmtree(socket_dir, ignore_errors=True)


def run(socket: str, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, [*args, "--socket", socket], input=stdin)


def run_json(socket: str, *args: str, stdin: str | None = None) -> Any:
    result = run(socket, *args, "--output", "json", stdin=stdin)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def error_line(result: Result) -> str:
    """The one stderr line of a command that failed with exit code 1."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


def test_entry_lifecycle(socket: str) -> None:
    """create, show (by id and filters), update, delete and count go through the real API."""
    sid = f"spiffe://{TD}/unit/lifecycle"
    (entry,) = run_json(
        socket, "entry", "create", "--spiffe-id", sid, "--parent-id", AGENT,
        "--selector", "unix:uid:4242", "--jwt-svid-ttl", "2m", "--hint", "lc",
    )["entries"]  # fmt: skip
    assert entry["id"] and entry["jwt_svid_ttl"] == 120 and entry["hint"] == "lc"
    assert run_json(socket, "entry", "show", "--id", entry["id"])["entries"] == [entry]
    assert [e["id"] for e in run_json(socket, "entry", "show", "--spiffe-id", sid)["entries"]] == [
        entry["id"]
    ]
    found = run_json(socket, "entry", "show", "--selector", "unix:uid:4242")["entries"]
    assert [e["id"] for e in found] == [entry["id"]]
    exact = run_json(
        socket, "entry", "show", "--selector", "unix:uid:4242", "--selector", "unix:gid:1",
        "--match", "exact",
    )["entries"]  # fmt: skip
    assert exact == []
    (updated,) = run_json(socket, "entry", "update", "--id", entry["id"], "--dns", "lc.example")[
        "entries"
    ]
    assert updated["dns_names"] == ["lc.example"] and updated["hint"] == "lc"
    before = run_json(socket, "entry", "count")["count"]
    run_json(socket, "entry", "delete", "--id", entry["id"])
    assert run_json(socket, "entry", "count")["count"] == before - 1
    assert error_line(run(socket, "entry", "show", "--id", entry["id"])).startswith(
        "Error: entry not found"
    )


def test_server_side_refusals_are_one_line(socket: str) -> None:
    """Duplicates and IDs in another trust domain are refused by the server in one line."""
    args = ["entry", "create", "--spiffe-id", f"spiffe://{TD}/unit/dup", "--parent-id", AGENT,
            "--selector", "unix:uid:7"]  # fmt: skip
    run_json(socket, *args)
    assert "already exists" in error_line(run(socket, *args))
    foreign = run(
        socket, "entry", "create", "--spiffe-id", "spiffe://other.org/x", "--parent-id", AGENT,
        "--selector", "unix:uid:7",
    )  # fmt: skip
    assert "spiffe://other.org/x" in error_line(foreign)


def test_token_agents_and_bundle(socket: str) -> None:
    """token generate, agent list/count and bundle show in both formats work end to end."""
    token = run_json(socket, "token", "generate", "--ttl", "1m")
    assert token["token"] and 0 < token["expires_at"] - time.time() <= 61
    assert run_json(socket, "agent", "list") == {"agents": []}
    assert run_json(socket, "agent", "count") == {"count": 0}
    pem = run(socket, "bundle", "show").stdout
    roots = x509.load_pem_x509_certificates(pem.encode())
    bundle = Bundle.parse(TD, run(socket, "bundle", "show", "--format", "spiffe").stdout.encode())
    assert list(bundle.x509_authorities) == roots and bundle.jwt_authorities


def test_mint_and_verify(socket: str, tmp_path: Path) -> None:
    """x509 mint writes an SVID issued by a bundle authority; jwt mint verifies with the bundle."""
    run_json(socket, "x509", "mint", "--spiffe-id", f"spiffe://{TD}/m", "--write", str(tmp_path))
    leaf = x509.load_pem_x509_certificates((tmp_path / "svid.pem").read_bytes())[0]
    roots = x509.load_pem_x509_certificates((tmp_path / "bundle.pem").read_bytes())
    assert leaf.issuer in [r.subject for r in roots]
    minted = run_json(socket, "jwt", "mint", "--spiffe-id", f"spiffe://{TD}/m", "--audience", "svc")
    bundle = Bundle.parse(TD, run(socket, "bundle", "show", "--format", "spiffe").stdout.encode())
    kid = pyjwt.get_unverified_header(minted["token"])["kid"]
    claims = pyjwt.decode(
        minted["token"],
        bundle.jwt_authorities[kid],  # type: ignore[arg-type]
        algorithms=["ES256", "ES384", "RS256"],
        audience="svc",
    )
    assert claims["sub"] == f"spiffe://{TD}/m"


def test_localauthority_show_and_prepare(socket: str) -> None:
    """localauthority x509 show lists the active CA; prepare adds a prepared one."""
    state = run_json(socket, "localauthority", "x509", "show")
    assert state["active"]["authority_id"]
    prepared = run_json(socket, "localauthority", "jwt", "prepare")
    assert prepared["authority_id"]
    text = run(socket, "localauthority", "jwt", "show").stdout
    assert "Prepared JWT authority:" in text and prepared["authority_id"] in text


def test_empty_federated_bundle_is_stored_only_with_force(socket: str) -> None:
    """A federated bundle with an empty key set is refused by the server unless forced, and
    with --force it is stored and listed with no authorities."""
    args = ["bundle", "set", "--trust-domain", "revoked.example", "--format", "spiffe"]
    empty = '{"keys": [], "spiffe_sequence": 3}'
    assert "--force" in error_line(run(socket, *args, stdin=empty))
    run_json(socket, *args, "--force", stdin=empty)
    listed = run_json(socket, "bundle", "list")["bundles"]
    (stored,) = [b for b in listed if b["trust_domain"] == "revoked.example"]
    assert not stored.get("x509_authorities") and not stored.get("jwt_authorities")
    run_json(socket, "bundle", "delete", "--trust-domain", "revoked.example")
