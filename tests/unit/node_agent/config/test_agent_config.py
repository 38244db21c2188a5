"""Loading the node agent's configuration: defaults, TOML, flags, and errors naming the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node_agent.config import AgentConfig, ConfigError, load_config


def test_defaults_follow_spire() -> None:
    """Defaults: the documented socket paths (under /run as root, else /tmp), data dir,
    cache size 1000, info/text logs."""
    config = load_config(None, {"server_addresses": ("127.0.0.1:8081",)})
    base = Path("/run" if os.geteuid() == 0 else "/tmp", "credo-agent")
    assert config.socket_path == base / "public" / "api.sock"
    assert config.admin_socket == base / "private" / "admin.sock"
    assert config.data_dir == Path("./.credo/agent")
    assert config.svid_cache_max_size == 1000
    assert (config.log_level, config.log_format) == ("info", "text")
    assert config.trust_domain == "example.org"
    assert not config.insecure_bootstrap


def test_toml_agent_table_then_flags_override(tmp_path: Path) -> None:
    """Settings come from the [agent] table, and flags given override them."""
    path = tmp_path / "agent.toml"
    path.write_text(
        "[agent]\n"
        'server_address = ["a.example:8081", "b.example:8081"]\n'
        'trust_domain = "corp.example"\n'
        'trust_bundle = "/etc/credo/bundle.pem"\n'
        "svid_cache_size = 50\n"
        'log_level = "debug"\n'
    )
    config = load_config(path, {"log_level": "warning", "join_token": None})
    assert config.server_addresses == ("a.example:8081", "b.example:8081")
    assert config.trust_domain == "corp.example"
    assert config.trust_bundle == Path("/etc/credo/bundle.pem")
    assert config.svid_cache_max_size == 50
    assert config.log_level == "warning"


def test_top_level_toml_and_single_address(tmp_path: Path) -> None:
    """Without an [agent] table the top level is read; one address may be a plain string."""
    path = tmp_path / "agent.toml"
    path.write_text('server_address = "127.0.0.1:9000"\nsocket = "/run/credo/api.sock"\n')
    config = load_config(path, {})
    assert config.server_addresses == ("127.0.0.1:9000",)
    assert config.socket_path == Path("/run/credo/api.sock")


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({}, "server_addresses"),
        ({"server_addresses": ("nohost",)}, "server_addresses"),
        ({"trust_domain": "Bad Domain"}, "trust_domain"),
        ({"log_level": "loud"}, "log_level"),
        ({"svid_cache_max_size": 0}, "svid_cache_max_size"),
        ({"svid_cache_max_size": "many"}, "svid_cache_max_size"),
        ({"sync_backoff_min": 5, "sync_backoff_max": 1}, "sync_backoff_min"),
        ({"trust_bundle": "/b.pem", "insecure_bootstrap": True}, "insecure_bootstrap"),
        ({"trust_bundle_url": "http://credo.test/bundle"}, "trust_bundle_url"),
        ({"trust_bundle_url": "bundle.pem"}, "trust_bundle_url"),
        (
            {"trust_bundle_url": "https://credo.test/bundle", "trust_bundle": "/b.pem"},
            "trust_bundle_url",
        ),
        ({"trust_bundle_format": "der"}, "trust_bundle_format"),
        ({"no_such_setting": 1}, "no_such_setting"),
        ({"server_addresses": ("h:1",), "metrics_address": "9988"}, "metrics_address"),
        ({"server_addresses": ("h:1",), "nice": -21}, "nice"),
        ({"server_addresses": ("h:1",), "nice": 20}, "nice"),
    ],
)
def test_bad_settings_raise_config_error_naming_them(
    overrides: dict[str, object], setting: str
) -> None:
    """Each bad or missing setting raises ConfigError (also a ValueError) that names it."""
    values: dict[str, object] = {"server_addresses": ("127.0.0.1:8081",)}
    values.update(overrides)
    if "server_addresses" in overrides and overrides["server_addresses"] == ():
        values.pop("server_addresses")
    with pytest.raises(ConfigError, match=setting) as info:
        load_config(None, values if overrides else {})
    assert isinstance(info.value, ValueError)


def test_unreadable_or_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    """A missing file or invalid TOML is reported with the file's name."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("server_address = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, {})


def test_config_is_frozen() -> None:
    """AgentConfig is immutable."""
    config = AgentConfig(server_addresses=("h:1",))
    with pytest.raises(AttributeError):
        config.trust_domain = "x"  # type: ignore[misc]


def test_every_scalar_setting_has_a_flag_and_plugin_tables_have_none() -> None:
    """Each scalar AgentConfig setting is a `credo-agent run` flag; plugin tables are not."""
    import dataclasses

    import click

    from node_agent.cli.main import cli

    run = cli.commands["run"]
    assert isinstance(run, click.Command)
    flags = {p.name for p in run.params} - {"config_file"}
    settings = {f.name for f in dataclasses.fields(AgentConfig)}
    plugin_tables = {"node_attestor", "workload_attestor"}
    # --join-token-file is another way to give the join_token setting (kept out of `ps`).
    assert flags == (settings - plugin_tables - {"deprecations"}) | {
        "workload_size_limit",
        "join_token_file",
    }
