"""The CLI against an in-process fake admin API on a real Unix socket: requests, paging, output.

The fake servicer stands in for the server's admin endpoint (server/api is tested on its
own); it keeps entries in a dict and signs with a throwaway CA, so what is pinned here is
the CLI's side of the wire: what it sends, how it pages, how it prints and reports errors.
"""

from __future__ import annotations

import base64
import json
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from credo.bundle import Bundle
from credo.keys import generate_private_key
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import ca_certificate_template, sign_x509_svid
from server.cli.main import cli

TD = TrustDomain("example.org")
AGENT = "spiffe://example.org/credo/agent/join_token/tok"


@dataclass
class FakeAdmin:
    """An in-memory admin API: entries, agents, one bundle, a CA; records requests."""

    entries: dict[str, types_pb2.RegistrationEntry] = field(default_factory=dict)
    agents: dict[str, types_pb2.AttestedNode] = field(default_factory=dict)
    requests: list[Any] = field(default_factory=list)
    page_size_cap: int = 2

    def __post_init__(self) -> None:
        now = datetime.now(UTC)
        self.ca_key = generate_private_key()
        self.ca_cert = ca_certificate_template(
            TD, self.ca_key.public_key(), not_before=now, not_after=now + timedelta(days=1)
        ).sign(self.ca_key, hashes.SHA256())
        self.jwt_key = generate_private_key()

    def bundle(self) -> types_pb2.Bundle:
        spki = self.jwt_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return types_pb2.Bundle(
            trust_domain=TD.name,
            x509_authorities=[
                types_pb2.X509Authority(asn1=self.ca_cert.public_bytes(serialization.Encoding.DER))
            ],
            jwt_authorities=[types_pb2.JwtAuthority(public_key=spki, key_id="kid-1")],
            refresh_hint=300,
            sequence_number=7,
        )


class Entries(admin_pb2_grpc.EntriesServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeAdmin) -> None:
        self.fake = fake

    def BatchCreateEntry(self, request: Any, context: Any) -> Any:
        self.fake.requests.append(request)
        out = []
        for e in request.entries:
            for old in self.fake.entries.values():
                if (old.spiffe_id, old.parent_id, sorted(map(str, old.selectors))) == (
                    e.spiffe_id,
                    e.parent_id,
                    sorted(map(str, e.selectors)),
                ):
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"entry {old.id} is the same")
            new = types_pb2.RegistrationEntry()
            new.CopyFrom(e)
            new.id = str(uuid.uuid4())
            new.created_at = 1_700_000_000
            out.append(new)
        for new in out:
            self.fake.entries[new.id] = new
        return admin_pb2.BatchCreateEntryResponse(entries=out)

    def BatchUpdateEntry(self, request: Any, context: Any) -> Any:
        self.fake.requests.append(request)
        for e in request.entries:
            if e.id not in self.fake.entries:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no entry with id {e.id!r}")
        out = []
        for e in request.entries:
            new = types_pb2.RegistrationEntry()
            new.CopyFrom(e)
            new.revision_number += 1
            self.fake.entries[e.id] = new
            out.append(new)
        return admin_pb2.BatchUpdateEntryResponse(entries=out)

    def BatchDeleteEntry(self, request: Any, context: Any) -> Any:
        for i in request.ids:
            if i not in self.fake.entries:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no entry with id {i!r}")
        return admin_pb2.BatchDeleteEntryResponse(
            entries=[self.fake.entries.pop(i) for i in request.ids]
        )

    def GetEntry(self, request: Any, context: Any) -> Any:
        if request.id not in self.fake.entries:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no entry with id {request.id!r}")
        return self.fake.entries[request.id]

    def ListEntries(self, request: Any, context: Any) -> Any:
        self.fake.requests.append(request)
        matches = [
            e
            for e in sorted(self.fake.entries.values(), key=lambda e: e.id)
            if not request.filter.by_spiffe_id or e.spiffe_id == request.filter.by_spiffe_id
        ]
        start = int(request.page_token or 0)
        size = min(request.page_size or 10**9, self.fake.page_size_cap)
        page = matches[start : start + size]
        more = start + size < len(matches)
        return admin_pb2.ListEntriesResponse(
            entries=page, next_page_token=str(start + size) if more else ""
        )

    def CountEntries(self, request: Any, context: Any) -> Any:
        return admin_pb2.CountEntriesResponse(count=len(self.fake.entries))


class Agents(admin_pb2_grpc.AgentsServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeAdmin) -> None:
        self.fake = fake

    def ListAgents(self, request: Any, context: Any) -> Any:
        return admin_pb2.ListAgentsResponse(agents=list(self.fake.agents.values()))

    def GetAgent(self, request: Any, context: Any) -> Any:
        if request.spiffe_id not in self.fake.agents:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no agent {request.spiffe_id}")
        return self.fake.agents[request.spiffe_id]

    def BanAgent(self, request: Any, context: Any) -> Any:
        node = self.GetAgent(request, context)
        node.banned = True
        return node

    def CreateJoinToken(self, request: Any, context: Any) -> Any:
        self.fake.requests.append(request)
        return types_pb2.JoinToken(
            token="t0k3n",
            expires_at=1_700_000_000 + (request.ttl or 600),  # 0: the server's default
            spiffe_id=request.spiffe_id,
        )


class Bundles(admin_pb2_grpc.BundlesServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeAdmin) -> None:
        self.fake = fake

    def GetBundle(self, request: Any, context: Any) -> Any:
        return self.fake.bundle()

    def DeleteFederatedBundle(self, request: Any, context: Any) -> Any:
        self.fake.requests.append(request)
        return admin_pb2.DeleteFederatedBundleResponse()


class Svids(admin_pb2_grpc.SvidsServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeAdmin) -> None:
        self.fake = fake

    def MintX509SVID(self, request: Any, context: Any) -> Any:
        csr = x509.load_der_x509_csr(request.csr)
        cert = sign_x509_svid(
            SpiffeId.parse(request.spiffe_id),
            csr.public_key(),  # type: ignore[arg-type]
            ca_cert=self.fake.ca_cert,
            ca_key=self.fake.ca_key,
            ttl=timedelta(seconds=request.ttl or 3600),
            dns_names=list(request.dns_names),
        )
        return admin_pb2.MintX509SVIDResponse(
            svid=types_pb2.X509Svid(
                spiffe_id=request.spiffe_id,
                cert_chain=[cert.public_bytes(serialization.Encoding.DER)],
                expires_at=int(cert.not_valid_after_utc.timestamp()),
            )
        )


@pytest.fixture
def fake() -> FakeAdmin:
    return FakeAdmin()


@pytest.fixture
def socket(fake: FakeAdmin) -> Iterator[str]:
    """A gRPC server with the fake admin services (and health) on a short Unix socket path."""
    directory = tempfile.mkdtemp(prefix="credo-cli-")
    path = f"{directory}/api.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    admin_pb2_grpc.add_EntriesServicer_to_server(Entries(fake), server)
    admin_pb2_grpc.add_AgentsServicer_to_server(Agents(fake), server)
    admin_pb2_grpc.add_BundlesServicer_to_server(Bundles(fake), server)
    admin_pb2_grpc.add_SvidsServicer_to_server(Svids(fake), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        yield path
    finally:
        server.stop(None).wait()
        shutil.rmtree(directory, ignore_errors=True)


def run(socket: str, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, [*args, "--socket", socket], input=stdin)


def run_json(socket: str, *args: str, stdin: str | None = None) -> Any:
    result = run(socket, *args, "--output", "json", stdin=stdin)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def create(socket: str, spiffe_id: str, *extra: str) -> dict[str, Any]:
    out = run_json(
        socket, "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", AGENT, *extra
    )
    (entry,) = out["entries"]
    return entry  # type: ignore[no-any-return]


def test_create_sends_every_field_and_prints_snake_case_json(socket: str, fake: FakeAdmin) -> None:
    """Flags map onto RegistrationEntry fields; JSON output uses the API's field names."""
    entry = create(
        socket,
        "spiffe://example.org/web",
        "--selector", "unix:uid:1000",
        "--selector", "unix:gid:10",
        "--x509-svid-ttl", "30m",
        "--jwt-svid-ttl", "90",
        "--dns", "web.example.org",
        "--admin",
        "--hint", "web",
        "--expires-at", "2030-01-02T03:04:05Z",
        "--federates-with", "spiffe://other.org",
    )  # fmt: skip
    assert entry["spiffe_id"] == "spiffe://example.org/web"
    assert entry["parent_id"] == AGENT
    assert entry["selectors"] == [
        {"type": "unix", "value": "uid:1000"},
        {"type": "unix", "value": "gid:10"},
    ]
    assert entry["x509_svid_ttl"] == 1800
    assert entry["jwt_svid_ttl"] == 90
    assert entry["dns_names"] == ["web.example.org"]
    assert entry["admin"] is True and entry["downstream"] is False
    assert entry["hint"] == "web"
    assert entry["expires_at"] == int(datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())
    assert entry["federates_with"] == ["other.org"]
    assert entry["id"] and entry["created_at"] == 1_700_000_000
    assert set(entry) == {f.name for f in types_pb2.RegistrationEntry.DESCRIPTOR.fields}


def test_node_alias_is_parented_to_the_server(socket: str) -> None:
    """--node makes a node-alias entry whose parent is spiffe://<td>/credo/server."""
    out = run_json(
        socket, "entry", "create", "--node", "--spiffe-id", "spiffe://example.org/nodes/a",
        "--selector", "join_token:abc",
    )  # fmt: skip
    (entry,) = out["entries"]
    assert entry["node_alias"] is True
    assert entry["parent_id"] == "spiffe://example.org/credo/server"


def test_text_output_is_spire_style_blocks(socket: str) -> None:
    """Text output shows one 'Label : value' block per entry."""
    create(socket, "spiffe://example.org/db", "--selector", "unix:uid:5")
    result = run(socket, "entry", "show")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Found 1 entry"
    assert any(line.startswith("Entry ID") and " : " in line for line in lines)
    fields = [tuple(part.strip() for part in line.split(" : ", 1)) for line in lines[2:]]
    assert ("SPIFFE ID", "spiffe://example.org/db") in fields
    assert ("Selector", "unix:uid:5") in fields
    assert ("X509-SVID TTL", "default") in fields
    assert len({line.index(" : ") for line in lines[2:]}) == 1  # colons aligned


def test_show_pages_through_every_entry(socket: str, fake: FakeAdmin) -> None:
    """`entry show` follows next_page_token until the last page (the fake pages by 2)."""
    for i in range(5):
        create(socket, f"spiffe://example.org/svc/{i}", "--selector", f"unix:uid:{i}")
    out = run_json(socket, "entry", "show")
    assert sorted(e["spiffe_id"] for e in out["entries"]) == [
        f"spiffe://example.org/svc/{i}" for i in range(5)
    ]
    lists = [r for r in fake.requests if isinstance(r, admin_pb2.ListEntriesRequest)]
    assert [r.page_token for r in lists] == ["", "2", "4"]


def test_show_filters_reach_the_server(socket: str, fake: FakeAdmin) -> None:
    """Filters are sent as given; selector filters default to SPIRE's 'superset' match."""
    run_json(
        socket, "entry", "show", "--spiffe-id", "spiffe://example.org/x",
        "--parent-id", AGENT, "--selector", "unix:uid:1", "--hint", "h",
    )  # fmt: skip
    (request,) = [r for r in fake.requests if isinstance(r, admin_pb2.ListEntriesRequest)]
    assert request.filter.by_spiffe_id == "spiffe://example.org/x"
    assert request.filter.by_parent_id == AGENT
    assert [(s.type, s.value) for s in request.filter.by_selectors] == [("unix", "uid:1")]
    assert request.filter.selector_match == "superset"
    assert request.filter.by_hint == "h"


def test_update_changes_only_the_given_fields(socket: str, fake: FakeAdmin) -> None:
    """`entry update` reads the entry and overlays the flags; other fields stay."""
    entry = create(socket, "spiffe://example.org/api", "--selector", "unix:uid:1", "--dns", "a")
    out = run_json(
        socket, "entry", "update", "--id", entry["id"], "--selector", "unix:uid:2", "--admin"
    )
    (updated,) = out["entries"]
    assert updated["selectors"] == [{"type": "unix", "value": "uid:2"}]
    assert updated["admin"] is True
    assert updated["dns_names"] == ["a"]
    assert updated["spiffe_id"] == "spiffe://example.org/api"
    assert updated["revision_number"] == 1


def test_batch_create_and_update_from_data(socket: str) -> None:
    """--data reads {"entries": [...]} (stdin with '-') for create, and by id for update."""
    doc = {
        "entries": [
            {"spiffe_id": "spiffe://example.org/b1", "parent_id": AGENT,
             "selectors": [{"type": "unix", "value": "uid:1"}], "x509_svid_ttl": 60},
            {"spiffe_id": "spiffe://example.org/b2", "parent_id": AGENT,
             "selectors": ["k8s:ns:prod"], "expires_at": "2031-01-01T00:00:00+00:00"},
        ]
    }  # fmt: skip
    created = run_json(socket, "entry", "create", "--data", "-", stdin=json.dumps(doc))["entries"]
    assert [e["spiffe_id"] for e in created] == [
        "spiffe://example.org/b1",
        "spiffe://example.org/b2",
    ]
    assert created[1]["selectors"] == [{"type": "k8s", "value": "ns:prod"}]
    change = {"entries": [{"id": created[0]["id"], "hint": "first"}]}
    (updated,) = run_json(socket, "entry", "update", "--data", "-", stdin=json.dumps(change))[
        "entries"
    ]
    assert updated["hint"] == "first" and updated["x509_svid_ttl"] == 60


def test_show_output_can_be_fed_back_as_data(socket: str, tmp_path: Path) -> None:
    """`entry show --output json` is a valid --data document (read-only fields are ignored)."""
    entry = create(socket, "spiffe://example.org/c", "--selector", "unix:uid:3")
    shown = run_json(socket, "entry", "show", "--id", entry["id"])
    shown["entries"][0]["hint"] = "edited"
    path = tmp_path / "entries.json"
    path.write_text(json.dumps(shown))
    (updated,) = run_json(socket, "entry", "update", "--data", str(path))["entries"]
    assert updated["hint"] == "edited"


def test_not_found_is_one_line(socket: str) -> None:
    """A NOT_FOUND status reads 'entry not found: <server's detail>', exit 1."""
    result = run(socket, "entry", "show", "--id", "nope")
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: entry not found: no entry with id 'nope'"


def test_already_exists_is_one_line(socket: str) -> None:
    """A duplicate entry reads 'entry already exists: ...', exit 1."""
    create(socket, "spiffe://example.org/dup", "--selector", "unix:uid:1")
    result = run(
        socket, "entry", "create", "--spiffe-id", "spiffe://example.org/dup",
        "--parent-id", AGENT, "--selector", "unix:uid:1",
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: entry already exists: ")


def test_delete_and_count(socket: str) -> None:
    """`entry delete` removes by id; `entry count` reports the number left."""
    a = create(socket, "spiffe://example.org/a", "--selector", "unix:uid:1")
    create(socket, "spiffe://example.org/b", "--selector", "unix:uid:1")
    assert run_json(socket, "entry", "count") == {"count": 2}
    result = run(socket, "entry", "delete", "--id", a["id"])
    assert result.stdout.strip() == f"Deleted entry {a['id']}"
    assert run_json(socket, "entry", "count") == {"count": 1}
    assert run(socket, "entry", "count").stdout.strip() == "1 registration entry"


def test_token_generate(socket: str, fake: FakeAdmin) -> None:
    """`token generate` sends ttl and spiffe id (no --ttl: 0, the server's default); JSON has
    token and expires_at."""
    out = run_json(
        socket, "token", "generate", "--ttl", "2m", "--spiffe-id", "spiffe://example.org/n"
    )
    assert out == {
        "token": "t0k3n",
        "expires_at": 1_700_000_120,
        "spiffe_id": "spiffe://example.org/n",
    }
    text = run(socket, "token", "generate").stdout
    assert text.splitlines()[0] == "Token: t0k3n"
    assert "Expires at: 2023-11-14T22:23:20Z" in text  # the server's default ttl 600
    assert [r.ttl for r in fake.requests if isinstance(r, admin_pb2.CreateJoinTokenRequest)][
        -1
    ] == 0


def test_agent_show_ban_and_unknown(socket: str, fake: FakeAdmin) -> None:
    """Agents print their fields; ban reports success; an unknown agent is 'agent not found'."""
    fake.agents[AGENT] = types_pb2.AttestedNode(
        spiffe_id=AGENT, attestation_type="join_token", cert_serial="0a", cert_not_after=1
    )
    assert run_json(socket, "agent", "list")["agents"][0]["spiffe_id"] == AGENT
    shown = run(socket, "agent", "show", "--spiffe-id", AGENT).stdout
    rows = [line.split(" : ") for line in shown.splitlines()]
    assert ["Attestation type", "join_token"] in rows
    assert run_json(socket, "agent", "ban", "--spiffe-id", AGENT)["banned"] is True
    result = run(socket, "agent", "show", "--spiffe-id", "spiffe://example.org/credo/agent/x")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: agent not found: ")


def test_bundle_show_pem_and_spiffe(socket: str, fake: FakeAdmin) -> None:
    """pem prints the X.509 authorities; spiffe prints a SPIFFE bundle that parses back."""
    pem = run(socket, "bundle", "show").stdout
    assert x509.load_pem_x509_certificates(pem.encode()) == [fake.ca_cert]
    doc = run(socket, "bundle", "show", "--format", "spiffe").stdout
    parsed = Bundle.parse(TD, doc.encode())
    assert parsed.x509_authorities == (fake.ca_cert,)
    assert set(parsed.jwt_authorities) == {"kid-1"}
    assert parsed.sequence_number == 7 and parsed.refresh_hint == 300
    out = run_json(socket, "bundle", "show")
    assert out["trust_domain"] == "example.org" and out["sequence_number"] == 7
    der = fake.ca_cert.public_bytes(serialization.Encoding.DER)
    assert base64.b64decode(out["x509_authorities"][0]["asn1"]) == der


def test_bundle_delete_accepts_a_name_or_an_id(socket: str, fake: FakeAdmin) -> None:
    """`bundle delete` takes 'other.org' or 'spiffe://other.org' and sends the name."""
    run_json(socket, "bundle", "delete", "--trust-domain", "other.org")
    run_json(socket, "bundle", "delete", "--id", "spiffe://other.org")
    sent = [r.trust_domain for r in fake.requests if hasattr(r, "trust_domain")]
    assert sent == ["other.org", "other.org"]


def test_x509_mint_writes_key_0600(socket: str, fake: FakeAdmin, tmp_path: Path) -> None:
    """`x509 mint --write` writes svid.pem, key.pem (0600) and bundle.pem that fit together."""
    out_dir = tmp_path / "out"
    out = run_json(
        socket, "x509", "mint", "--spiffe-id", "spiffe://example.org/m", "--dns", "m.local",
        "--write", str(out_dir),
    )  # fmt: skip
    assert out["key_path"] == str(out_dir / "key.pem")
    assert stat.S_IMODE((out_dir / "key.pem").stat().st_mode) == 0o600
    (leaf,) = x509.load_pem_x509_certificates((out_dir / "svid.pem").read_bytes())
    key = serialization.load_pem_private_key((out_dir / "key.pem").read_bytes(), None)
    assert leaf.public_key() == key.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/m"]
    assert x509.load_pem_x509_certificates((out_dir / "bundle.pem").read_bytes()) == [fake.ca_cert]
    assert sorted(p.name for p in out_dir.iterdir()) == ["bundle.pem", "key.pem", "svid.pem"]


def test_unimplemented_service_is_one_line(socket: str) -> None:
    """A service the server lacks (here LocalAuthority) is one line, exit 1."""
    result = run(socket, "localauthority", "x509", "show")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: the server does not support this command")
    assert len(result.stderr.strip().splitlines()) == 1


def test_healthcheck(socket: str) -> None:
    """`healthcheck` says 'server is healthy' when the health service reports SERVING."""
    result = run(socket, "healthcheck")
    assert result.exit_code == 0 and result.stdout.strip() == "server is healthy"
