"""Benchmark: time from ``entry revoke`` on the server to the revocation reaching a
workload: its open ``FetchX509SVID`` stream, and the agent's ``ValidateJWTSVID``.

Run: ``./scripts/bench revocation [--json] [--revocations N]``.

A real ``credo-server run`` and a real ``credo-agent run``; this process is the workload,
holding one ``FetchX509SVID`` stream open on the agent's socket (raw gRPC; a reader thread
notes, for every message, the SVIDs' SPIFFE IDs and serials, the serials its ``crl`` field
revokes, and when it arrived). A first entry keeps the stream alive. Then ``--revocations``
(100) times, one after the other: create an entry for ``unix:uid:<our uid>`` and wait until
its SVID is on the stream (not timed), then revoke it with ``Entries.RevokeEntry`` on the
admin socket (what ``credo-server entry revoke`` calls), and time from just before the call:

* ``svid_p50_s`` / ``svid_p99_s`` — until a message no longer carries the entry's SVID (the
  path: datastore event -> the server's entry feed -> the agent's sync stream (entry no
  longer authorized) -> the agent drops the SVID -> push);
* ``crl_p50_s`` / ``crl_p99_s`` — until a message's ``crl`` revokes the SVID's serial (the
  path: ``x509_svids_revoked`` event -> the server's CRL signer re-signs the authority's
  CRL -> ``crl_updated`` -> every agent's sync stream -> push);
* ``jwt_p50_s`` / ``jwt_p99_s`` — until the agent's ``ValidateJWTSVID`` refuses a JWT-SVID
  fetched for the entry before the revocation (the path: ``jwt_svids_revoked`` event ->
  every agent's sync stream carries the revoked ``jti``s). It is polled (every 2 ms) only
  once the two stream conditions hold, so it is an upper bound: at least the larger of
  the two others.

Percentiles are nearest-rank. The target is p99 < 1 s for each.

With ``--json`` the last line is one JSON object: ``{"name": "revocation", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
from _common import (
    TRUST_DOMAIN,
    Workspace,
    create_entries,
    entry_proto,
    log,
    percentile,
    report,
)
from cryptography import x509

from credo._proto import workload_pb2, workload_pb2_grpc
from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc

TARGETS = [("svid_p99_s", "<", 1.0), ("crl_p99_s", "<", 1.0), ("jwt_p99_s", "<", 1.0)]
CHANGE_TIMEOUT = 15.0
HEADER = (("workload.spiffe.io", "true"),)


@dataclass(frozen=True)
class Seen:
    """What the last stream message carried."""

    serials: dict[str, int]
    """SPIFFE ID -> leaf serial."""
    revoked: frozenset[int]
    """Serials the message's CRLs revoke."""


class StreamWatcher:
    """Reads an open FetchX509SVID stream in a thread; waits for a condition on it."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stream: Any = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER
        )
        self._cond = threading.Condition()
        self.seen = Seen({}, frozenset())
        self.messages = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name="stream-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        crl_cache: dict[bytes, frozenset[int]] = {}
        try:
            for response in self._stream:
                serials = {
                    s.spiffe_id: x509.load_der_x509_certificate(
                        _leaf_der(s.x509_svid)
                    ).serial_number
                    for s in response.svids
                }
                revoked: set[int] = set()
                for der in response.crl:
                    if der not in crl_cache:
                        crl_cache[der] = frozenset(
                            r.serial_number for r in x509.load_der_x509_crl(der)
                        )
                    revoked |= crl_cache[der]
                with self._cond:
                    self.seen = Seen(serials, frozenset(revoked))
                    self.messages += 1
                    self._cond.notify_all()
        except BaseException as err:
            with self._cond:
                self.error = err
                self._cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float, what: str) -> float:
        """Block until ``predicate(seen)``; return the perf_counter time it became true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.seen):
                if self.error is not None:
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


def _leaf_der(chain: bytes) -> bytes:
    """The first certificate of a concatenated DER chain (SEQUENCE with a long-form length)."""
    if chain[1] < 0x80:
        return chain[: 2 + chain[1]]
    n = chain[1] & 0x7F
    return chain[: 2 + n + int.from_bytes(chain[2 : 2 + n], "big")]


def _fetch_jwt(stub: Any, spiffe_id: str) -> str:
    reply = stub.FetchJWTSVID(
        workload_pb2.JWTSVIDRequest(audience=["bench"], spiffe_id=spiffe_id),
        metadata=HEADER,
        timeout=30,
    )
    return str(reply.svids[0].svid)


def _refused(stub: Any, token: str) -> bool:
    try:
        stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="bench", svid=token),
            metadata=HEADER,
            timeout=30,
        )
    except grpc.RpcError as err:
        if "revoked" not in str(err.details()):
            raise
        return True
    return False


def _serial(der: bytes) -> int:
    return int(x509.load_der_x509_certificate(der).serial_number)


def _open_stream(target: str, spiffe_id: str, timeout: float = 30.0) -> StreamWatcher:
    """A watcher whose stream carries ``spiffe_id`` (retried while we have no identity yet)."""
    deadline = time.monotonic() + timeout
    while True:
        watcher = StreamWatcher(target)
        try:
            watcher.wait_for(lambda s: spiffe_id in s.serials, timeout, "the first SVID")
            return watcher
        except RuntimeError:
            watcher.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run(revocations: int) -> dict[str, float]:
    selector = f"unix:uid:{os.geteuid()}"
    with Workspace() as ws:
        server = ws.start_server()
        agent = ws.start_agent(server)
        log(f"agent {agent.spiffe_id} serving on {agent.socket}")
        with server.admin_channel() as admin:
            entries = admin_pb2_grpc.EntriesStub(admin)
            base = f"spiffe://{TRUST_DOMAIN}/bench/base"
            create_entries(admin, [entry_proto(base, agent.spiffe_id, [selector])])
            watcher = _open_stream(agent.endpoint, base)
            workload = grpc.insecure_channel(agent.endpoint)
            api = workload_pb2_grpc.SpiffeWorkloadAPIStub(workload)
            svid_lat: list[float] = []
            crl_lat: list[float] = []
            jwt_lat: list[float] = []
            try:
                log(f"{revocations} entries created and revoked, one at a time")
                for i in range(-1, revocations):  # -1: a warm-up round, not counted
                    spiffe_id = f"spiffe://{TRUST_DOMAIN}/bench/revoked-{i}"
                    (entry_id,) = create_entries(
                        admin, [entry_proto(spiffe_id, agent.spiffe_id, [selector])]
                    )
                    watcher.wait_for(
                        lambda s, x=spiffe_id: x in s.serials, CHANGE_TIMEOUT, spiffe_id
                    )
                    serial = watcher.seen.serials[spiffe_id]
                    token = _fetch_jwt(api, spiffe_id)
                    if _refused(api, token):
                        raise RuntimeError("a fresh JWT-SVID was refused")
                    started = time.perf_counter()
                    entries.RevokeEntry(
                        admin_pb2.RevokeEntryRequest(id=entry_id, reason="benchmark"), timeout=30
                    )
                    gone = watcher.wait_for(
                        lambda s, x=spiffe_id: x not in s.serials,
                        CHANGE_TIMEOUT,
                        f"{spiffe_id} gone",
                    )
                    listed = watcher.wait_for(
                        lambda s, n=serial: n in s.revoked, CHANGE_TIMEOUT, f"serial {serial:x}"
                    )
                    deadline = time.monotonic() + CHANGE_TIMEOUT
                    while not _refused(api, token):
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"the JWT-SVID of {spiffe_id} was not refused")
                        time.sleep(0.002)
                    refused = time.perf_counter()
                    if i >= 0:
                        svid_lat.append(gone - started)
                        crl_lat.append(listed - started)
                        jwt_lat.append(refused - started)
                messages = watcher.messages
            finally:
                watcher.close()
                workload.close()
        agent.check_alive()
    return {
        "svid_p50_s": round(percentile(svid_lat, 50), 4),
        "svid_p99_s": round(percentile(svid_lat, 99), 4),
        "svid_max_s": round(max(svid_lat), 4),
        "crl_p50_s": round(percentile(crl_lat, 50), 4),
        "crl_p99_s": round(percentile(crl_lat, 99), 4),
        "crl_max_s": round(max(crl_lat), 4),
        "jwt_p50_s": round(percentile(jwt_lat, 50), 4),
        "jwt_p99_s": round(percentile(jwt_lat, 99), 4),
        "jwt_max_s": round(max(jwt_lat), 4),
        "revocations": revocations,
        "stream_messages": messages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--revocations", type=int, default=100, help="entries to revoke")
    args = parser.parse_args()
    if not 1 <= args.revocations <= 1000:
        sys.exit("revocation: need 1 <= --revocations <= 1000")
    metrics = run(args.revocations)
    report("revocation", metrics, TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
