"""The entry-sync soak scenario (issue 8 §1), shared by the slow integration test and
``./scripts/bench soak``.

A real ``credo-server run`` on a fixed port (so that it can be restarted under the agent)
with a short agent SVID TTL, and a real ``credo-agent run`` with the default reconnect
backoff. This process is the workload: it holds one ``FetchX509SVID`` stream open on the
agent's socket (:class:`WorkloadStream`). Then, ``changes`` times, ``gap`` seconds apart
(long enough for agent SVID renewals and sync reconnects to happen between changes):

* a change: create an entry for ``unix:uid:<our uid>`` (every third change deletes the
  oldest entry still present instead), and wait until the workload's stream shows it;
  a change not shown within ``deadline`` seconds is *missed* (the scenario goes on);
* after every third change the server is restarted, alternately stopped with SIGTERM
  and killed with SIGKILL; after every fifth its X.509 CA is prepared, and activated
  once the new CA is in the workload's trust bundle (that is one more change, missed if
  it does not arrive in time: an agent that never saw the prepared CA cannot verify the
  server after the activation).

Before the fix of issue 8 the agent's sync task died silently at a channel replacement
(agent SVID renewal, bundle change) and changes stopped reaching workloads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from credo._proto import workload_pb2, workload_pb2_grpc
from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    free_port,
    start_agent,
    start_server,
)

__all__ = ["SoakResult", "WorkloadStream", "run_soak"]

TRUST_DOMAIN = "example.org"
_HEADER = (("workload.spiffe.io", "true"),)


class WorkloadStream:
    """A workload's ``FetchX509SVID`` stream on ``target``, read in a thread, reopened when
    it breaks (the agent restarting a stream is allowed; losing a change is not)."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._cond = threading.Condition()
        self._closed = False
        self.ids: frozenset[str] = frozenset()
        self.bundle = b""
        """The trust bundle of the latest message (DER certificates, concatenated)."""
        self.messages = 0
        self.reopened = 0
        self._call: Any = None
        self._thread = threading.Thread(target=self._read, name="workload-stream", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with grpc.insecure_channel(self._target) as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            while not self._closed:
                call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=_HEADER)
                self._call = call
                try:
                    for response in call:
                        with self._cond:
                            self.ids = frozenset(s.spiffe_id for s in response.svids)
                            self.bundle = response.svids[0].bundle if response.svids else b""
                            self.messages += 1
                            self._cond.notify_all()
                except grpc.RpcError:
                    pass
                if self._closed:
                    return
                self.reopened += 1
                time.sleep(0.2)  # no identity yet (PermissionDenied) or the agent restarting

    def wait_for(self, predicate: Callable[[WorkloadStream], bool], timeout: float) -> bool:
        """Whether ``predicate(self)`` becomes true within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        self._thread.join(5)


def _bundle_ders(pem: str) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem.encode())]


@dataclass
class SoakResult:
    """What the scenario saw; ``missed`` names each change that did not arrive in time."""

    changes: int = 0
    missed: list[str] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    restarts: int = 0
    down_seconds: list[float] = field(default_factory=list)
    """Per restart, from stopping the server until the new one served."""
    activations: int = 0
    server: ServerProcess | None = None
    agent: AgentProcess | None = None

    @property
    def max_delay_s(self) -> float:
        return max(self.delays, default=0.0)

    @property
    def max_down_s(self) -> float:
        return max(self.down_seconds, default=0.0)


def run_soak(
    root: Path,
    *,
    changes: int,
    gap: float,
    deadline: float = 15.0,
    agent_svid_ttl: int = 20,
    progress: Callable[[str], None] = lambda message: None,
    die_with_parent: bool = False,
    server_flags: dict[str, Any] | None = None,
) -> SoakResult:
    """Run the scenario (see the module doc) in ``root``; the processes are stopped on
    return, their logs stay in ``root`` (``result.server.logs``, ``result.agent.logs``)."""
    result = SoakResult()
    selector = f"unix:uid:{os.getuid()}"
    server = start_server(
        root,
        trust_domain=TRUST_DOMAIN,
        bind_address=f"127.0.0.1:{free_port()}",
        agent_svid_ttl=f"{agent_svid_ttl}s",
        log_level="debug",
        die_with_parent=die_with_parent,
        **(server_flags or {}),
    )
    result.server = server
    agent_root = root / "agent"
    agent_root.mkdir()
    stream: WorkloadStream | None = None
    try:
        # The reconnect backoff a user gets (the harness lowers it for other tests).
        agent = start_agent(
            server,
            agent_root,
            trust_domain=TRUST_DOMAIN,
            die_with_parent=die_with_parent,
            sync_backoff_max=30,
            log_level="debug",
        )
        result.agent = agent
        parent = agent.spiffe_id
        base = f"spiffe://{TRUST_DOMAIN}/soak/base"
        create_entry(server, parent, base, selector)
        stream = WorkloadStream(agent.endpoint)
        if not stream.wait_for(lambda s: base in s.ids, 60):
            raise AssertionError(f"the workload never got its first SVID; agent log:\n{agent.logs}")
        present: list[tuple[str, str]] = []  # (entry id, SPIFFE ID), oldest first
        for n in range(1, changes + 1):
            started = time.monotonic()
            if n % 3 == 0 and present:
                entry_id, spiffe_id = present.pop(0)
                server.cli_json("entry", "delete", "--id", entry_id)
                what = f"change {n}: delete {spiffe_id}"
                arrived = stream.wait_for(lambda s, i=spiffe_id: i not in s.ids, deadline)
            else:
                spiffe_id = f"spiffe://{TRUST_DOMAIN}/soak/change-{n}"
                present.append((create_entry(server, parent, spiffe_id, selector), spiffe_id))
                what = f"change {n}: create {spiffe_id}"
                arrived = stream.wait_for(lambda s, i=spiffe_id: i in s.ids, deadline)
            result.changes += 1
            if arrived:
                result.delays.append(time.monotonic() - started)
                progress(f"{what}: arrived in {result.delays[-1]:.2f}s")
            else:
                result.missed.append(what)
                progress(f"{what}: MISSED (not on the workload's stream within {deadline:g}s)")
            if n % 3 == 0:
                stopped = time.monotonic()
                if result.restarts % 2 == 0:
                    server.stop()
                else:
                    server.kill()
                result.restarts += 1
                server.start()
                result.down_seconds.append(time.monotonic() - stopped)
                progress(
                    f"server restarted ({'SIGTERM' if result.restarts % 2 else 'SIGKILL'}; "
                    f"down {result.down_seconds[-1]:.1f}s)"
                )
            if n % 5 == 0:
                # As an operator would (and as the server does by itself at half-life):
                # prepare, let the new CA reach the agents, then activate. The new CA
                # reaching the workload's bundle is a change like any other.
                started = time.monotonic()
                authority = server.cli_json("localauthority", "x509", "prepare")["authority_id"]
                authorities = _bundle_ders(server.bundle_pem())
                what = f"after change {n}: prepared X.509 CA {authority[:12]}... in the bundle"
                if stream.wait_for(
                    lambda s, a=authorities: all(d in s.bundle for d in a), deadline
                ):
                    result.delays.append(time.monotonic() - started)
                    progress(f"{what}: arrived in {result.delays[-1]:.2f}s")
                else:
                    result.missed.append(what)
                    progress(f"{what}: MISSED (not in the workload's bundle within {deadline:g}s)")
                result.changes += 1
                server.cli_json("localauthority", "x509", "activate", "--authority-id", authority)
                result.activations += 1
                progress("X.509 CA activated")
            if n < changes:
                # The point of the scenario: time passes (agent SVID renewals, reconnects).
                time.sleep(max(0.0, gap - (time.monotonic() - started)))
        agent.check_alive()
    finally:
        if stream is not None:
            stream.close()
        if result.agent is not None:
            result.agent.stop()
        server.close()
    return result
