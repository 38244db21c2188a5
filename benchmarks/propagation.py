"""Benchmark: time from an entry created (deleted) on the server to the change on a
workload's open ``FetchX509SVID`` stream.

Run: ``./scripts/bench propagation [--json] [--changes N]``.

A real ``credo-server run`` and a real ``credo-agent run`` (joined with a fresh token,
``--trust-bundle`` from ``credo-server bundle show --format pem``). This process is the
workload: it holds one ``FetchX509SVID`` stream open on the agent's socket (raw gRPC with
``workload.spiffe.io: true``; a reader thread notes the SPIFFE IDs of every message and when
it arrived). A first entry for ``unix:uid:<our uid>`` keeps the stream alive. Then:

* ``create_p50_s`` / ``create_p99_s`` — ``--changes`` (200) times, one after the other:
  create an entry ``unix:uid:<uid>`` with a new SPIFFE ID through ``Entries.BatchCreateEntry``
  on the admin socket, and time from just before the call until a message on the stream
  carries that SPIFFE ID. The path: datastore event -> server's entry feed -> agent's
  ``SyncEntries`` stream -> agent signs an SVID (``BatchNewX509SVID``) -> push to the stream.
  The workload's set grows to ``--changes`` + 1 SVIDs; every push carries the full set.
* ``delete_p50_s`` / ``delete_p99_s`` — then delete those entries one at a time
  (``BatchDeleteEntry``) and time until a message no longer carries the SPIFFE ID.

Percentiles are nearest-rank. The target is p99 < 1 s for both (SPIRE's agent polls every 5 s).

With ``--json`` the last line is one JSON object: ``{"name": "propagation", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

import grpc
from _common import (
    TRUST_DOMAIN,
    Workspace,
    create_entries,
    delete_entries,
    entry_proto,
    log,
    percentile,
    report,
)

from credo._proto import workload_pb2, workload_pb2_grpc

TARGETS = [("create_p99_s", "<", 1.0), ("delete_p99_s", "<", 1.0)]
CHANGE_TIMEOUT = 15.0
HEADER = (("workload.spiffe.io", "true"),)


class StreamWatcher:
    """Reads an open FetchX509SVID stream in a thread; waits for a condition on the ID set."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self._stream: Any = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER
        )
        self._cond = threading.Condition()
        self.ids: frozenset[str] = frozenset()
        self.messages = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name="stream-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._stream:
                ids = frozenset(s.spiffe_id for s in response.svids)
                with self._cond:
                    self.ids = ids
                    self.messages += 1
                    self._cond.notify_all()
        except BaseException as err:
            with self._cond:
                self.error = err
                self._cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float, what: str) -> float:
        """Block until ``predicate(ids)``; return the perf_counter time it became true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.ids):
                if self.error is not None:
                    if isinstance(self.error, grpc.RpcError) and (
                        self.error.code() == grpc.StatusCode.CANCELLED
                    ):
                        raise RuntimeError(f"stream cancelled while waiting for {what}")
                    raise RuntimeError(f"stream failed while waiting for {what}: {self.error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} did not reach the stream within {timeout}s")
                self._cond.wait(left)
            return time.perf_counter()

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(5)
        self._channel.close()


def _open_stream(target: str, spiffe_id: str, timeout: float = 30.0) -> StreamWatcher:
    """A watcher whose stream carries ``spiffe_id``; retried while the agent has no
    identity for us yet (the first entry may not have reached it: PermissionDenied)."""
    deadline = time.monotonic() + timeout
    while True:
        watcher = StreamWatcher(target)
        try:
            watcher.wait_for(lambda ids: spiffe_id in ids, timeout, "the first SVID")
            return watcher
        except RuntimeError:
            watcher.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run(changes: int) -> dict[str, float]:
    uid = os.geteuid()
    selector = f"unix:uid:{uid}"
    with Workspace() as ws:
        server = ws.start_server()
        agent = ws.start_agent(server)
        log(f"agent {agent.spiffe_id} serving on {agent.socket}")
        with server.admin_channel() as admin:
            base = f"spiffe://{TRUST_DOMAIN}/bench/base"
            create_entries(admin, [entry_proto(base, agent.spiffe_id, [selector])])
            watcher = _open_stream(agent.endpoint, base)
            try:
                # warm-up change (not counted): connections, code paths, caches
                warm = f"spiffe://{TRUST_DOMAIN}/bench/warm"
                (warm_id,) = create_entries(admin, [entry_proto(warm, agent.spiffe_id, [selector])])
                watcher.wait_for(lambda ids: warm in ids, CHANGE_TIMEOUT, "the warm-up entry")
                delete_entries(admin, [warm_id])
                watcher.wait_for(lambda ids: warm not in ids, CHANGE_TIMEOUT, "the warm-up delete")

                log(f"{changes} creates, one at a time")
                created: list[tuple[str, str]] = []
                create_lat: list[float] = []
                for i in range(changes):
                    spiffe_id = f"spiffe://{TRUST_DOMAIN}/bench/change-{i}"
                    proto = entry_proto(spiffe_id, agent.spiffe_id, [selector])
                    started = time.perf_counter()
                    (entry_id,) = create_entries(admin, [proto])
                    seen = watcher.wait_for(
                        lambda ids, s=spiffe_id: s in ids, CHANGE_TIMEOUT, f"entry {spiffe_id}"
                    )
                    create_lat.append(seen - started)
                    created.append((entry_id, spiffe_id))

                log(f"{changes} deletes, one at a time")
                delete_lat: list[float] = []
                for entry_id, spiffe_id in created:
                    started = time.perf_counter()
                    delete_entries(admin, [entry_id])
                    seen = watcher.wait_for(
                        lambda ids, s=spiffe_id: s not in ids,
                        CHANGE_TIMEOUT,
                        f"deletion of {spiffe_id}",
                    )
                    delete_lat.append(seen - started)
                messages = watcher.messages
            finally:
                watcher.close()
        agent.check_alive()
    return {
        "create_p50_s": round(percentile(create_lat, 50), 4),
        "create_p99_s": round(percentile(create_lat, 99), 4),
        "create_max_s": round(max(create_lat), 4),
        "delete_p50_s": round(percentile(delete_lat, 50), 4),
        "delete_p99_s": round(percentile(delete_lat, 99), 4),
        "delete_max_s": round(max(delete_lat), 4),
        "changes": changes,
        "stream_messages": messages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--changes", type=int, default=200, help="creates, then as many deletes")
    args = parser.parse_args()
    if not 1 <= args.changes <= 2000:
        sys.exit("propagation: need 1 <= --changes <= 2000")
    metrics = run(args.changes)
    report("propagation", metrics, TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
