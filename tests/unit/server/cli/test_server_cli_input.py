"""Bad input to ``credo-server`` commands fails before any server is contacted: one line, exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from server.cli.main import cli

ID = "spiffe://example.org/web"
PARENT = "spiffe://example.org/credo/agent/join_token/abc"


def invoke(args: list[str], socket: Path, stdin: str | None = None) -> Result:
    """Run the CLI in-process against ``socket`` (which nothing listens on)."""
    return CliRunner().invoke(cli, [*args, "--socket", str(socket)], input=stdin)


def assert_one_line_error(result: Result, *needles: str, code: int = 1) -> str:
    """It failed with ``code``, no traceback, and one ``Error:`` line naming ``needles``."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def socket(tmp_path: Path) -> Path:
    """A socket path nobody listens on."""
    return tmp_path / "absent.sock"


BAD_INPUT = {
    "selector-without-type": (
        ["entry", "create", "--spiffe-id", ID, "--parent-id", PARENT, "--selector", "foo"],
        ["invalid selector 'foo'", "type:value", "--selector"],
    ),
    "selector-empty-value": (
        ["entry", "create", "--spiffe-id", ID, "--parent-id", PARENT, "--selector", "unix:"],
        ["invalid selector", "value is empty"],
    ),
    "spiffe-id-wrong-scheme": (
        [
            "entry",
            "create",
            "--spiffe-id",
            "http://example.org/web",
            "--parent-id",
            PARENT,
            "--selector",
            "unix:uid:1",
        ],
        ["invalid SPIFFE ID 'http://example.org/web'", "--spiffe-id"],
    ),
    "parent-id-trailing-slash": (
        [
            "entry",
            "create",
            "--spiffe-id",
            ID,
            "--parent-id",
            "spiffe://example.org/a/",
            "--selector",
            "unix:uid:1",
        ],
        ["invalid SPIFFE ID", "trailing", "--parent-id"],
    ),
    "ttl-zero": (
        [
            "entry",
            "create",
            "--spiffe-id",
            ID,
            "--parent-id",
            PARENT,
            "--selector",
            "unix:uid:1",
            "--x509-svid-ttl",
            "0",
        ],
        ["invalid duration '0'", "greater than zero", "--x509-svid-ttl"],
    ),
    "ttl-not-a-duration": (
        [
            "entry",
            "create",
            "--spiffe-id",
            ID,
            "--parent-id",
            PARENT,
            "--selector",
            "unix:uid:1",
            "--jwt-svid-ttl",
            "soon",
        ],
        ["invalid duration 'soon'", "--jwt-svid-ttl"],
    ),
    "expires-at-without-zone": (
        [
            "entry",
            "create",
            "--spiffe-id",
            ID,
            "--parent-id",
            PARENT,
            "--selector",
            "unix:uid:1",
            "--expires-at",
            "2030-01-01T00:00:00",
        ],
        ["time zone", "--expires-at"],
    ),
    "federates-with-bad-trust-domain": (
        [
            "entry",
            "create",
            "--spiffe-id",
            ID,
            "--parent-id",
            PARENT,
            "--selector",
            "unix:uid:1",
            "--federates-with",
            "Bad.Domain",
        ],
        ["invalid trust domain", "--federates-with"],
    ),
    "create-without-selector": (
        ["entry", "create", "--spiffe-id", ID, "--parent-id", PARENT],
        ["at least one --selector is required"],
    ),
    "create-without-parent": (
        ["entry", "create", "--spiffe-id", ID, "--selector", "unix:uid:1"],
        ["--parent-id is required"],
    ),
    "node-with-foreign-parent": (
        [
            "entry",
            "create",
            "--node",
            "--spiffe-id",
            ID,
            "--parent-id",
            PARENT,
            "--selector",
            "join_token:x",
        ],
        ["node-alias", "spiffe://example.org/credo/server"],
    ),
    "update-without-id": (
        ["entry", "update", "--selector", "unix:uid:1"],
        ["--id is required"],
    ),
    "update-nothing": (
        ["entry", "update", "--id", "abc"],
        ["nothing to update"],
    ),
    "data-mixed-with-flags": (
        ["entry", "create", "--data", "-", "--selector", "unix:uid:1"],
        ["--data cannot be combined with --selector"],
    ),
    "show-bad-selector-filter": (
        ["entry", "show", "--selector", "nocolon"],
        ["invalid selector 'nocolon'"],
    ),
    "token-negative-ttl": (
        ["token", "generate", "--ttl", "-5"],
        ["invalid duration", "--ttl"],
    ),
    "token-bad-spiffe-id": (
        ["token", "generate", "--spiffe-id", "spiffe://example.org/a/../b"],
        ["invalid SPIFFE ID", "'..'"],
    ),
    "agent-show-bad-spiffe-id": (
        ["agent", "show", "--spiffe-id", "agent-1"],
        ["invalid SPIFFE ID 'agent-1'"],
    ),
    "bundle-delete-bad-trust-domain": (
        ["bundle", "delete", "--id", "spiffe://example.org/path"],
        ["invalid trust domain", "must not have a path"],
    ),
    "x509-mint-bad-ttl": (
        ["x509", "mint", "--spiffe-id", ID, "--ttl", "1x"],
        ["invalid duration '1x'"],
    ),
    "jwt-mint-bad-spiffe-id": (
        ["jwt", "mint", "--spiffe-id", "spiffe://EXAMPLE.org/x", "--audience", "a"],
        ["invalid SPIFFE ID", "uppercase"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_exit_1(case: str, socket: Path) -> None:
    """Each malformed value is refused locally with one line naming it, exit code 1."""
    args, needles = BAD_INPUT[case]
    assert_one_line_error(invoke(args, socket), *needles)


BAD_DATA = {
    "not-json": ("{entries: nope", ["is not valid JSON"]),
    "no-entries-list": ('{"entry": []}', ['{"entries": [...]}']),
    "empty-batch": ('{"entries": []}', ["no entries"]),
    "unknown-field": (
        json.dumps({"entries": [{"spiffe_id": ID, "ttl": 5}]}),
        ["entry 0", "unknown field 'ttl'"],
    ),
    "bad-selector": (
        json.dumps({"entries": [{"spiffe_id": ID, "parent_id": PARENT, "selectors": ["x"]}]}),
        ["entry 0", "selectors[0]", "invalid selector 'x'"],
    ),
    "bad-spiffe-id-in-second-entry": (
        json.dumps(
            {
                "entries": [
                    {"spiffe_id": ID, "parent_id": PARENT, "selectors": ["unix:uid:1"]},
                    {"spiffe_id": "spiffe://", "parent_id": PARENT, "selectors": ["unix:uid:1"]},
                ]
            }
        ),
        ["entry 1", "spiffe_id", "invalid SPIFFE ID"],
    ),
    "ttl-as-string": (
        json.dumps({"entries": [{"spiffe_id": ID, "parent_id": PARENT, "x509_svid_ttl": "1h"}]}),
        ["entry 0", "x509_svid_ttl", "whole number"],
    ),
    "missing-selectors": (
        json.dumps({"entries": [{"spiffe_id": ID, "parent_id": PARENT}]}),
        ["entry 0", "at least one selectors is required"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file_is_one_line_exit_1(case: str, socket: Path) -> None:
    """A malformed --data batch is refused before contacting the server, naming entry and field."""
    stdin, needles = BAD_DATA[case]
    result = invoke(["entry", "create", "--data", "-"], socket, stdin=stdin)
    assert_one_line_error(result, "--data", *needles)


def test_missing_data_file_is_one_line(socket: Path, tmp_path: Path) -> None:
    """A --data path that does not exist gives one line naming the file."""
    missing = tmp_path / "entries.json"
    result = invoke(["entry", "create", "--data", str(missing)], socket)
    assert_one_line_error(result, "cannot read", str(missing))


def test_bundle_set_refuses_a_file_that_is_not_pem(socket: Path, tmp_path: Path) -> None:
    """`bundle set --format pem` checks the file locally and names what it expected."""
    path = tmp_path / "bundle.pem"
    path.write_text("not a certificate")
    result = invoke(["bundle", "set", "--id", "other.org", "--path", str(path)], socket)
    assert_one_line_error(result, "invalid bundle", "not PEM")


def test_bundle_set_refuses_a_spiffe_bundle_without_keys(socket: Path) -> None:
    """`bundle set --format spiffe` checks the JWKS document locally."""
    result = invoke(
        ["bundle", "set", "--trust-domain", "other.org", "--format", "spiffe"],
        socket,
        stdin='{"spiffe_sequence": 1}',
    )
    assert_one_line_error(result, "invalid bundle", "no 'keys'")


@pytest.mark.parametrize(
    "args",
    [
        ["entry", "show"],
        ["entry", "count"],
        ["entry", "create", "--spiffe-id", ID, "--parent-id", PARENT, "--selector", "unix:uid:1"],
        ["entry", "delete", "--id", "abc"],
        ["agent", "list"],
        ["agent", "count"],
        ["token", "generate"],
        ["bundle", "show"],
        ["bundle", "list"],
        ["jwt", "mint", "--spiffe-id", ID, "--audience", "a"],
        ["x509", "mint", "--spiffe-id", ID],
        ["localauthority", "x509", "show"],
        ["localauthority", "jwt", "prepare"],
        ["federation", "list"],
        ["federation", "show", "--trust-domain", "p.test"],
        ["healthcheck"],
    ],
    ids=lambda a: "-".join(x for x in a if not x.startswith(("-", "spiffe", "unix", "abc"))),
)
def test_unreachable_socket_is_one_line(args: list[str], socket: Path) -> None:
    """With no server on the socket, every admin command says so in one line and exits 1."""
    line = assert_one_line_error(invoke(args, socket), "cannot connect to the server at")
    assert str(socket) in line
    assert "is credo-server running?" in line


def test_socket_comes_from_the_environment(tmp_path: Path) -> None:
    """CREDO_SERVER_SOCKET picks the socket when --socket is not given."""
    path = tmp_path / "env.sock"
    result = CliRunner().invoke(cli, ["entry", "count"], env={"CREDO_SERVER_SOCKET": str(path)})
    assert_one_line_error(result, f"cannot connect to the server at {path}")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["entry", "show", "--output", "yaml"], "'yaml' is not one of"),
        (["bundle", "show", "--format", "der"], "'der' is not one of"),
        (["entry", "show", "--match", "some"], "'some' is not one of"),
        (["entry", "frobnicate"], "No such command"),
        (["agent", "ban"], "Missing option '--spiffe-id'"),
        (["localauthority", "jwt", "activate"], "Missing option '--authority-id'"),
    ],
)
def test_usage_errors_exit_2(args: list[str], needle: str, socket: Path) -> None:
    """Unknown choices, commands and missing required options are usage errors: exit 2."""
    result = invoke(args, socket)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert needle in result.stderr


def test_bundle_set_asks_for_force_before_storing_an_empty_key_set(socket: Path) -> None:
    """A bundle with an empty key set is valid (all keys revoked), but storing it means
    nothing from that trust domain verifies: `bundle set` asks for --force first."""
    result = invoke(
        ["bundle", "set", "--trust-domain", "other.org", "--format", "spiffe"],
        socket,
        stdin='{"keys": [], "spiffe_sequence": 4}',
    )
    assert_one_line_error(result, "no X.509 or JWT authorities", "--force")


def test_federation_bundle_file_that_cannot_be_read_is_one_line(socket: Path) -> None:
    """--trust-domain-bundle naming a missing file fails before the server is contacted."""
    result = invoke(
        [
            "federation",
            "create",
            "--trust-domain",
            "p.test",
            "--bundle-endpoint-url",
            "https://p.test/bundle",
            "--trust-domain-bundle",
            "/nonexistent/b.json",
        ],
        socket,
    )
    assert_one_line_error(result, "cannot read --trust-domain-bundle /nonexistent/b.json")


def test_federation_profile_is_a_choice(socket: Path) -> None:
    """An unknown --bundle-endpoint-profile is refused by the CLI."""
    result = invoke(
        [
            "federation",
            "create",
            "--trust-domain",
            "p.test",
            "--bundle-endpoint-url",
            "https://p.test/bundle",
            "--bundle-endpoint-profile",
            "https_ftp",
        ],
        socket,
    )
    assert result.exit_code != 0
    assert "https_ftp" in result.output
