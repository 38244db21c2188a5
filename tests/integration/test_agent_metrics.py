"""The agent's Prometheus endpoint, scraped from a real `credo-agent run` joined to a real
`credo-server run` after workloads called its Workload API."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_agent import telemetry
from tests.helpers.processes import (
    create_entry,
    start_agent,
    start_server,
    wait_for,
)

pytest.importorskip("spiffe")

TD = "example.org"


def _scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on ``http://<address>/metrics``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_calls_refusals_svids_and_sync_state(tmp_path: Path, root: Path) -> None:
    """After a refused call and a served one, the agent's endpoint shows both calls, the
    refusal, one cached SVID, the sync stream up and the last event id synced."""
    with (
        start_server(tmp_path) as server,
        start_agent(server, root, metrics_address="127.0.0.1:0") as agent,
    ):
        found = re.search(r"serving metrics address=(\S+)", agent.logs)
        assert found, agent.logs
        address = found.group(1)
        assert agent.fetch_ids() == []  # no entry yet: PERMISSION_DENIED
        spiffe_id = f"spiffe://{TD}/metrics/workload"
        create_entry(server, agent.spiffe_id, spiffe_id)
        wait_for(lambda: agent.fetch_ids() == [spiffe_id], 20, "the workload's SVID")
        method = (("method", "FetchX509SVID"),)
        samples = _scrape(address)
        calls = samples[(telemetry.WORKLOAD_API_CALLS_TOTAL, method)]
        refusals = samples[
            (telemetry.WORKLOAD_API_REFUSALS_TOTAL, (("code", "PERMISSION_DENIED"), *method))
        ]
        assert calls >= 2 and 1 <= refusals < calls
        assert samples[(telemetry.SVIDS_CACHED, ())] == 1
        assert samples[(telemetry.ENTRIES, ())] == 1
        assert samples[(telemetry.SYNC_CONNECTED, ())] == 1
        events = server.cli_json("entry", "show")  # the entry's creation is an event
        assert events["entries"] and samples[(telemetry.SYNC_LAST_EVENT_ID, ())] > 0
        # Every push arrived: no heartbeat found the agent behind.
        assert samples[(telemetry.SYNC_RESYNCS_TOTAL, ())] == 0
