"""``credo-server federation ...``: bad relationships are refused with one line, nothing
is stored; good ones are listed, shown, updated and deleted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import ServerProcess, one_line_error, start_server, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module: each test leaves no relationship behind."""
    with start_server(tmp_path_factory.mktemp("federation-cli")) as srv:
        yield srv


def create(server: ServerProcess, *args: str) -> object:
    return server.cli("federation", "create", *args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--trust-domain", "Bad_TD!", "--bundle-endpoint-url", "https://x.test/"],
            "trust domain",
        ),
        (["--trust-domain", "p.test", "--bundle-endpoint-url", "not a url"], "https URL"),
        (["--trust-domain", "p.test", "--bundle-endpoint-url", "http://p.test/"], "https URL"),
        (
            ["--trust-domain", "p.test", "--bundle-endpoint-url", "https://p.test:99999/"],
            "bundle_endpoint_url",
        ),
        (
            ["--trust-domain", "example.org", "--bundle-endpoint-url", "https://p.test/"],
            "own trust domain",
        ),
        (
            ["--trust-domain", "p.test", "--bundle-endpoint-url", "https://p.test/"],
            "endpoint_spiffe_id",
        ),
        (
            [
                "--trust-domain",
                "p.test",
                "--bundle-endpoint-url",
                "https://p.test/",
                "--endpoint-spiffe-id",
                "spiffe://p.test/credo/server",
            ],
            "--trust-domain-bundle",
        ),
        (
            [
                "--trust-domain",
                "p.test",
                "--bundle-endpoint-url",
                "https://p.test/",
                "--bundle-endpoint-profile",
                "https_web",
                "--endpoint-spiffe-id",
                "spiffe://p.test/x",
            ],
            "only https_spiffe",
        ),
    ],
)
def test_bad_relationships_are_refused(
    server: ServerProcess, args: list[str], message: str
) -> None:
    """Each malformed relationship is one `Error:` line naming the problem; none is stored."""
    line = one_line_error(create(server, *args))  # type: ignore[arg-type]
    assert message in line
    assert server.cli_json("federation", "list") == {"relationships": []}


def test_relationship_lifecycle(server: ServerProcess, tmp_path: Path) -> None:
    """create (https_web), list, show, update to https_spiffe with a first bundle, delete."""
    server.cli_json(
        "federation",
        "create",
        "--trust-domain",
        "p.test",
        "--bundle-endpoint-url",
        "https://127.0.0.1:1/bundle",
        "--bundle-endpoint-profile",
        "https_web",
    )
    listed = server.cli_json("federation", "list")["relationships"]
    assert [r["trust_domain"] for r in listed] == ["p.test"]
    assert one_line_error(
        create(  # type: ignore[arg-type]
            server,
            "--trust-domain",
            "p.test",
            "--bundle-endpoint-url",
            "https://127.0.0.1:1/bundle",
            "--bundle-endpoint-profile",
            "https_web",
        )
    )
    first = tmp_path / "p.pem"
    first.write_text(server.bundle_pem())  # any CA will do as p.test's first bundle here
    updated = server.cli_json(
        "federation",
        "update",
        "--trust-domain",
        "p.test",
        "--bundle-endpoint-url",
        "https://127.0.0.1:1/bundle",
        "--endpoint-spiffe-id",
        "spiffe://p.test/credo/server",
        "--trust-domain-bundle",
        str(first),
        "--trust-domain-bundle-format",
        "pem",
    )
    assert updated["bundle_endpoint_profile"] == "https_spiffe"
    assert updated["bundle_sequence"] >= 0
    shown = server.cli_json("federation", "show", "--trust-domain", "p.test")
    assert shown["endpoint_spiffe_id"] == "spiffe://p.test/credo/server"
    server.cli_json("federation", "delete", "--trust-domain", "p.test")
    assert server.cli_json("federation", "list") == {"relationships": []}
    assert "not found" in one_line_error(
        server.cli("federation", "show", "--trust-domain", "p.test")
    ).lower() or "no federation" in one_line_error(
        server.cli("federation", "show", "--trust-domain", "p.test")
    )


def test_relationship_changes_are_audited_not_refreshes(server: ServerProcess) -> None:
    """create, update and delete each leave one record by the admin naming the endpoint; the
    failing refreshes in between (nothing listens on port 1) and refused creates leave none."""
    args = ["--trust-domain", "q.test", "--bundle-endpoint-profile", "https_web"]
    server.cli_json("federation", "create", *args, "--bundle-endpoint-url", "https://127.0.0.1:1/a")
    refused = create(
        server, "--trust-domain", "Bad_TD!", "--bundle-endpoint-url", "https://x.test/"
    )
    assert "trust domain" in one_line_error(refused)  # type: ignore[arg-type]
    server.cli_json("federation", "update", *args, "--bundle-endpoint-url", "https://127.0.0.1:1/b")

    def refreshed() -> bool:
        shown = server.cli_json("federation", "show", "--trust-domain", "q.test")
        return bool(shown["last_error"])

    wait_for(refreshed, 30, "a failed refresh of q.test")
    server.cli_json("federation", "delete", "--trust-domain", "q.test")
    records = server.cli_json("audit", "show", "--action", "federation.")["records"]
    mine = [r for r in records if r["target"] == "q.test"]
    assert [r["action"] for r in mine] == [
        "federation.create",
        "federation.update",
        "federation.delete",
    ]
    assert all(r["actor_kind"] == "admin" for r in records)
    assert mine[0]["details"]["bundle_endpoint_url"] == "https://127.0.0.1:1/a"
    assert mine[1]["details"]["bundle_endpoint_url"] == "https://127.0.0.1:1/b"
    assert not [r for r in records if r["target"] == "Bad_TD!"]
