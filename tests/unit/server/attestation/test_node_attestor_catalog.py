"""[server.node_attestor.<name>] tables: each parses into its plugin's config; errors name keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from credo._config import named_tables_field
from credo.errors import ConfigError
from credo.spiffe_id import TrustDomain
from server.attestation.catalog import (
    CatalogEntry,
    PluginContext,
    build_node_attestors,
    parse_node_attestors,
)
from server.attestation.join_token import JoinTokenAttestor, JoinTokenConfig
from server.attestation.protocol import AttestationResult
from server.cli.main import cli
from server.config import ServerConfig, load_config
from server.datastore.sql import SqlDataStore


def _load(tmp_path: Path, text: str) -> ServerConfig:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return load_config(path, {})


def test_no_node_attestor_table_enables_join_token(tmp_path: Path) -> None:
    """A config written before plugin tables existed still enables join_token (alone)."""
    config = _load(tmp_path, '[server]\ntrust_domain = "example.org"\n')
    assert dict(config.node_attestor) == {"join_token": JoinTokenConfig()}
    assert dict(load_config(None, {}).node_attestor) == {"join_token": JoinTokenConfig()}


def test_join_token_table_is_valid(tmp_path: Path) -> None:
    """An empty [server.node_attestor.join_token] table enables join_token."""
    config = _load(tmp_path, "[server]\n[server.node_attestor.join_token]\n")
    assert dict(config.node_attestor) == {"join_token": JoinTokenConfig()}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[server.node_attestor.join_token]\nttl = 5\n",
            "server.node_attestor.join_token.ttl: unknown setting; expected one of: none",
        ),
        (
            "[server.node_attestor]\njoin_token = true\n",
            "server.node_attestor.join_token: expected a table, got True",
        ),
        (
            "[server.node_attestor.jion_token]\n",
            "server.node_attestor.jion_token: unknown plugin 'jion_token'; known plugins: "
            "join_token",
        ),
        (
            '[server]\nnode_attestor = "join_token"\n',
            "server.node_attestor: expected tables like [server.node_attestor.<name>]",
        ),
        (
            "[server.node_attestor]\n",
            "server.node_attestor: no node attestor configured; expected at least one table "
            "like [server.node_attestor.join_token]",
        ),
    ],
    ids=["unknown-key", "bad-value", "unknown-plugin", "not-tables", "empty-section"],
)
def test_bad_node_attestor_tables_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    """A bad [server.node_attestor.*] table is refused with the full TOML key and what was
    expected."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert str(info.value).startswith(message), str(info.value)


def test_unknown_plugin_stops_credo_server_run_with_one_line(tmp_path: Path) -> None:
    """`credo-server run` with an unknown node attestor prints one line naming it, exit 1."""
    path = tmp_path / "server.toml"
    path.write_text("[server.node_attestor.k8s_sat]\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "server.node_attestor.k8s_sat: unknown plugin 'k8s_sat'" in lines[0]


def test_server_builds_the_configured_join_token_attestor(tmp_path: Path) -> None:
    """The catalog builds one attestor per configured plugin, keyed by its payload type."""
    store = SqlDataStore.open(f"sqlite:///{tmp_path / 'ds.sqlite3'}")
    try:
        attestors = build_node_attestors(
            {"join_token": JoinTokenConfig()}, PluginContext(TrustDomain("example.org"), store)
        )
    finally:
        store.close()
    assert list(attestors) == ["join_token"]
    assert isinstance(attestors["join_token"], JoinTokenAttestor)


# --- a plugin whose table holds named sub-tables (the shape k8s_psat's clusters take) ------


@dataclass(frozen=True)
class _Cluster:
    service_account_allow_list: tuple[str, ...] = ()
    audience: str = "credo"

    def validate(self) -> None:
        if not self.service_account_allow_list:
            raise ConfigError("service_account_allow_list: at least one namespace:name is needed")


@dataclass(frozen=True)
class _ClustersConfig:
    clusters: Mapping[str, _Cluster] = named_tables_field(_Cluster)


class _ClustersAttestor:
    type = "clusters"

    def __init__(self, config: _ClustersConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, config: _ClustersConfig, context: PluginContext) -> _ClustersAttestor:
        return cls(config)

    def attest(self, payload: bytes) -> AttestationResult:
        raise NotImplementedError


_CATALOG = {"clusters": CatalogEntry(_ClustersAttestor, _ClustersConfig)}


def test_nested_named_tables_parse_into_their_own_dataclass() -> None:
    """[server.node_attestor.<name>.clusters.<cluster>] tables become {cluster: config}."""
    tables = {
        "clusters": {
            "clusters": {
                "prod": {"service_account_allow_list": ["spire:agent"]},
                "dev": {"service_account_allow_list": ["dev:agent"], "audience": "x"},
            }
        }
    }
    configs = parse_node_attestors(tables, _CATALOG)
    assert configs == {
        "clusters": _ClustersConfig(
            {"prod": _Cluster(("spire:agent",)), "dev": _Cluster(("dev:agent",), "x")}
        )
    }
    built = build_node_attestors(configs, PluginContext(TrustDomain("example.org"), None), _CATALOG)
    assert isinstance(built["clusters"], _ClustersAttestor)
    assert set(built["clusters"].config.clusters) == {"prod", "dev"}


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        (
            {"service_account_allow_list": ["a:b"], "audiences": "x"},
            "server.node_attestor.clusters.clusters.prod.audiences: unknown setting",
        ),
        (
            {"service_account_allow_list": "a:b", "audience": 3},
            "server.node_attestor.clusters.clusters.prod.audience: expected a string, got 3",
        ),
        (
            {},
            "server.node_attestor.clusters.clusters.prod.service_account_allow_list: "
            "at least one namespace:name is needed",
        ),
    ],
    ids=["unknown-key", "bad-value", "invalid"],
)
def test_errors_in_a_nested_table_name_its_full_key(
    cluster: dict[str, object], message: str
) -> None:
    """A bad key inside a named sub-table is reported with the sub-table's full TOML path."""
    with pytest.raises(ConfigError) as info:
        parse_node_attestors({"clusters": {"clusters": {"prod": cluster}}}, _CATALOG)
    assert str(info.value).startswith(message), str(info.value)


def test_nested_tables_must_be_tables() -> None:
    """``clusters = "prod"`` instead of [..clusters.prod] tables says which form is expected."""
    with pytest.raises(ConfigError, match=r"expected tables like \[server.node_attestor.clusters"):
        parse_node_attestors({"clusters": {"clusters": "prod"}}, _CATALOG)
