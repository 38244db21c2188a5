"""``credo-server delegation ...`` against the real admin API of an in-process server."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from server.cli.main import cli
from server.config import load_config

app = pytest.importorskip("server.app")

TD = "example.org"
AGENT = f"spiffe://{TD}/agents/reviewer"


@pytest.fixture(scope="module")
def socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server trusting one subject issuer, ``corp``, in a background thread."""
    data_dir = tmp_path_factory.mktemp("server")
    socket_dir = tempfile.mkdtemp(prefix="credo-")
    path = f"{socket_dir}/private/api.sock"
    jwks = data_dir / "corp.jwks"
    jwks.write_text('{"keys": []}')
    toml = data_dir / "server.toml"
    toml.write_text(
        "[server.delegation.issuers.corp]\n"
        'issuer = "https://login.example.com"\n'
        f'jwks_file = "{jwks}"\n'
        'audience = ["credo"]\n'
    )
    config = load_config(
        Path(toml),
        {
            "trust_domain": TD,
            "data_dir": str(data_dir),
            "admin_socket": path,
            "bind_address": "127.0.0.1:0",
            "signing_workers": 0,
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
        except BaseException as exc:
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


def run(socket: str, *args: str) -> Result:
    return CliRunner().invoke(cli, [*args, "--socket", socket])


def run_json(socket: str, *args: str) -> Any:
    result = run(socket, *args, "--output", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


CREATE = (
    "delegation",
    "create",
    "--agent-id",
    AGENT,
    "--subject-issuer",
    "corp",
    "--subject-claim",
    "groups=eng",
    "--scope",
    "repo:read",
    "--scope",
    "repo:write",
    "--audience",
    "https://git.example.com",
    "--budget",
    "repo:write=10/1h",
)


def test_create_show_update_list_delete(socket: str) -> None:
    """A policy goes through its whole life; defaults are 5m and depth 1; update bumps it."""
    (created,) = run_json(socket, *CREATE)["policies"]
    assert created["max_ttl"] == 300 and created["max_depth"] == 1
    assert created["budgets"] == [{"scope": "repo:write", "limit": 10, "period": 3600}]
    assert created["subject_claims"] == [{"name": "groups", "value": "eng"}]
    pid = created["id"]
    assert run_json(socket, "delegation", "show", "--id", pid)["policies"] == [created]
    (updated,) = run_json(
        socket, "delegation", "update", "--id", pid, "--max-depth", "3", "--max-ttl", "2m"
    )["policies"]
    assert (updated["max_depth"], updated["max_ttl"], updated["revision_number"]) == (3, 120, 1)
    assert updated["scopes"] == created["scopes"]
    listed = run_json(socket, "delegation", "list", "--agent-id", AGENT)["policies"]
    assert [p["id"] for p in listed] == [pid]
    text = run(socket, "delegation", "show", "--id", pid).output
    assert "repo:write=10/1h" in text and "groups=eng" in text
    budget = run_json(socket, "delegation", "budget", "show", "--id", pid)
    assert budget == {"budgets": []}
    assert run(socket, "delegation", "delete", "--id", pid).exit_code == 0
    gone = run(socket, "delegation", "show", "--id", pid)
    assert gone.exit_code != 0 and "not found" in gone.output


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (("--subject-issuer", "nobody"), "subject_issuer"),
        (("--agent-id", "spiffe://other.org/agent"), "trust domain"),
        (("--budget", "repo:write=ten/1h"), "whole number"),
        (("--budget", "admin=1/1h"), "not a policy scope"),
        (("--subject-claim", "groups"), "claim=value"),
        (("--scope", "has space"), "not a scope"),
    ],
)
def test_bad_policies_are_one_line_errors(
    socket: str, change: tuple[str, str], needle: str
) -> None:
    """Each bad option fails with one line naming it, and nothing is stored."""
    args = list(CREATE)
    flag, value = change
    if flag in ("--subject-issuer", "--agent-id"):
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    result = run(socket, *args)
    assert result.exit_code != 0
    assert needle in result.output, result.output
    assert "Traceback" not in result.output
    assert run_json(socket, "delegation", "list")["policies"] == []
