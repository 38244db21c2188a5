"""Shared by the benchmarks: a workspace of real Credo processes, admin calls, statistics,
output.

The processes come from the one harness the integration tests use,
:mod:`tests.helpers.processes` (``scripts/bench`` puts the repository root on
``sys.path``). A benchmark builds everything inside one :class:`Workspace`::

    with Workspace() as ws:
        server = ws.start_server()                  # credo-server run, waits until it serves
        admin = server.admin_channel()              # insecure gRPC over the admin Unix socket
        agent = ws.start_agent(server)              # credo-agent run, joined with a fresh token
        ...
    # every process stopped (SIGTERM, then SIGKILL) and the temp dir removed, even on error

Processes only listen on 127.0.0.1 and Unix sockets under the workspace. They are started
with ``PR_SET_PDEATHSIG`` so they die with the benchmark even if it is killed outright, and
SIGTERM/SIGINT/SIGHUP of the benchmark unwind through the ``with`` block.

:func:`report` prints the house format: a readable table, or with ``--json`` one JSON
object ``{"name": NAME, "metrics": {...}}`` on the last line.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import psutil

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from tests.helpers.processes import (
    AgentProcess,
    ManagedProcess,
    ServerProcess,
    join_token,
    start_agent,
    start_server,
    wait_for,
)
from tests.helpers.server import AttestedAgent, attest_with_join_token, make_csr

__all__ = [
    "TRUST_DOMAIN",
    "AgentProcess",
    "AttestedAgent",
    "ManagedProcess",
    "ServerProcess",
    "Workspace",
    "attest",
    "create_entries",
    "delete_entries",
    "entry_proto",
    "log",
    "make_csr",
    "percentile",
    "report",
    "rss_mb",
    "wait_for",
]

TRUST_DOMAIN = "example.org"
START_TIMEOUT = 60.0
SERVER_DEFAULTS: dict[str, Any] = {
    "trust_domain": TRUST_DOMAIN,
    "log_level": "warning",
    "attestation_rate_limit": 1000,
}


# --- statistics and output ------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def report(
    name: str,
    metrics: dict[str, float],
    targets: Iterable[tuple[str, str, float]],
    *,
    as_json: bool,
    notes: Iterable[str] = (),
) -> None:
    """Print ``metrics`` as a table (with a verdict per target) or as one JSON line.

    ``targets`` are ``(metric, op, bound)`` with ``op`` one of ``>=``, ``<=``, ``<``.
    """
    if as_json:
        print(json.dumps({"name": name, "metrics": metrics}), flush=True)
        return
    print(f"{'metric':<24} {'value':>14}")
    for key, value in metrics.items():
        print(f"{key:<24} {value:>14}")
    for key, op, bound in targets:
        value = metrics[key]
        ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
        print(f"target {key} {op} {bound}: {'met' if ok else 'NOT met'}")
    for note in notes:
        print(note)


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the table or the JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(process: psutil.Process) -> tuple[float, float]:
    """CPU seconds (user + system) so far of ``process`` and of its descendants now alive
    (the server's signing workers, the agent's accept process)."""
    times = process.cpu_times()
    children = 0.0
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            children += t.user + t.system
    return times.user + times.system, children


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB."""
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)


# --- processes ------------------------------------------------------------------------


class Workspace:
    """A temp dir (short path: Unix sockets) owning every process started in it.

    The processes are the test harness's (:mod:`tests.helpers.processes`), started with
    ``die_with_parent`` so they die with the benchmark even if it is killed outright.
    """

    def __init__(self, prefix: str = "credo-bench-") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self._processes: list[ManagedProcess] = []
        self._old_handlers: dict[int, Any] = {}

    def start_server(self, name: str = "server", **flags: Any) -> ServerProcess:
        """``credo-server run`` on ``<root>/<name>``, waited for until it serves."""
        settings = {**SERVER_DEFAULTS, **flags}
        server = start_server(
            self.root,
            data_dir=self.root / name,
            admin_socket=self.root / f"{name}-admin" / "api.sock",
            die_with_parent=True,
            **settings,
        )
        self.adopt(server)
        return server

    def start_agent(
        self,
        server: ServerProcess,
        name: str = "agent",
        *,
        new_session: bool = False,
        **flags: Any,
    ) -> AgentProcess:
        """``credo-agent run`` in ``<root>/<name>`` joined with a fresh token, until it serves
        (``new_session``: in a session of its own, as a service manager starts it)."""
        root = self.root / name
        root.mkdir()
        agent = start_agent(
            server,
            root,
            trust_domain=TRUST_DOMAIN,
            die_with_parent=True,
            timeout=START_TIMEOUT,
            new_session=new_session,
            **{"log_level": "info", **flags},
        )
        self.adopt(agent)
        return agent

    def adopt(self, process: ManagedProcess) -> None:
        """Stop ``process`` on exit too (for processes built and started by the caller)."""
        if process not in self._processes:
            self._processes.append(process)

    @staticmethod
    def _raise_exit(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def __enter__(self) -> Workspace:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._raise_exit)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            # agents first, so they do not spin reconnecting to a stopped server
            for process in reversed(self._processes):
                with contextlib.suppress(Exception):
                    process.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)


# --- admin API ------------------------------------------------------------------------


def entry_proto(spiffe_id: str, parent_id: str, selectors: Iterable[str]) -> Any:
    """A ``types_pb2.RegistrationEntry`` from ``type:value`` selector strings."""
    return types_pb2.RegistrationEntry(
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=[
            types_pb2.Selector(type=s.split(":", 1)[0], value=s.split(":", 1)[1]) for s in selectors
        ],
    )


def create_entries(channel: grpc.Channel, entries: Sequence[Any], batch: int = 500) -> list[str]:
    """Create ``entries`` through ``Entries.BatchCreateEntry`` in batches; their new ids."""
    stub = admin_pb2_grpc.EntriesStub(channel)
    ids: list[str] = []
    for start in range(0, len(entries), batch):
        response = stub.BatchCreateEntry(
            admin_pb2.BatchCreateEntryRequest(entries=entries[start : start + batch]), timeout=120
        )
        ids.extend(e.id for e in response.entries)
    return ids


def delete_entries(channel: grpc.Channel, ids: Sequence[str], batch: int = 500) -> None:
    stub = admin_pb2_grpc.EntriesStub(channel)
    for start in range(0, len(ids), batch):
        stub.BatchDeleteEntry(
            admin_pb2.BatchDeleteEntryRequest(ids=ids[start : start + batch]), timeout=120
        )


# --- an agent's side of the agent endpoint ----------------------------------------------


def attest(server: ServerProcess) -> AttestedAgent:
    """Node-attest with a fresh join token over TLS (no client certificate), as agents do."""
    with server.admin_channel() as admin:
        bundle = admin_pb2_grpc.BundlesStub(admin).GetBundle(
            admin_pb2.GetBundleAdminRequest(), timeout=10
        )
    return attest_with_join_token(server.agent_target, bundle, join_token(server), timeout=30)
