"""The server's bundle publisher plugins, by name: each plugin class with its config dataclass.

A config file enables a publisher with a table named after it, as SPIRE names its
``BundlePublisher`` plugins::

    [server.bundle_publisher.k8s_configmap]   # the bundle (PEM) in a Kubernetes ConfigMap
    namespace = "credo"
    name = "credo-bundle"

Each table parses into the plugin's own frozen config dataclass
(:func:`parse_bundle_publishers`, through :func:`credo._config.plugin_tables`): unknown
keys, bad values and unknown plugin names are refused with the full TOML key. Without any
table no publisher runs. :func:`build_bundle_publishers` (called by :mod:`server.app`,
and nothing else constructs plugins) builds exactly the plugins the config names.

Adding a plugin ``<name>``: a module ``server/bundle_publisher/<name>.py`` with a frozen
config dataclass (its ``validate()`` raises :class:`~credo.errors.ConfigError` starting
with the field name) and a class implementing
:class:`~server.bundle_publisher.protocol.BundlePublisherPlugin` with a classmethod
``from_config(config, context)``; one :class:`CatalogEntry` in :data:`CATALOG`; config
tests next to the plugin's own. Keep plugin modules light to import: the CLI loads this
catalog to read the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Protocol

from credo._config import plugin_tables
from credo.errors import ConfigError
from credo.spiffe_id import TrustDomain
from server.bundle_publisher.k8s_configmap import (
    K8S_CONFIGMAP,
    K8sConfigMapConfig,
    K8sConfigMapPublisher,
)
from server.bundle_publisher.protocol import BundlePublisherPlugin

__all__ = [
    "CATALOG",
    "WHERE",
    "CatalogEntry",
    "PublisherContext",
    "build_bundle_publishers",
    "parse_bundle_publishers",
]

WHERE: Final = "server.bundle_publisher"
"""The TOML path of the bundle publisher tables."""


@dataclass(frozen=True)
class PublisherContext:
    """What the server hands a bundle publisher plugin when it builds one."""

    trust_domain: TrustDomain


class _PluginClass(Protocol):
    """The class side of a plugin: how the catalog builds one from its config."""

    @classmethod
    def from_config(cls, config: Any, context: PublisherContext) -> BundlePublisherPlugin: ...


@dataclass(frozen=True)
class CatalogEntry:
    """One bundle publisher plugin: its class and the dataclass its TOML table parses into."""

    plugin: type[_PluginClass]
    config: type[Any]


CATALOG: Final[Mapping[str, CatalogEntry]] = MappingProxyType(
    {
        K8S_CONFIGMAP: CatalogEntry(K8sConfigMapPublisher, K8sConfigMapConfig),
    }
)


def parse_bundle_publishers(
    tables: Any, catalog: Mapping[str, CatalogEntry] = CATALOG, where: str = WHERE
) -> dict[str, Any]:
    """``{name: config}`` from the ``[server.bundle_publisher.<name>]`` tables.

    Raises :class:`~credo.errors.ConfigError` naming the key for an unknown plugin, an
    unknown or bad setting, or when the section is there but names no plugin.
    """
    configs = plugin_tables(tables, {name: e.config for name, e in catalog.items()}, where)
    if tables is not None and not configs:
        raise ConfigError(
            f"{where}: no bundle publisher configured; expected a table like "
            f"[{where}.{K8S_CONFIGMAP}] (known plugins: {', '.join(sorted(catalog))})"
        )
    return configs


def build_bundle_publishers(
    configs: Mapping[str, Any],
    context: PublisherContext,
    catalog: Mapping[str, CatalogEntry] = CATALOG,
) -> list[BundlePublisherPlugin]:
    """One publisher per configured plugin, in config order."""
    publishers: list[BundlePublisherPlugin] = []
    for name, config in configs.items():
        entry = catalog.get(name)
        if entry is None:  # parse_bundle_publishers refused it; a config built by hand did not
            raise ConfigError(f"{WHERE}.{name}: unknown plugin {name!r}")
        publishers.append(entry.plugin.from_config(config, context))
    return publishers
