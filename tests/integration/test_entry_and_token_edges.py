"""What `credo-server entry` and `token` refuse at the edge, and what they still show: a real
`credo-server run` driven through its CLI, with rows written straight into its SQLite
datastore where a test needs what an older server could have stored."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from credo.selector import Selector
from server.datastore.models import RegistrationEntry
from server.datastore.sql import SqlDataStore
from tests.helpers.processes import ServerProcess, one_line_error, start_server

TD = "example.org"
PARENT = f"spiffe://{TD}/credo/agent/join_token/edges"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(tmp_path_factory.mktemp("edges")) as running:
        yield running


def _create(server: ServerProcess, spiffe_id: str, *extra: str) -> Any:
    return server.cli(
        "entry", "create", "--parent-id", PARENT, "--spiffe-id", spiffe_id,
        "--selector", "unix:uid:4242", *extra,
    )  # fmt: skip


def _store_entry(server: ServerProcess, entry: RegistrationEntry) -> str:
    """Write ``entry`` into the server's datastore directly, as an older server could have."""
    datastore = SqlDataStore.open(f"sqlite:///{server.data_dir / 'datastore.sqlite3'}")
    try:
        return datastore.create_registration_entry(entry).id
    finally:
        datastore.close()


def test_expires_at_beyond_year_9999_is_refused_and_nothing_is_created(
    server: ServerProcess,
) -> None:
    """`--expires-at 99999999999999` is refused in one line naming the bound; no entry appears."""
    before = server.cli_json("entry", "count")["count"]
    line = one_line_error(
        _create(server, f"spiffe://{TD}/edges/far", "--expires-at", "99999999999999")
    )
    assert "expires_at" in line and "9999-12-31T23:59:59Z" in line
    assert server.cli_json("entry", "count")["count"] == before


def test_expires_at_in_the_past_is_refused(server: ServerProcess) -> None:
    """An expiry in the past is refused (it would be pruned at once), saying so."""
    before = server.cli_json("entry", "count")["count"]
    line = one_line_error(
        _create(server, f"spiffe://{TD}/edges/past", "--expires-at", "1000000000")
    )
    assert "2001-09-09T01:46:40Z is in the past" in line
    assert server.cli_json("entry", "count")["count"] == before
    future = _create(server, f"spiffe://{TD}/edges/future", "--expires-at", "2100-01-01T00:00:00Z")
    assert future.returncode == 0, future.stderr


def test_entry_show_lists_a_stored_expiry_no_date_can_show(server: ServerProcess) -> None:
    """A stored ``expires_at`` beyond any date does not break `entry show` (text or JSON)."""
    entry_id = _store_entry(
        server,
        RegistrationEntry(
            spiffe_id=f"spiffe://{TD}/edges/stored-far",
            parent_id=PARENT,
            selectors=(Selector("unix", "uid:4243"),),
            expires_at=99_999_999_999_999,
        ),
    )
    text = server.cli("entry", "show", "--id", entry_id, output="text")
    assert text.returncode == 0, text.stderr
    assert "99999999999999 (unix seconds, out of range)" in text.stdout
    listing = server.cli("entry", "show", output="text")
    assert listing.returncode == 0, listing.stderr
    assert entry_id in listing.stdout
    (shown,) = server.cli_json("entry", "show", "--id", entry_id)["entries"]
    assert shown["expires_at"] == 99_999_999_999_999


@pytest.mark.parametrize("flag", ["admin", "downstream"])
def test_admin_and_downstream_are_refused_as_not_supported(
    server: ServerProcess, flag: str
) -> None:
    """`entry create --admin` / `--downstream` is refused, saying the flag is not supported."""
    line = one_line_error(_create(server, f"spiffe://{TD}/edges/{flag}", f"--{flag}"))
    assert f"{flag}: is not supported" in line
    assert server.cli_json("entry", "show", "--spiffe-id", f"spiffe://{TD}/edges/{flag}") == {
        "entries": []
    }


def test_entry_stored_with_admin_still_shows_and_can_be_cleared(server: ServerProcess) -> None:
    """An entry stored with admin and downstream loads and shows; updating it asks for
    --no-admin/--no-downstream, which clear the flags."""
    entry_id = _store_entry(
        server,
        RegistrationEntry(
            spiffe_id=f"spiffe://{TD}/edges/stored-admin",
            parent_id=PARENT,
            selectors=(Selector("unix", "uid:4244"),),
            admin=True,
            downstream=True,
        ),
    )
    (shown,) = server.cli_json("entry", "show", "--id", entry_id)["entries"]
    assert shown["admin"] is True and shown["downstream"] is True
    text = server.cli("entry", "show", "--id", entry_id, output="text").stdout
    assert "Admin" in text and "Downstream" in text
    line = one_line_error(server.cli("entry", "update", "--id", entry_id, "--hint", "h"))
    assert "--no-admin" in line
    (cleared,) = server.cli_json(
        "entry", "update", "--id", entry_id, "--hint", "h", "--no-admin", "--no-downstream"
    )["entries"]
    assert cleared["admin"] is False and cleared["downstream"] is False and cleared["hint"] == "h"


def test_join_token_ttl_is_capped_at_24h_by_default(server: ServerProcess) -> None:
    """`token generate --ttl 3650d` is refused with the cap and its setting; 24h is accepted."""
    line = one_line_error(server.cli("token", "generate", "--ttl", "3650d"))
    assert (
        "3650d is longer than this server allows for join tokens (1d, join_token_max_ttl)" in line
    )
    token = server.cli_json("token", "generate", "--ttl", "24h")
    assert token["expires_at"] <= time.time() + 24 * 3600 + 5


def test_join_token_ttl_cap_is_configurable(tmp_path: Path) -> None:
    """With `--join-token-max-ttl 1h`, a 2h token is refused and a 1h one is not."""
    with start_server(tmp_path, join_token_max_ttl="1h") as capped:
        line = one_line_error(capped.cli("token", "generate", "--ttl", "2h"))
        assert "longer than this server allows" in line and "1h" in line
        assert capped.cli("token", "generate", "--ttl", "1h").returncode == 0
        plain = capped.cli_json("token", "generate")
        assert plain["expires_at"] <= time.time() + 600 + 5
