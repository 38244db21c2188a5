"""The workload attestor plugins the agent knows, by name: ``[agent.workload_attestor.<name>]``.

Every configured attestor runs for each Workload API caller and their selectors are
combined (:class:`~node_agent.workload.attestor.CompositeAttestor`): ``unix``
(:mod:`~node_agent.workload.unix`) and ``systemd`` (:mod:`~node_agent.workload.systemd`).
To add one (``k8s``): write ``node_agent/workload/<name>.py`` with a frozen dataclass for
its TOML table (``validate()`` raising :class:`~credo.errors.ConfigError` that names the
field) and a class implementing :class:`~node_agent.workload.attestor.WorkloadAttestor`,
then add one line to :data:`WORKLOAD_ATTESTORS`. :func:`build_workload_attestor` (called only by
``node_agent/app.py``) constructs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from node_agent.workload.attestor import CompositeAttestor, WorkloadAttestor
from node_agent.workload.k8s import K8sAttestor, K8sAttestorConfig
from node_agent.workload.systemd import SystemdAttestor, SystemdAttestorConfig
from node_agent.workload.unix import UnixAttestor, UnixAttestorConfig

if TYPE_CHECKING:
    from node_agent.config import PluginConfig

__all__ = [
    "DEFAULT_WORKLOAD_ATTESTORS",
    "WORKLOAD_ATTESTORS",
    "WorkloadAttestorPlugin",
    "build_workload_attestor",
]


@dataclass(frozen=True)
class WorkloadAttestorPlugin:
    """A workload attestor plugin: its config table's dataclass and how to build it."""

    config: type[Any]
    build: Callable[[Any], WorkloadAttestor]


WORKLOAD_ATTESTORS: Mapping[str, WorkloadAttestorPlugin] = MappingProxyType(
    {
        "unix": WorkloadAttestorPlugin(UnixAttestorConfig, UnixAttestor),
        "k8s": WorkloadAttestorPlugin(K8sAttestorConfig, K8sAttestor),
        "systemd": WorkloadAttestorPlugin(SystemdAttestorConfig, SystemdAttestor),
    }
)

DEFAULT_WORKLOAD_ATTESTORS = ("unix",)
"""Used when the config file names no ``[agent.workload_attestor.*]`` table."""


def build_workload_attestor(plugins: Sequence[PluginConfig]) -> CompositeAttestor:
    """One attestor running every configured plugin, in config order."""
    return CompositeAttestor(
        [WORKLOAD_ATTESTORS[plugin.name].build(plugin.config) for plugin in plugins]
    )
