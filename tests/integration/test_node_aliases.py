"""Entries under node aliases reach workloads: a real `credo-server run`, a real `credo-agent
run`, entries made with the server CLI, SVIDs fetched with py-spiffe."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from credo.selector import Selector
from server.datastore.sql import SqlDataStore
from tests.helpers.processes import (
    ServerProcess,
    create_entry,
    start_agent,
    start_server,
    wait_for,
)

pytest.importorskip("spiffe")

TD = "example.org"
ME = f"unix:uid:{os.getuid()}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with start_server(tmp_path) as running:
        yield running


def test_entry_under_a_join_token_alias_and_two_levels_deep_reach_the_workload(
    server: ServerProcess, root: Path
) -> None:
    """An entry parented to `token generate --spiffe-id`'s alias, and one parented to that
    entry, are both served to the matching workload."""
    alias = f"spiffe://{TD}/nodes/web"
    token = server.cli_json("token", "generate", "--spiffe-id", alias)["token"]
    app = f"spiffe://{TD}/web/app"
    tool = f"spiffe://{TD}/web/app/tool"
    create_entry(server, alias, app, ME)
    create_entry(server, app, tool, ME)
    with start_agent(server, root, token=token) as agent:
        ids = wait_for(
            lambda: set(agent.fetch_ids()) >= {app, tool} and agent.fetch_ids(),
            20,
            "the alias child and grandchild SVIDs",
        )
        assert alias not in ids


def test_entry_under_a_node_alias_with_selectors_reaches_the_workload(
    server: ServerProcess, root: Path
) -> None:
    """An entry under an `entry create --node` alias whose selectors the node has is served."""
    with start_agent(server, root) as agent:
        # The node's selectors, written as a node resolver (or another server) would.
        datastore = SqlDataStore.open(f"sqlite:///{server.data_dir / 'datastore.sqlite3'}")
        try:
            datastore.set_node_selectors(agent.spiffe_id, [Selector("credo_test", "pool:blue")])
        finally:
            datastore.close()
        alias = f"spiffe://{TD}/nodes/blue"
        server.cli_json(
            "entry", "create", "--node", "--spiffe-id", alias, "--selector", "credo_test:pool:blue"
        )
        app = f"spiffe://{TD}/blue/app"
        create_entry(server, alias, app, ME)
        wait_for(lambda: app in agent.fetch_ids(), 20, "the node-alias child's SVID")
