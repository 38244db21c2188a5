"""The admin Entries service over the real Unix socket."""

from __future__ import annotations

import os
import stat

import grpc
import pytest

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from tests.helpers.server import InProcessServer

AGENT = "spiffe://example.org/credo/agent/join_token/abc"


def entry(spiffe_id: str = "spiffe://example.org/web", **kw: object) -> types_pb2.RegistrationEntry:
    fields: dict[str, object] = {
        "spiffe_id": spiffe_id,
        "parent_id": AGENT,
        "selectors": [types_pb2.Selector(type="unix", value="uid:1000")],
    }
    fields.update(kw)
    return types_pb2.RegistrationEntry(**fields)  # type: ignore[arg-type]


def stub(server: InProcessServer) -> admin_pb2_grpc.EntriesStub:
    return admin_pb2_grpc.EntriesStub(server.admin_channel())


def count(server: InProcessServer) -> int:
    return stub(server).CountEntries(admin_pb2.CountEntriesRequest()).count


def test_admin_socket_and_data_dir_are_private(server: InProcessServer) -> None:
    """The admin socket is 0600 in a 0700 directory, and the data dir is 0700."""
    sock = server.config.admin_socket
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.config.data_dir).st_mode) == 0o700
    addr = (server.config.data_dir / "server.addr").read_text().strip()
    assert addr.endswith(f":{server.info.agent_address[1]}")  # type: ignore[union-attr]


def test_create_get_update_delete_round_trip(server: InProcessServer) -> None:
    """An entry can be created, read back, updated (revision bumps) and deleted."""
    s = stub(server)
    created = s.BatchCreateEntry(
        admin_pb2.BatchCreateEntryRequest(entries=[entry(dns_names=["web.example.org"])])
    ).entries[0]
    assert created.id and created.spiffe_id == "spiffe://example.org/web"
    got = s.GetEntry(admin_pb2.GetEntryRequest(id=created.id))
    assert got.dns_names == ["web.example.org"]
    changed = entry(id=created.id, x509_svid_ttl=120)
    updated = s.BatchUpdateEntry(admin_pb2.BatchUpdateEntryRequest(entries=[changed])).entries[0]
    assert updated.x509_svid_ttl == 120 and updated.revision_number > created.revision_number
    s.BatchDeleteEntry(admin_pb2.BatchDeleteEntryRequest(ids=[created.id]))
    with pytest.raises(grpc.RpcError) as err:
        s.GetEntry(admin_pb2.GetEntryRequest(id=created.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (entry("not-a-spiffe-id"), "entries[1].spiffe_id"),
        (entry("spiffe://other.org/web"), "entries[1].spiffe_id"),
        (entry(parent_id=""), "entries[1].parent_id"),
        (entry(selectors=[]), "entries[1].selectors"),
        (entry(selectors=[types_pb2.Selector(type="", value="x")]), "entries[1].selectors[0]"),
        (entry(x509_svid_ttl=-1), "entries[1].x509_svid_ttl"),
        (entry(jwt_svid_ttl=-5), "entries[1].jwt_svid_ttl"),
        (entry(dns_names=["bad name"]), "entries[1].dns_names[0]"),
        # Reserved for the server's own certificate: a workload holding it could pose as the
        # server to agents.
        (entry(dns_names=["ok.example.org", "server.credo.invalid"]), "entries[1].dns_names[1]"),
        (entry(dns_names=["*.CREDO.invalid"]), "entries[1].dns_names[0]"),
        (entry(federates_with=["Not A TD"]), "entries[1].federates_with[0]"),
        (entry("spiffe://example.org/credo/agent/x"), "entries[1].spiffe_id"),
    ],
)
def test_invalid_item_names_field_and_changes_nothing(
    server: InProcessServer, bad: types_pb2.RegistrationEntry, field: str
) -> None:
    """A batch with one invalid item fails with INVALID_ARGUMENT naming it; nothing is created."""
    with pytest.raises(grpc.RpcError) as err:
        stub(server).BatchCreateEntry(
            admin_pb2.BatchCreateEntryRequest(entries=[entry("spiffe://example.org/ok"), bad])
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    assert count(server) == 0


def test_duplicate_entry_is_already_exists(server: InProcessServer) -> None:
    """Same SPIFFE ID, parent and selectors twice: ALREADY_EXISTS, and the batch adds nothing."""
    s = stub(server)
    s.BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=[entry()]))
    with pytest.raises(grpc.RpcError) as err:
        s.BatchCreateEntry(
            admin_pb2.BatchCreateEntryRequest(entries=[entry("spiffe://example.org/new"), entry()])
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "entries[1]" in err.value.details()
    assert count(server) == 1


def test_delete_with_unknown_id_deletes_nothing(server: InProcessServer) -> None:
    """BatchDelete with one unknown id is NOT_FOUND naming it, and the known one survives."""
    s = stub(server)
    created = s.BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=[entry()])).entries[0]
    with pytest.raises(grpc.RpcError) as err:
        s.BatchDeleteEntry(admin_pb2.BatchDeleteEntryRequest(ids=[created.id, "nope"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("ids[1]:")
    assert count(server) == 1


def test_update_unknown_id_is_not_found(server: InProcessServer) -> None:
    """Updating an entry that does not exist is NOT_FOUND and names the item."""
    with pytest.raises(grpc.RpcError) as err:
        stub(server).BatchUpdateEntry(admin_pb2.BatchUpdateEntryRequest(entries=[entry(id="nope")]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("entries[0].id:")


def test_list_filters_and_pages(server: InProcessServer) -> None:
    """ListEntries filters by parent and selectors and pages through every match once."""
    s = stub(server)
    items = [entry(f"spiffe://example.org/w{i}") for i in range(5)]
    items.append(entry("spiffe://example.org/other", parent_id="spiffe://example.org/elsewhere"))
    s.BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=items))
    seen: list[str] = []
    token = ""
    while True:
        page = s.ListEntries(
            admin_pb2.ListEntriesRequest(
                filter=admin_pb2.ListEntriesRequest.Filter(by_parent_id=AGENT),
                page_size=2,
                page_token=token,
            )
        )
        seen.extend(e.spiffe_id for e in page.entries)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(f"spiffe://example.org/w{i}" for i in range(5))
    by_sel = s.ListEntries(
        admin_pb2.ListEntriesRequest(
            filter=admin_pb2.ListEntriesRequest.Filter(
                by_selectors=[types_pb2.Selector(type="unix", value="uid:1000")],
                selector_match="exact",
            )
        )
    )
    assert len(by_sel.entries) == 6
    with pytest.raises(grpc.RpcError) as err:
        s.ListEntries(
            admin_pb2.ListEntriesRequest(
                filter=admin_pb2.ListEntriesRequest.Filter(
                    by_selectors=[types_pb2.Selector(type="unix", value="uid:1")],
                    selector_match="sideways",
                )
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_update_with_conflicting_second_item_changes_nothing(server: InProcessServer) -> None:
    """BatchUpdate with a second item duplicating an entry is ALREADY_EXISTS; nothing changes."""
    s = stub(server)
    first, second, _ = s.BatchCreateEntry(
        admin_pb2.BatchCreateEntryRequest(
            entries=[
                entry("spiffe://example.org/a"),
                entry("spiffe://example.org/b"),
                entry("spiffe://example.org/c"),
            ]
        )
    ).entries
    with pytest.raises(grpc.RpcError) as err:
        s.BatchUpdateEntry(
            admin_pb2.BatchUpdateEntryRequest(
                entries=[
                    entry("spiffe://example.org/a", id=first.id, x509_svid_ttl=120),
                    entry("spiffe://example.org/c", id=second.id),
                ]
            )
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.value.details().startswith("entries[1]: ")
    assert s.GetEntry(admin_pb2.GetEntryRequest(id=first.id)) == first
    assert s.GetEntry(admin_pb2.GetEntryRequest(id=second.id)) == second
