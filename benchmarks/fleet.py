"""Benchmark: one signing server and a simulated fleet of N node agents.

Run: ``./scripts/bench fleet [--json] [--agents N] [--svids N] [--idle S] [--changes N]``.

One real ``credo-server run`` (127.0.0.1, SQLite in its data dir, or a fresh PostgreSQL
database at ``$CREDO_TEST_POSTGRES``, default ``postgresql://postgres@127.0.0.1:5432/postgres``)
and, in this process, N simulated agents (:mod:`tests.helpers.fleet`): each is the node
agent's own code — :class:`~node_agent.server_client.ServerClient`, the attestation session
with its own join token, the entry syncer holding its own mTLS ``SyncEntries`` stream, and
the SVID signer — without a Workload API. Each agent has ``--svids`` (10) entries of its own,
created before it attests. The metrics, in run order:

* ``attest_all_s`` — from the first attestation until all N agents have attested (at most
  32 at a time) and applied their first full entry set, each exactly its own entries;
* ``sign_all_s`` — every agent signs its ``--svids`` X509-SVIDs (N x svids, all at once);
* ``server_rss_mb_per_agent`` — (server RSS with all N connected and their SVIDs signed
  minus its RSS before the first agent) / N;
* ``server_cpu_idle_pct`` — server CPU (user + system, % of one core) over ``--idle`` (30) s
  with all N connected and nothing changing (heartbeats only);
* ``db_statements_per_s_idle`` — SQL statements the server's datastore sent over that same
  window, per second (the ``credo_datastore_statements_total`` counter: every statement
  executed, and the ``BEGIN``, ``COMMIT``, ``ROLLBACK`` and pool pre-pings the driver sends
  on its own; read from the server's metrics endpoint: each read costs the server one
  statement of its own, the agents gauge, which is included);
* ``entry_p99_s`` (and ``entry_p50_s``) — ``--changes`` (200) times, one after the other:
  an entry created for one agent (the next in a fixed random order) through
  ``Entries.BatchCreateEntry``, timed from before the call until that agent's sync stream
  has delivered it;
* ``bundle_p99_s`` — ``LocalAuthority.PrepareAuthority`` (a new X.509 CA, published in the
  bundle): timed from before the call until each agent's stream delivered a bundle with it;
  p99 over the agents;
* ``renewal_storm_s`` — every agent's SVIDs are due together (as when they all expire at
  once): all N agents sign all their SVIDs again at the same moment; until the last is back;
* ``renew_agents_s`` — every agent renews its own agent SVID (``RenewAgent``) at once, and
  its sync stream moves to the new mTLS channel (until all are synced again);
* over the whole run: ``call_retries`` (signing and renewal calls retried after the server
  did not answer in time), ``stream_reopens`` (sync streams lost or reopened, by reason in
  the log) and ``stream_opens`` (sync streams opened, the first ones included).

The default run measures N = ``--agents`` (1,000) on SQLite and reports the names above,
then the same on PostgreSQL (suffix ``_pg``) and N = ``--reference-agents`` (100) on SQLite
(suffix ``_100``), with ``--reference-idle`` (10) s idle windows for those two, and
``renew_agents_s`` measured only in the first (N agents renewing at once costs as much as
attesting them again: about a minute at N = 1,000 on PostgreSQL), so the whole run stays
under 5 minutes. ``--only`` ``sqlite`` or ``postgres`` runs one measurement.
Everything listens on 127.0.0.1 and Unix sockets; every process and agent is stopped on
exit, on error and on SIGINT/SIGTERM.

With ``--json`` the last line is one JSON object: ``{"name": "fleet", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import re
import resource
import secrets
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
from _common import TRUST_DOMAIN, Workspace, cpu_seconds, log, percentile, report, rss_mb

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc
from tests.helpers.fleet import Fleet, SimAgent, create_join_tokens, workload_entries
from tests.helpers.processes import free_port, write_server_bundle

TARGETS = [
    ("entry_p99_s", "<", 0.5),
    ("bundle_p99_s", "<", 5.0),
    ("server_rss_mb_per_agent", "<=", 0.5),
    ("db_statements_per_s_idle", "<", 2.0),
]
PG_ADMIN_URL = os.environ.get(
    "CREDO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
WAIT = 120.0


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one run; dropped afterwards."""
    import psycopg

    name = f"credo_bench_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _statements(metrics_address: str) -> float:
    """``credo_datastore_statements_total`` from the server's metrics endpoint."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("credo_datastore_statements_total "):
                return float(line.split()[1])
    raise RuntimeError("the server's metrics have no credo_datastore_statements_total")


def _cpu_seconds(pid: int) -> float:
    return cpu_seconds(psutil.Process(pid))[0]


def measure(
    ws: Workspace,
    name: str,
    agents: int,
    svids: int,
    idle: float,
    changes: int,
    url: str,
    renew_agents: bool = True,
) -> dict[str, float]:
    metrics_address = f"127.0.0.1:{free_port()}"
    flags: dict[str, Any] = {
        "metrics_address": metrics_address,
        "attestation_rate_limit": 100_000,
    }
    if url:
        flags["datastore"] = url
    server = ws.start_server(name, **flags)
    bundle = write_server_bundle(server, ws.root / f"{name}-bundle.pem")
    rss_before = rss_mb(server.pid)
    with server.admin_channel() as admin:
        log(f"{name}: {agents} join tokens and {agents * svids} entries")
        tokens = create_join_tokens(admin, agents)
        parents = [f"spiffe://{TRUST_DOMAIN}/credo/agent/join_token/{t}" for t in tokens]
        wanted = workload_entries(admin, parents, svids, "w")

        with Fleet(server.address, bundle, TRUST_DOMAIN, ws.root / f"{name}-agents") as fleet:
            log(f"{name}: {agents} agents attest and sync")
            cpu_mark = _cpu_mark(server.pid)
            started = time.perf_counter()
            fleet.call(fleet.attest_all(tokens), timeout=WAIT * 2)
            fleet.call(fleet.wait_synced(WAIT), timeout=WAIT * 2)
            attest_all = time.perf_counter() - started
            _log_cpu(name, "attest", server.pid, cpu_mark)
            wrong = [a.name for a in fleet.agents if a.recorder.spiffe_ids != wanted[a.spiffe_id]]
            if wrong:
                raise RuntimeError(f"agents with the wrong entries: {', '.join(wrong[:5])}")

            log(f"{name}: every agent signs its {svids} SVIDs")
            cpu_mark = _cpu_mark(server.pid)
            started = time.perf_counter()
            signed = fleet.call(fleet.each(lambda a: a.sign(retry_for=WAIT)), timeout=WAIT * 2)
            sign_all = time.perf_counter() - started
            _log_cpu(name, "sign", server.pid, cpu_mark)
            _check_signed(signed, svids)
            rss_after = rss_mb(server.pid)

            log(f"{name}: idle for {idle:g}s")
            statements_before = _statements(metrics_address)
            cpu_before = _cpu_seconds(server.pid)
            idle_started = time.perf_counter()
            time.sleep(idle)  # the measurement is of nothing happening
            idle_wall = time.perf_counter() - idle_started
            cpu_idle = (_cpu_seconds(server.pid) - cpu_before) / idle_wall * 100
            statements = (_statements(metrics_address) - statements_before) / idle_wall

            log(f"{name}: {changes} entry changes")
            entry_lat = _entry_changes(fleet, admin, changes)

            log(f"{name}: CA rotation")
            bundle_lat = _rotation(fleet, admin)

            log(f"{name}: renewal storm ({agents} x {svids} SVIDs)")
            started = time.perf_counter()
            signed = fleet.call(fleet.each(lambda a: a.sign(retry_for=WAIT)), timeout=WAIT * 2)
            storm = time.perf_counter() - started
            _check_signed(signed, svids)

            renewed: dict[str, float] = {}
            if renew_agents:
                log(f"{name}: every agent renews its agent SVID")
                started = time.perf_counter()
                fleet.call(fleet.each(_renew_and_resync), timeout=WAIT * 2)
                renewed["renew_agents_s"] = round(time.perf_counter() - started, 3)
            agents_seen = list(fleet.agents)
            retried = sum((a.retry_reasons for a in agents_seen), collections.Counter[str]())
            for reason, count in retried.most_common(3):
                log(f"{name}: calls retried {count}x: {reason}")
            failed = [a.name for a in fleet.agents if a.failure or a.removed]
            if failed:
                raise RuntimeError(f"agents failed: {', '.join(failed[:5])}")
        server.check_alive()
    server.stop()
    return {
        "attest_all_s": round(attest_all, 3),
        "sign_all_s": round(sign_all, 3),
        "entry_p50_s": round(percentile(entry_lat, 50), 4),
        "entry_p99_s": round(percentile(entry_lat, 99), 4),
        "bundle_p50_s": round(percentile(bundle_lat, 50), 4),
        "bundle_p99_s": round(percentile(bundle_lat, 99), 4),
        "server_rss_mb": round(rss_after, 1),
        "server_rss_mb_per_agent": round((rss_after - rss_before) / agents, 4),
        "server_cpu_idle_pct": round(cpu_idle, 2),
        "db_statements_per_s_idle": round(statements, 3),
        "renewal_storm_s": round(storm, 3),
        **renewed,
        "call_retries": sum(a.retries for a in agents_seen),
    }


def _cpu_mark(server_pid: int) -> tuple[float, float, float]:
    return time.perf_counter(), _cpu_seconds(server_pid), _cpu_seconds(os.getpid())


def _log_cpu(name: str, phase: str, server_pid: int, mark: tuple[float, float, float]) -> None:
    """Where a phase's time went: CPU seconds of the server and of this (the fleet) process."""
    wall, server_cpu, fleet_cpu = mark
    log(
        f"{name}: {phase}: {time.perf_counter() - wall:.1f}s wall, server "
        f"{_cpu_seconds(server_pid) - server_cpu:.1f}s CPU, fleet "
        f"{_cpu_seconds(os.getpid()) - fleet_cpu:.1f}s CPU"
    )


def _check_signed(signed: list[Any], svids: int) -> None:
    short = [i for i, batch in enumerate(signed) if len(batch.issued) < svids or batch.refused]
    if short:
        raise RuntimeError(f"{len(short)} agents did not get all their SVIDs signed")


async def _renew_and_resync(agent: SimAgent) -> None:
    streams = agent.syncer.streams
    await agent.renew(retry_for=WAIT)
    await agent.recorder.wait_until(
        lambda: agent.syncer.streams > streams and agent.recorder.connected,
        WAIT,
        f"{agent.name}: sync on the renewed SVID",
    )


def _entry_changes(fleet: Fleet, admin: Any, changes: int) -> list[float]:
    """Latencies of ``changes`` entries created one at a time, each for one agent."""
    rng = random.Random(14)
    stub = admin_pb2_grpc.EntriesStub(admin)
    latencies = []
    for i in range(changes):
        agent = rng.choice(fleet.agents)
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/fleet/change/{i}"
        request = admin_pb2.BatchCreateEntryRequest(entries=[_entry(spiffe_id, agent.spiffe_id)])
        started = time.perf_counter()
        stub.BatchCreateEntry(request, timeout=30)
        seen = fleet.call(fleet.wait_entry(agent, spiffe_id, 30.0))
        latencies.append(seen - started)
    return latencies


def _entry(spiffe_id: str, parent_id: str) -> Any:
    from credo._proto.credo.server.v1 import types_pb2

    return types_pb2.RegistrationEntry(
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=[types_pb2.Selector(type="unix", value="uid:20000")],
    )


def _rotation(fleet: Fleet, admin: Any) -> list[float]:
    """Per-agent latency of a newly prepared X.509 authority reaching its bundle."""
    bundles = admin_pb2_grpc.BundlesStub(admin)
    before = {
        bytes(a.asn1)
        for a in bundles.GetBundle(admin_pb2.GetBundleAdminRequest(), timeout=30).x509_authorities
    }
    started = time.perf_counter()
    admin_pb2_grpc.LocalAuthorityStub(admin).PrepareAuthority(
        admin_pb2.AuthorityRequest(kind="x509"), timeout=30
    )
    after = bundles.GetBundle(admin_pb2.GetBundleAdminRequest(), timeout=30).x509_authorities
    fresh = [bytes(a.asn1) for a in after if bytes(a.asn1) not in before]
    if len(fresh) != 1:
        raise RuntimeError(f"PrepareAuthority added {len(fresh)} X.509 authorities, expected 1")
    seen = fleet.call(fleet.wait_authority(fresh[0], WAIT), timeout=WAIT * 2)
    return [t - started for t in seen]


class _StreamLosses(logging.Handler):
    """Counts why the simulated agents' sync streams were lost or reopened (the syncer's
    log lines with an ``error``, which otherwise print without their fields), and the
    streams opened (its "entry sync stream open" lines), instead of printing each line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reasons: collections.Counter[str] = collections.Counter()
        self.opened = 0

    def emit(self, record: logging.LogRecord) -> None:
        error = getattr(record, "error", None)
        if error is None:
            self.opened += record.getMessage() == "entry sync stream open"
            return
        self.reasons[re.sub(r"127\.0\.0\.1:\d+", "SERVER", str(error))[:90]] += 1


def _raise_fd_limit() -> None:
    """Two sockets per agent here, one each in the server (inherited): lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--agents", type=int, default=1000, help="N agents of the main run")
    parser.add_argument("--reference-agents", type=int, default=100, help="N of the _100 run")
    parser.add_argument("--svids", type=int, default=10, help="workload entries per agent")
    parser.add_argument("--idle", type=float, default=30.0, help="idle window (s), main run")
    parser.add_argument("--reference-idle", type=float, default=10.0, help="idle (s), others")
    parser.add_argument("--changes", type=int, default=200, help="entry changes timed")
    parser.add_argument("--only", choices=("sqlite", "postgres"), help="one measurement only")
    args = parser.parse_args()
    if not (1 <= args.agents <= 5000 and 1 <= args.reference_agents <= 5000):
        sys.exit("fleet: need 1 <= --agents, --reference-agents <= 5000")
    if not (1 <= args.svids <= 100 and 1 <= args.changes <= 2000 and args.idle > 0):
        sys.exit("fleet: need 1 <= --svids <= 100, 1 <= --changes <= 2000, --idle > 0")
    _raise_fd_limit()
    losses = _StreamLosses()
    syncer_log = logging.getLogger("node_agent.sync.syncer")
    syncer_log.addHandler(losses)
    syncer_log.setLevel(logging.INFO)  # the routine reopenings (new SVID, resync) too
    syncer_log.propagate = False
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    with Workspace("credo-fleet-") as ws:
        if args.only != "postgres":
            n, idle, changes = args.agents, args.idle, args.changes
            metrics.update(measure(ws, "sqlite", n, args.svids, idle, changes, ""))
        if args.only != "sqlite":
            n = args.agents
            idle = args.reference_idle if args.only is None else args.idle
            with postgres_database() as url:
                renew = args.only is not None
                pg = measure(ws, "postgres", n, args.svids, idle, args.changes, url, renew)
            metrics.update(pg if args.only else {f"{k}_pg": v for k, v in pg.items()})
        if args.only is None:
            ref = measure(
                ws, "ref", args.reference_agents, args.svids, args.reference_idle, args.changes,
                "", renew_agents=False,
            )  # fmt: skip
            metrics.update({f"{k}_{args.reference_agents}": v for k, v in ref.items()})
    for reason, count in losses.reasons.most_common(5):
        log(f"sync streams reopened {count}x: {reason}")
    metrics["stream_reopens"] = sum(losses.reasons.values())
    metrics["stream_opens"] = losses.opened
    metrics["agents"] = args.agents
    metrics["run_s"] = round(time.perf_counter() - started, 1)
    targets = [t for t in TARGETS if t[0] in metrics]
    report("fleet", metrics, targets, as_json=args.json)


if __name__ == "__main__":
    main()
