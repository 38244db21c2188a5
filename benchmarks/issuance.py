"""Benchmark: X.509-SVIDs signed per second through the agent endpoint of a running server,
against credo's raw build+sign rate in the same run.

Run: ``./scripts/bench issuance [--json] [--batches N] [--concurrency N]``.

* ``svids_per_s`` — a real ``credo-server run`` (SQLite, 127.0.0.1); this process attests as
  an agent with a join token (``AttestAgent`` over TLS), creates 500 entries parented to
  that agent, then calls ``BatchNewX509SVID`` over mTLS with its agent SVID, 500 (entry,
  CSR) pairs a call, ``--batches`` calls (40) from ``--concurrency`` (1) callers back to
  back. Each result's status is checked. The CSRs (a client-side signature each) are built
  before the clock starts; what is timed is the round trip: TLS, gRPC, CSR parse and
  signature check, authorization, template, signature, response.
* ``build_sign_per_s`` — :func:`credo.x509svid.sign_x509_svid` (pyca/cryptography's
  ``CertificateBuilder``) with a P-256 CA in this process, the reference the target was set
  against. With one caller, each timed call is followed by 500 such signatures timed here,
  so both rates see the same machine load; with ``--concurrency`` > 1, ``--raw-seconds``
  before and after the calls.
* ``template_sign_per_s`` — the same, timed the same way, through the server's own per-SVID
  path (:func:`server.ca.ca.build_workload_svid`, the per-CA template of
  :mod:`server.ca.tbs`, given a CSR's key and SubjectPublicKeyInfo as the server is), which
  is what ``svid_sign`` measures.
* ``ratio`` — ``svids_per_s / build_sign_per_s``; the target is >= 0.5.
* ``server_cpu_ms_per_svid`` and ``workers_cpu_ms_per_svid`` — CPU time (user + system,
  psutil ``cpu_times``) of the server's main process and of its signing workers over the
  timed calls, per SVID; ``build_sign_cpu_ms`` is the CPU time of one raw build+sign here.
  These do not depend on what else the machine is running (the wall rates do), and
  ``cpu_ratio`` — ``2 * build_sign_cpu_ms / (server + workers)`` — is the ratio the server
  would reach with both cores to itself (a lower bound: it ignores the client's share).
  ``ratio_template`` is ``svids_per_s / template_sign_per_s`` (no target: the server also
  checks each CSR's signature, which costs more than the template signature itself).

The client runs on the same machine as the server (2 cores here), so it takes some of the
CPU the server could use; the client's share is small (decode 500 certificates per call).

With ``--json`` the last line is one JSON object: ``{"name": "issuance", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import psutil
from _common import (
    TRUST_DOMAIN,
    Workspace,
    attest,
    cpu_seconds,
    create_entries,
    entry_proto,
    log,
    make_csr,
    report,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from credo import SpiffeId, TrustDomain, ca_certificate_template, generate_private_key
from credo._proto.credo.server.v1 import agent_pb2, agent_pb2_grpc
from credo.x509svid import sign_x509_svid
from server.ca.ca import X509CA, build_workload_svid
from server.ca.tbs import request_key_info

BATCH = 500
TARGETS = [("ratio", ">=", 0.5)]


class BuildSign:
    """In-process signing of leaf X509-SVIDs with a P-256 CA, timed in bursts: credo's
    builder path (``sign_x509_svid``) and the server's template path, one after the other."""

    def __init__(self) -> None:
        now = datetime.now(UTC)
        self.td = TrustDomain(TRUST_DOMAIN)
        self.ca_key = generate_private_key()
        self.ca_cert = ca_certificate_template(
            self.td, self.ca_key.public_key(), not_before=now, not_after=now + timedelta(days=1)
        ).sign(self.ca_key, hashes.SHA256())
        self.ca = X509CA("bench", self.ca_cert, self.ca_key)
        self.spiffe_id = SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/bench/workload")
        self.public_key = generate_private_key().public_key()
        self.csr = make_csr(generate_private_key())
        self.csr_key = x509.load_der_x509_csr(self.csr).public_key()
        self.count = 0
        self.spent = [0.0, 0.0]  # builder, template
        self.cpu = 0.0  # builder, CPU seconds
        self.burst(50)
        self.count, self.spent, self.cpu = 0, [0.0, 0.0], 0.0

    def burst(self, n: int) -> None:
        ttl = timedelta(hours=1)
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            sign_x509_svid(
                self.spiffe_id, self.public_key, ca_cert=self.ca_cert, ca_key=self.ca_key, ttl=ttl
            )
        middle = time.perf_counter()
        self.cpu += time.process_time() - cpu
        signer = self.ca.leaf_signer
        for _ in range(n):
            build_workload_svid(
                self.td,
                signer,
                self.spiffe_id,
                self.csr_key,
                3600,
                (),
                datetime.now(UTC),
                request_key_info(self.csr),
            )
        self.spent[0] += middle - started
        self.spent[1] += time.perf_counter() - middle
        self.count += n

    def seconds(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            self.burst(100)

    @property
    def rate(self) -> float:
        return self.count / self.spent[0]

    @property
    def cpu_ms(self) -> float:
        return self.cpu / self.count * 1000

    @property
    def template_rate(self) -> float:
        return self.count / self.spent[1]


def run(batches: int, concurrency: int, raw_seconds: float) -> dict[str, float]:
    raw = BuildSign()
    if concurrency > 1:
        raw.seconds(raw_seconds)
    with Workspace() as ws:
        server = ws.start_server(signing_rate_limit=10_000)
        agent = attest(server)
        log(f"attested as {agent.agent_id}")
        with server.admin_channel() as admin:
            entry_ids = create_entries(
                admin,
                [
                    entry_proto(f"spiffe://{TRUST_DOMAIN}/bench/svid-{i}", agent.agent_id,
                                [f"unix:uid:{i}"])
                    for i in range(BATCH)
                ],
            )  # fmt: skip
        log(f"building {BATCH} CSRs (not timed)")
        request = agent_pb2.BatchNewX509SVIDRequest(
            params=[agent_pb2.NewX509SVIDParams(entry_id=e, csr=make_csr()) for e in entry_ids]
        )
        channel = agent.channel()
        try:
            stub = agent_pb2_grpc.AgentStub(channel)
            errors: list[BaseException] = []

            def call(n: int) -> None:
                try:
                    for _ in range(n):
                        response = stub.BatchNewX509SVID(request, timeout=120)
                        bad = [r for r in response.results if r.status.code != 0]
                        if bad or len(response.results) != BATCH:
                            raise RuntimeError(
                                f"{len(bad)} refused of {len(response.results)}: "
                                f"{bad[0].status.message if bad else 'missing results'}"
                            )
                except BaseException as err:  # reported by the main thread
                    errors.append(err)

            call(1)  # warm up: connection, entry cache catch-up
            if errors:
                raise errors[0]
            server_process = psutil.Process(server.pid)
            cpu_before = cpu_seconds(server_process)
            log(f"timing {batches} calls of {BATCH} CSRs, {concurrency} caller(s)")
            shares = [batches // concurrency + (i < batches % concurrency)
                      for i in range(concurrency)]  # fmt: skip
            if concurrency == 1:
                # alternate: one call, then 500 raw build+signs here, so both see the same load
                elapsed = 0.0
                for _ in range(batches):
                    started = time.perf_counter()
                    call(1)
                    elapsed += time.perf_counter() - started
                    if errors:
                        break
                    raw.burst(BATCH)
            else:
                threads = [threading.Thread(target=call, args=(n,)) for n in shares]
                started = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.perf_counter() - started
            cpu_after = cpu_seconds(server_process)
            if errors:
                raise errors[0]
        finally:
            channel.close()
    if concurrency > 1:
        raw.seconds(raw_seconds)
    svids_per_s = batches * BATCH / elapsed
    server_ms, workers_ms = (
        (after - before) / (batches * BATCH) * 1000
        for before, after in zip(cpu_before, cpu_after, strict=True)
    )
    return {
        "svids_per_s": round(svids_per_s, 1),
        "build_sign_per_s": round(raw.rate, 1),
        "template_sign_per_s": round(raw.template_rate, 1),
        "ratio": round(svids_per_s / raw.rate, 3),
        "ratio_template": round(svids_per_s / raw.template_rate, 3),
        "batch_s": round(elapsed / batches * concurrency, 3),
        "server_cpu_ms_per_svid": round(server_ms, 4),
        "workers_cpu_ms_per_svid": round(workers_ms, 4),
        "build_sign_cpu_ms": round(raw.cpu_ms, 4),
        "cpu_ratio": round(2 * raw.cpu_ms / (server_ms + workers_ms), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--batches", type=int, default=40, help="timed calls of 500 CSRs")
    parser.add_argument("--concurrency", type=int, default=1, help="callers at once")
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="build+sign timing, each")
    args = parser.parse_args()
    if args.batches < 1 or not 1 <= args.concurrency <= args.batches:
        sys.exit("issuance: need --batches >= 1 and 1 <= --concurrency <= --batches")
    metrics = run(args.batches, args.concurrency, args.raw_seconds)
    report("issuance", metrics, TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
