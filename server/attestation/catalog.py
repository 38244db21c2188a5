"""The server's node attestor plugins, by name: each plugin class with its config dataclass.

A config file enables a plugin with a table named after it, as in SPIRE::

    [server.node_attestor.join_token]            # no settings
    [server.node_attestor.k8s_psat.clusters.prod]  # (a plugin with named sub-tables)

Each table parses into the plugin's own frozen config dataclass
(:func:`parse_node_attestors`, through :func:`credo._config.plugin_tables`): unknown keys,
bad values and unknown plugin names are refused with the full TOML key. Without any
``[server.node_attestor.*]`` table the server enables ``join_token`` alone
(:data:`DEFAULT_NODE_ATTESTORS`), so configs written before plugin tables existed keep
working. :func:`build_node_attestors` (called by :mod:`server.app`, and nothing else
constructs plugins) builds exactly the plugins the config names.

Adding a plugin ``<name>``:

1. a module ``server/attestation/<name>.py`` with a frozen config dataclass (its
   ``validate()`` raises :class:`~credo.errors.ConfigError` starting with the field name; a
   field of named sub-tables is a :func:`credo._config.named_tables_field`) and a class
   implementing :class:`~server.attestation.protocol.NodeAttestor` with a classmethod
   ``from_config(config, context)``;
2. one :class:`CatalogEntry` in :data:`CATALOG`;
3. config tests (valid table, unknown key, bad value) next to the plugin's own tests.

This module is imported by the CLI to load the config: keep plugin modules light to import
(heavy dependencies at call time or under ``TYPE_CHECKING``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol

from credo._config import plugin_tables
from credo.errors import ConfigError
from credo.spiffe_id import TrustDomain
from server.attestation.join_token import JOIN_TOKEN, JoinTokenAttestor, JoinTokenConfig
from server.attestation.k8s_psat import K8S_PSAT, K8sPsatAttestor, K8sPsatConfig
from server.attestation.protocol import NodeAttestor

if TYPE_CHECKING:
    from server.datastore.protocol import DataStore

__all__ = [
    "CATALOG",
    "DEFAULT_NODE_ATTESTORS",
    "WHERE",
    "CatalogEntry",
    "NodeAttestorPlugin",
    "PluginContext",
    "build_node_attestors",
    "parse_node_attestors",
]

WHERE: Final = "server.node_attestor"
"""The TOML path of the node attestor tables."""


@dataclass(frozen=True)
class PluginContext:
    """What the server hands a node attestor plugin when it builds one."""

    trust_domain: TrustDomain
    datastore: DataStore


class NodeAttestorPlugin(Protocol):
    """The class side of a plugin: how the catalog builds one from its config."""

    @classmethod
    def from_config(cls, config: Any, context: PluginContext) -> NodeAttestor: ...


@dataclass(frozen=True)
class CatalogEntry:
    """One node attestor plugin: its class and the dataclass its TOML table parses into."""

    plugin: type[NodeAttestorPlugin]
    config: type[Any]


CATALOG: Final[Mapping[str, CatalogEntry]] = MappingProxyType(
    {
        JOIN_TOKEN: CatalogEntry(JoinTokenAttestor, JoinTokenConfig),
        K8S_PSAT: CatalogEntry(K8sPsatAttestor, K8sPsatConfig),
    }
)

DEFAULT_NODE_ATTESTORS: Final[Mapping[str, Any]] = MappingProxyType({JOIN_TOKEN: JoinTokenConfig()})
"""What a config without any ``[server.node_attestor.*]`` table enables."""


def parse_node_attestors(
    tables: Any, catalog: Mapping[str, CatalogEntry] = CATALOG, where: str = WHERE
) -> dict[str, Any]:
    """``{name: config}`` from the ``[server.node_attestor.<name>]`` tables.

    Raises :class:`~credo.errors.ConfigError` naming the key for an unknown plugin, an
    unknown or bad setting, or when the section is there but names no plugin.
    """
    configs = plugin_tables(tables, {name: e.config for name, e in catalog.items()}, where)
    if not configs:
        raise ConfigError(
            f"{where}: no node attestor configured; expected at least one table like "
            f"[{where}.{JOIN_TOKEN}] (known plugins: {', '.join(sorted(catalog))})"
        )
    return configs


def build_node_attestors(
    configs: Mapping[str, Any],
    context: PluginContext,
    catalog: Mapping[str, CatalogEntry] = CATALOG,
) -> dict[str, NodeAttestor]:
    """One attestor per configured plugin, keyed by the attestation data ``type`` it handles."""
    attestors: dict[str, NodeAttestor] = {}
    for name, config in configs.items():
        entry = catalog.get(name)
        if entry is None:  # parse_node_attestors refused it; a config built by hand did not
            raise ConfigError(f"{WHERE}.{name}: unknown plugin {name!r}")
        attestor = entry.plugin.from_config(config, context)
        attestors[attestor.type] = attestor
    return attestors
