"""The workload attestor catalog and CompositeAttestor: the configured attestors, combined,
against the real current process."""

from __future__ import annotations

import asyncio
import os

import pytest

from credo.selector import Selector
from node_agent.config import PluginConfig
from node_agent.workload.attestor import CompositeAttestor
from node_agent.workload.catalog import build_workload_attestor
from node_agent.workload.errors import AttestationFailed
from node_agent.workload.unix import UnixAttestor, UnixAttestorConfig


class _Static:
    """A workload attestor that answers fixed selectors (a stand-in for k8s, systemd)."""

    def __init__(self, *selectors: str) -> None:
        self.selectors = [Selector.parse(s) for s in selectors]
        self.pids: list[int] = []

    async def attest(self, pid: int) -> list[Selector]:
        self.pids.append(pid)
        return list(self.selectors)


class _Failing:
    async def attest(self, pid: int) -> list[Selector]:
        raise AttestationFailed("cannot read the pod", pid=pid)


def _attest(attestor: CompositeAttestor, pid: int) -> list[str]:
    return [str(s) for s in asyncio.run(attestor.attest(pid))]


def test_catalog_builds_the_configured_unix_attestor_with_its_settings() -> None:
    """The unix table's settings reach the attestor: without path discovery there is no
    unix:path selector, but the uid is there."""
    attestor = build_workload_attestor(
        [PluginConfig("unix", UnixAttestorConfig(discover_workload_path=False))]
    )
    selectors = _attest(attestor, os.getpid())
    assert f"unix:uid:{os.geteuid()}" in selectors
    assert not any(s.startswith("unix:path:") for s in selectors)


def test_composite_combines_every_attestor_in_order_without_duplicates() -> None:
    """Selectors of all attestors come back in attestor order, each once; every attestor
    sees the same pid."""
    uid = f"unix:uid:{os.geteuid()}"
    other = _Static("k8s:ns:prod", uid)
    attestor = CompositeAttestor(
        [UnixAttestor(UnixAttestorConfig(discover_workload_path=False)), other]
    )
    selectors = _attest(attestor, os.getpid())
    assert selectors.count(uid) == 1
    assert selectors.index(uid) < selectors.index("k8s:ns:prod")
    assert selectors[-1] == "k8s:ns:prod"
    assert other.pids == [os.getpid()]


def test_composite_fails_when_any_attestor_fails() -> None:
    """One attestor that cannot read the process fails the whole attestation: a workload
    never gets identities from a partial set of selectors."""
    attestor = CompositeAttestor([_Static("unix:uid:0"), _Failing()])
    with pytest.raises(AttestationFailed, match="cannot read the pod"):
        asyncio.run(attestor.attest(os.getpid()))
