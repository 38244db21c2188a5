"""The in-memory entry index that decides which entries an agent may see and sign."""

from __future__ import annotations

import time

from credo.selector import Selector
from server.authorization import EntryIndex
from server.datastore.models import RegistrationEntry

AGENT = "spiffe://td/credo/agent/x"
SERVER = "spiffe://td/credo/server"
S = Selector("k8s_psat", "cluster:a")


def e(entry_id: str, spiffe_id: str, parent: str, **kw: object) -> RegistrationEntry:
    kw.setdefault("selectors", (Selector("unix", "uid:1"),))
    return RegistrationEntry(id=entry_id, spiffe_id=spiffe_id, parent_id=parent, **kw)  # type: ignore[arg-type]


def test_alias_needs_all_its_selectors() -> None:
    """A node alias applies only when all of its selectors are among the agent's."""
    index = EntryIndex(
        [
            e("alias1", "spiffe://td/a1", SERVER, node_alias=True, selectors=(S,)),
            e(
                "alias2",
                "spiffe://td/a2",
                SERVER,
                node_alias=True,
                selectors=(S, Selector("x", "y")),
            ),
            e("w1", "spiffe://td/w1", "spiffe://td/a1"),
            e("w2", "spiffe://td/w2", "spiffe://td/a2"),
        ]
    )
    assert set(index.authorized(AGENT, [S])) == {"w1"}
    assert set(index.authorized(AGENT, [])) == set()


def test_update_moves_entry_between_parents_and_expired_are_skipped() -> None:
    """Re-putting an entry re-indexes it; an expired entry is never authorized."""
    index = EntryIndex([e("w", "spiffe://td/w", AGENT)])
    index.put(e("w", "spiffe://td/w", "spiffe://td/other"))
    assert index.authorized(AGENT, []) == {}
    index.put(e("old", "spiffe://td/old", AGENT, expires_at=int(time.time()) - 1))
    assert index.authorized(AGENT, []) == {}
    index.remove("old")
    assert len(index) == 1


def test_100k_entries_index_and_lookup() -> None:
    """100,000 entries index, and one agent's lookup finds exactly its own 100.

    How long this takes is measured by benchmarks/entries.py (start_100k_s), not here.
    """
    entries = [
        e(f"id{i}", f"spiffe://td/w{i}", f"spiffe://td/credo/agent/{i % 1000}")
        for i in range(100_000)
    ]
    index = EntryIndex(entries)
    found = index.authorized("spiffe://td/credo/agent/7", [])
    assert len(found) == 100
    assert all(e.parent_id == "spiffe://td/credo/agent/7" for e in found.values())
