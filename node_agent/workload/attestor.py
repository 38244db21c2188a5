"""The workload attestor interface: turn a caller's pid into selectors.

Attestors read facts about a process (its uid, its executable, its Kubernetes pod, ...)
and return them as :class:`~credo.selector.Selector` values. They do not decide whether
the pid still names the caller; the Workload API handler checks that afterwards with
:meth:`~node_agent.workload.peer.PeerProcess.ensure_same_process`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from credo.selector import Selector

__all__ = ["CompositeAttestor", "WorkloadAttestor"]


class WorkloadAttestor(Protocol):
    """Something that can attest a local process into selectors."""

    async def attest(self, pid: int) -> list[Selector]:
        """Selectors for ``pid``; raise :class:`~node_agent.workload.errors.AttestationFailed`.

        An attestor not in a position to attest the process (a k8s attestor and a process
        outside any pod) returns an empty list rather than failing.
        """
        ...


class CompositeAttestor:
    """Runs several attestors concurrently and concatenates their selectors (first failure wins)."""

    def __init__(self, attestors: Sequence[WorkloadAttestor]) -> None:
        self._attestors = tuple(attestors)

    async def attest(self, pid: int) -> list[Selector]:
        """Selectors from every attestor, in attestor order, without duplicates."""
        results = await asyncio.gather(*(a.attest(pid) for a in self._attestors))
        seen: set[Selector] = set()
        out: list[Selector] = []
        for selectors in results:
            for s in selectors:
                if s not in seen:
                    seen.add(s)
                    out.append(s)
        return out
