"""Benchmark: entry sync under churn (issue 8) — does every change reach a workload while
the agent renews its SVID, the server restarts and its CA rotates?

Run: ``./scripts/bench soak [--json] [--changes N] [--gap S]``.

The scenario of the slow integration test ``tests/integration/test_sync_soak.py``
(:mod:`tests.helpers.soak`), longer: a real ``credo-server run`` with agent SVID TTL 20 s
on a fixed port and a real ``credo-agent run`` with the default reconnect backoff; this
process is the workload, with one ``FetchX509SVID`` stream open. ``--changes`` (30)
changes ``--gap`` (12) seconds apart, so that agent SVID renewals and sync reconnects
happen between changes: an entry created (every third change: the oldest deleted),
timed until the workload's stream shows it. The server is restarted after every third
change (SIGTERM and SIGKILL in turn) and its X.509 CA prepared after every fifth, then
activated once the new CA is in the workload's trust bundle (timed and counted as one
more change).

* ``changes`` — changes made;
* ``missed`` — changes not on the workload's stream within 15 s (target 0);
* ``max_delay_s`` / ``p50_delay_s`` — time from the admin call to the stream, of those
  that arrived;
* ``restarts``, ``ca_activations`` — what happened around them; ``max_server_down_s``
  the longest restart (stop to serving again): an agent SVID of 20 s is renewed at
  half-life, so a server down for more than about 10 s at that moment lets it expire
  (a join-token agent cannot attest again), whatever the sync does;
* ``leaked_tasks`` — "Task was destroyed but it is pending!" lines in the logs (target 0).

With ``--json`` the last line is one JSON object: ``{"name": "soak", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _common import log, percentile, report

from tests.helpers.soak import run_soak

TARGETS = [("missed", "<=", 0), ("leaked_tasks", "<=", 0)]


def run(changes: int, gap: float) -> tuple[dict[str, float], list[str]]:
    root = Path(tempfile.mkdtemp(prefix="credo-soak-", dir="/tmp"))
    keep = False
    try:
        # Not die_with_parent: that needs a preexec_fn, so a plain fork of this process,
        # whose gRPC threads (the workload stream) are busy while the server is restarted;
        # such a child can abort before it execs. The harness kills leftovers at exit.
        result = run_soak(root, changes=changes, gap=gap, progress=log)
        assert result.server is not None and result.agent is not None
        logs = result.server.logs + result.agent.logs
        keep = bool(result.missed)
    finally:
        if keep:
            log(f"changes were missed: the logs stay in {root} (server.log, agent/agent.log)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    metrics: dict[str, float] = {
        "changes": result.changes,
        "missed": len(result.missed),
        "max_delay_s": round(result.max_delay_s, 3),
        "p50_delay_s": round(percentile(result.delays, 50), 3) if result.delays else 0.0,
        "restarts": result.restarts,
        "max_server_down_s": round(result.max_down_s, 2),
        "ca_activations": result.activations,
        "leaked_tasks": logs.count("Task was destroyed but it is pending"),
        "gap_s": gap,
    }
    return metrics, result.missed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--changes", type=int, default=30, help="changes to make [30]")
    parser.add_argument("--gap", type=float, default=12.0, help="seconds between changes [12]")
    args = parser.parse_args()
    if not 1 <= args.changes <= 1000:
        sys.exit("soak: need 1 <= --changes <= 1000")
    if not 0 <= args.gap <= 600:
        sys.exit("soak: need 0 <= --gap <= 600")
    metrics, missed = run(args.changes, args.gap)
    report("soak", metrics, TARGETS, as_json=args.json, notes=[f"missed: {m}" for m in missed])


if __name__ == "__main__":
    main()
