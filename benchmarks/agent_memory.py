"""Benchmark: resident memory of a real agent holding 1,000 cached X.509-SVIDs, against the
same agent idle.

Run: ``./scripts/bench agent_memory [--json] [--svids N]``.

A real ``credo-server run`` and ``credo-agent run --svid-cache-size N`` (joined with a fresh
token). The agent's cache signs an SVID for every entry it serves, up to the cache size,
without waiting for a workload to ask (as SPIRE's agent does), in ``BatchNewX509SVID`` calls
of 500; it logs ``X509-SVIDs issued ... cached=<n>`` after each batch.

* ``rss_mb_idle`` — the agent's RSS (``psutil``, MiB) after it has started, synced an empty
  entry set and settled (2 s).
* ``rss_mb_1000_svids`` — then ``--svids`` (1,000) entries are created through the admin API,
  each with its own SPIFFE ID, parented to the agent, selectors ``unix:uid:<our uid>`` and a
  distinguishing ``unix:gid:<100000+i>`` (so no workload here matches them and nothing but the
  cache holds them). When the agent's log says ``cached=1000``, after a 2 s settle, its RSS
  is read again. Target <= 150 MiB.
* ``rss_mb_per_1000_svids`` — the difference, scaled to 1,000 SVIDs.
* ``cache_fill_s`` — from the entry creation to the log line saying the cache is full.

With ``--json`` the last line is one JSON object: ``{"name": "agent_memory", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from _common import (
    TRUST_DOMAIN,
    Workspace,
    create_entries,
    entry_proto,
    log,
    report,
    rss_mb,
    wait_for,
)

TARGETS = [("rss_mb_1000_svids", "<=", 150.0)]
SETTLE = 2.0
_CACHED = re.compile(r"X509-SVIDs issued\b.*\bcached=(\d+)")


def _cached(logs: str) -> int:
    counts = [int(m.group(1)) for m in _CACHED.finditer(logs)]
    return counts[-1] if counts else 0


def _settled_rss(pid: int) -> float:
    """RSS after a settle period (max of three reads, 0.5 s apart, at its end)."""
    time.sleep(SETTLE)
    reads = []
    for _ in range(3):
        reads.append(rss_mb(pid))
        time.sleep(0.5)
    return max(reads)


def run(svids: int) -> dict[str, float]:
    uid = os.geteuid()
    with Workspace() as ws:
        server = ws.start_server()
        agent = ws.start_agent(server, svid_cache_size=svids)
        idle = _settled_rss(agent.pid)
        log(f"idle agent: {idle:.1f} MiB; creating {svids} entries")
        entries = [
            entry_proto(f"spiffe://{TRUST_DOMAIN}/bench/mem-{i}", agent.spiffe_id,
                        [f"unix:uid:{uid}", f"unix:gid:{100000 + i}"])
            for i in range(svids)
        ]  # fmt: skip
        started = time.perf_counter()
        with server.admin_channel() as admin:
            create_entries(admin, entries)

        def full() -> bool:
            agent.check_alive()
            return _cached(agent.logs) >= svids

        wait_for(full, 80, f"the agent to cache {svids} SVIDs", interval=0.1)
        fill = time.perf_counter() - started
        loaded = _settled_rss(agent.pid)
        if _cached(agent.logs) < svids:
            raise RuntimeError("the agent's cache shrank while settling")
        log(f"{svids} SVIDs cached in {fill:.1f}s: {loaded:.1f} MiB")
    return {
        "rss_mb_1000_svids": round(loaded, 1),
        "rss_mb_idle": round(idle, 1),
        "rss_mb_per_1000_svids": round((loaded - idle) * 1000 / svids, 1),
        "cache_fill_s": round(fill, 2),
        "svids": svids,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--svids", type=int, default=1000, help="entries (SVIDs) for the agent")
    args = parser.parse_args()
    if not 1 <= args.svids <= 10_000:
        sys.exit("agent_memory: need 1 <= --svids <= 10000")
    metrics = run(args.svids)
    report("agent_memory", metrics, TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
