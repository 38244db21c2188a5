"""Benchmark: time from a CA rotation in trust domain B to B's new bundle on a workload's
open ``FetchX509SVID`` stream in trust domain A.

Run: ``./scripts/bench federation [--json] [--rotations N]``.

Two real ``credo-server run`` processes, A (``example.org``) and B (``b.test``), each with
its HTTP front end; B's ``bundle_refresh_hint`` is 2 s. A federates with B
(``credo-server federation create ... --bundle-endpoint-profile https_spiffe`` with B's
first bundle); a ``credo-agent`` of A serves this process an entry that
``federates_with`` B, and a reader thread follows the ``federated_bundles["spiffe://b.test"]``
field of an open ``FetchX509SVID`` stream. Then ``--rotations`` (20) times: B prepares a
new X.509 CA (``LocalAuthority.PrepareAuthority``, which publishes it in B's bundle) and
we time until a stream message carries it; then B activates it and revokes the old one.
The path: B's bundle -> A's refresher (every spiffe_refresh_hint) -> A's datastore ->
change feed -> A's agent ``SyncEntries`` -> Workload API stream.

``rotation_p50_s`` / ``rotation_p99_s`` (nearest-rank); target p99 < 3 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from _common import TRUST_DOMAIN, Workspace, log, percentile, report

from credo._proto import workload_pb2, workload_pb2_grpc
from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc
from credo.bundle import split_der

TARGETS = [("rotation_p99_s", "<", 3.0)]
B = "b.test"
B_KEY = f"spiffe://{B}"
HEADER = (("workload.spiffe.io", "true"),)
TIMEOUT = 30.0


class FederatedBundleWatcher:
    """Follows the CA certificates of B in the stream's federated_bundles."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stream: Any = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER
        )
        self._cond = threading.Condition()
        self.cas: frozenset[bytes] = frozenset()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._stream:
                der = response.federated_bundles.get(B_KEY, b"")
                with self._cond:
                    self.cas = frozenset(split_der(der)) if der else frozenset()
                    self._cond.notify_all()
        except BaseException as err:
            with self._cond:
                self.error = err
                self._cond.notify_all()

    def wait_for(self, predicate: Any, what: str) -> float:
        deadline = time.monotonic() + TIMEOUT
        with self._cond:
            while not predicate(self.cas):
                if self.error is not None:
                    raise RuntimeError(f"stream failed while waiting for {what}: {self.error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} did not reach the stream within {TIMEOUT}s")
                self._cond.wait(left)
            return time.perf_counter()

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(5)
        self._channel.close()


def _cli(server: Any, *args: str) -> Any:
    return server.cli_json(*args)


def run(rotations: int) -> dict[str, float]:
    uid = os.geteuid()
    with Workspace() as ws:
        server_b = ws.start_server(
            "b", trust_domain=B, bundle_refresh_hint="2s", http_bind_address="127.0.0.1:0"
        )
        server_a = ws.start_server("a", http_bind_address="127.0.0.1:0")
        agent = ws.start_agent(server_a)
        first = Path(ws.root) / "b-bundle.json"
        shown = server_b.cli("bundle", "show", "--format", "spiffe", output=None)
        first.write_text(shown.stdout)
        _cli(
            server_a,
            "federation",
            "create",
            "--trust-domain",
            B,
            "--bundle-endpoint-url",
            f"{server_b.http_url}/bundle",
            "--endpoint-spiffe-id",
            f"spiffe://{B}/credo/server",
            "--trust-domain-bundle",
            str(first),
        )
        _cli(
            server_a,
            "entry",
            "create",
            "--parent-id",
            agent.spiffe_id,
            "--spiffe-id",
            f"spiffe://{TRUST_DOMAIN}/bench/federated",
            "--selector",
            f"unix:uid:{uid}",
            "--federates-with",
            B,
        )
        watcher: FederatedBundleWatcher | None = None
        deadline = time.monotonic() + TIMEOUT
        while watcher is None:
            candidate = FederatedBundleWatcher(agent.endpoint)
            try:
                candidate.wait_for(bool, "B's first bundle")
                watcher = candidate
            except RuntimeError:
                candidate.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        latencies: list[float] = []
        try:
            with server_b.admin_channel() as channel:
                authorities = admin_pb2_grpc.LocalAuthorityStub(channel)
                log(f"{rotations} CA rotations in {B}")
                for i in range(rotations):
                    before = watcher.cas
                    started = time.perf_counter()
                    prepared = authorities.PrepareAuthority(
                        admin_pb2.AuthorityRequest(kind="x509"), timeout=30
                    )
                    seen = watcher.wait_for(
                        lambda cas, b=before: bool(cas - b), f"rotation {i}'s new CA"
                    )
                    latencies.append(seen - started)
                    state = authorities.GetAuthorityState(
                        admin_pb2.AuthorityRequest(kind="x509"), timeout=30
                    )
                    old = state.active.authority_id
                    authorities.ActivateAuthority(
                        admin_pb2.AuthorityRequest(kind="x509", authority_id=prepared.authority_id),
                        timeout=30,
                    )
                    for step in (authorities.TaintAuthority, authorities.RevokeAuthority):
                        step(admin_pb2.AuthorityRequest(kind="x509", authority_id=old), timeout=30)
        finally:
            watcher.close()
        agent.check_alive()
    return {
        "rotation_p50_s": round(percentile(latencies, 50), 4),
        "rotation_p99_s": round(percentile(latencies, 99), 4),
        "rotation_max_s": round(max(latencies), 4),
        "rotations": rotations,
        "refresh_hint_s": 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--rotations", type=int, default=20)
    args = parser.parse_args()
    if not 1 <= args.rotations <= 200:
        sys.exit("federation: need 1 <= --rotations <= 200")
    report("federation", run(args.rotations), TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
