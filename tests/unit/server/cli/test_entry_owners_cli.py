"""``entry create|update|show --owner/--purpose`` and ``require_entry_owner``, on a real server."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from server.cli.main import cli
from server.config import load_config

app = pytest.importorskip("server.app")

TD = "example.org"
PARENT = f"spiffe://{TD}/host"


@pytest.fixture(scope="module")
def socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server with ``require_entry_owner = true``, in a background thread."""
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
            "require_entry_owner": True,
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


def _create(socket: str, name: str, *extra: str) -> Result:
    return run(
        socket,
        "entry",
        "create",
        "--spiffe-id",
        f"spiffe://{TD}/{name}",
        "--parent-id",
        PARENT,
        "--selector",
        f"unix:uid:{1000 + len(name)}",
        *extra,
    )


def test_an_entry_without_owner_is_refused(socket: str) -> None:
    """With require_entry_owner, create without --owner fails with one line naming --owner."""
    result = _create(socket, "ownerless")
    assert result.exit_code != 0
    assert "owner" in result.output and "require_entry_owner" in result.output
    assert "Traceback" not in result.output
    shown = run_json(socket, "entry", "show", "--spiffe-id", f"spiffe://{TD}/ownerless")
    assert shown == {"entries": []}


def test_owner_shown_and_filtered(socket: str) -> None:
    """entry show --owner finds exactly her entries; show prints Owner and Purpose."""
    made = _create(socket, "reviewer", "--owner", "alice@example.com", "--purpose", "PR reviews")
    assert made.exit_code == 0, made.output
    assert _create(socket, "builder", "--owner", "bob@example.com").exit_code == 0
    hers = run_json(socket, "entry", "show", "--owner", "alice@example.com")["entries"]
    assert [e["spiffe_id"] for e in hers] == [f"spiffe://{TD}/reviewer"]
    assert hers[0]["owner"] == "alice@example.com" and hers[0]["purpose"] == "PR reviews"
    text = run(socket, "entry", "show", "--owner", "alice@example.com").output
    assert "Owner" in text and "alice@example.com" in text and "PR reviews" in text


def test_update_changes_owner_but_cannot_clear_it(socket: str) -> None:
    """--owner on update moves the entry to another owner; clearing it is refused."""
    created = run_json(
        socket,
        "entry",
        "create",
        "--spiffe-id",
        f"spiffe://{TD}/mover",
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:4242",
        "--owner",
        "carol@example.com",
    )["entries"][0]
    moved = run_json(socket, "entry", "update", "--id", created["id"], "--owner", "team-x")
    assert moved["entries"][0]["owner"] == "team-x"
    refused = run(socket, "entry", "update", "--id", created["id"], "--owner", "")
    assert refused.exit_code != 0 and "owner" in refused.output
    again = run_json(socket, "entry", "show", "--id", created["id"])["entries"][0]
    assert again["owner"] == "team-x"
