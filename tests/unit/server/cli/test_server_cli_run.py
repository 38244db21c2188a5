"""`credo-server run` builds its config from defaults, then the TOML file, then flags."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from server.cli.main import cli
from server.cli.run import SETTING_FLAGS
from server.config import FILE_ONLY_SETTINGS, TABLE_FLAGS, ServerConfig

CONFIG = """\
[server]
trust_domain = "file.example"
x509_svid_ttl = "30m"
jwt_svid_ttl = "2m"
log_format = "json"
bind_address = "127.0.0.1:9000"
"""


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """Stand in for ``server.app`` and record the config ``run`` hands it."""
    seen: list[ServerConfig] = []
    fake = types.ModuleType("server.app")

    def run(config: ServerConfig) -> int:
        seen.append(config)
        return 3

    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "server.app", fake)
    return seen


def test_every_scalar_setting_has_a_flag() -> None:
    """Each scalar ServerConfig setting can be given as a flag of the same name; the nested
    plugin tables ([server.node_attestor.<name>], [server.bundle_publisher.<name>]) are set
    in the config file only."""
    flags = {flag.removeprefix("--").replace("-", "_") for flag, _, _ in SETTING_FLAGS}
    settings = {f.name for f in dataclasses.fields(ServerConfig)}
    assert {"node_attestor", "bundle_publisher", "http", "delegation"} == FILE_ONLY_SETTINGS
    assert flags == (settings - FILE_ONLY_SETTINGS) | set(TABLE_FLAGS)


def test_flags_override_the_file_which_overrides_defaults(
    tmp_path: Path, started: list[ServerConfig]
) -> None:
    """A flag beats the file; a file setting beats the default; untouched settings keep it."""
    path = tmp_path / "server.toml"
    path.write_text(CONFIG)
    result = CliRunner().invoke(
        cli,
        ["run", "--config", str(path), "--x509-svid-ttl", "10m", "--data-dir", str(tmp_path)],
    )
    assert result.exit_code == 3, result.output  # run()'s return value is the exit code
    (config,) = started
    assert config.x509_svid_ttl == 600  # flag over file
    assert config.trust_domain == "file.example"  # file over default
    assert config.jwt_svid_ttl == 120
    assert config.log_format == "json"
    assert config.bind_address == "127.0.0.1:9000"
    assert config.data_dir == tmp_path
    assert config.ca_ttl == 24 * 3600  # default
    assert config.ca_key_type == "ec-p256"


def test_no_config_file_means_defaults_and_flags(started: list[ServerConfig]) -> None:
    """Without --config the defaults apply, changed only by flags."""
    result = CliRunner().invoke(
        cli, ["run", "--trust-domain", "flag.example", "--signing-rate-limit", "50"]
    )
    assert result.exit_code == 3, result.output
    (config,) = started
    assert config.trust_domain == "flag.example"
    assert config.signing_rate_limit == 50.0
    assert config.x509_svid_ttl == 3600


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--trust-domain", "Not_Valid!"], "trust_domain"),
        (["--ca-ttl", "forever"], "ca_ttl: invalid duration 'forever'"),
        (["--x509-svid-ttl", "48h"], "must not exceed ca_ttl"),
        (["--join-token-ttl", "2h", "--join-token-max-ttl", "1h"], "join_token_max_ttl"),
        (["--bind-address", "nohostport"], "bind_address"),
        (["--upstream-ca-cert", "ca.pem"], "given together"),
        (["--config", "/nonexistent/credo.toml"], "cannot read config file"),
    ],
)
def test_bad_config_is_one_line_exit_1(
    args: list[str], needle: str, started: list[ServerConfig]
) -> None:
    """A bad setting (flag or file) is one line naming it, exit 1, and the server never starts."""
    result = CliRunner().invoke(cli, ["run", *args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert needle in lines[0]
    assert started == []


def test_bad_toml_is_one_line(tmp_path: Path, started: list[ServerConfig]) -> None:
    """A config file that is not TOML is reported in one line naming the file."""
    path = tmp_path / "server.toml"
    path.write_text("trust_domain = \n[[[")
    result = CliRunner().invoke(cli, ["run", "--config", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not valid TOML" in lines[0] and str(path) in lines[0]


def test_unknown_setting_in_file_is_refused(tmp_path: Path, started: list[ServerConfig]) -> None:
    """A misspelled setting in the file is named, not silently ignored."""
    path = tmp_path / "server.toml"
    path.write_text('trust_domian = "x.org"\n')
    result = CliRunner().invoke(cli, ["run", "--config", str(path)])
    assert result.exit_code == 1
    assert "unknown setting 'trust_domian'" in result.stderr


def test_key_type_is_a_choice(started: list[ServerConfig]) -> None:
    """--ca-key-type accepts only the supported key types (a usage error otherwise)."""
    result = CliRunner().invoke(cli, ["run", "--ca-key-type", "dsa-1024"])
    assert result.exit_code == 2
    assert "'dsa-1024' is not one of" in result.stderr
    assert started == []
