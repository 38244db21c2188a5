"""The node attestor plugins the agent knows, by name: ``[agent.node_attestor.<name>]``.

Plugins: ``join_token`` (:mod:`node_agent.attestation.join_token`) and ``k8s_psat``
(:mod:`node_agent.attestation.k8s_psat`). To add one: write
``node_agent/attestation/<name>.py`` with a frozen dataclass for its TOML table
(``validate()`` raising :class:`~credo.errors.ConfigError` that names the field) and a
class implementing
:class:`~node_agent.attestation.attestor.NodeAttestor`, then add one line to
:data:`NODE_ATTESTORS`. The config loader parses the table with the dataclass
(:func:`credo._config.plugin_tables`) and :func:`build_node_attestor` (called only by
``node_agent/app.py``) constructs the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from node_agent.attestation.attestor import NodeAttestor
from node_agent.attestation.join_token import JoinTokenAttestor, JoinTokenConfig
from node_agent.attestation.k8s_psat import K8S_PSAT, K8sPsatAttestor, K8sPsatConfig

if TYPE_CHECKING:
    from node_agent.config import AgentConfig

__all__ = ["DEFAULT_NODE_ATTESTOR", "NODE_ATTESTORS", "NodeAttestorPlugin", "build_node_attestor"]


@dataclass(frozen=True)
class NodeAttestorPlugin:
    """A node attestor plugin: its config table's dataclass and how to build it."""

    config: type[Any]
    build: Callable[[Any, AgentConfig], NodeAttestor]
    """(the parsed table, the whole agent config) -> the attestor."""


NODE_ATTESTORS: Mapping[str, NodeAttestorPlugin] = MappingProxyType(
    {
        "join_token": NodeAttestorPlugin(
            JoinTokenConfig, lambda config, agent: JoinTokenAttestor(config, agent.join_token)
        ),
        K8S_PSAT: NodeAttestorPlugin(K8sPsatConfig, lambda config, agent: K8sPsatAttestor(config)),
    }
)

DEFAULT_NODE_ATTESTOR = "join_token"
"""Used when the config file names no ``[agent.node_attestor.*]`` table."""


def build_node_attestor(agent: AgentConfig) -> NodeAttestor:
    """The node attestor ``agent`` names (exactly one; the config loader checked)."""
    plugin = agent.node_attestor
    return NODE_ATTESTORS[plugin.name].build(plugin.config, agent)
