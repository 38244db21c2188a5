"""Benchmark: another uid's ``FetchX509SVID`` latency while one uid churns connections.

Run (as root): ``./scripts/bench workload_api_abuse [--json] [--samples N] [--churners N]``.

A real ``credo-server run`` and ``credo-agent run`` (as root), one entry for
``unix:uid:0``; the agent in a session of its own, as a service manager starts it (it then
sets its session's autogroup nice, see ``node_agent/priority.py``). **One sample** = a
fresh channel to the agent's socket, ``FetchX509SVID`` with the security header, the time
to the first message (as in ``workload_api``), done by this process (uid 0) back to back.

* ``quiet_p99_s`` — p99 of ``--samples`` (200) samples with nothing else running;
* ``churn_p99_s`` — p99 of as many samples while ``--churners`` (2) processes running as
  ``nobody``, each in a session of its own, loop ``connect(); close()`` on the socket as
  fast as they can (the attack of issue 9 item 3: before per-uid rate limiting and the
  accept thread it made 9 of 10 other users' fetches fail);
* ``ratio`` — ``churn_p99_s / quiet_p99_s``; the target is <= 3 (``churn_p50_s`` is
  reported too);
* ``failures`` — fetches that failed during either phase; the target is 0;
* ``churn_connects_per_s`` — the connects the churners completed per second
  (``churn_connects`` in all);
* ``queue_full_fraction`` — of the non-blocking ``connect()`` calls a third uid (daemon,
  uid 1) makes every 10 ms during the churn, the share that failed with ``EAGAIN`` because
  the listen queue (shared by every uid) was full (``queue_full_probes`` of them). gRPC
  reports such a connect as ``UNAVAILABLE`` or retries it after its one-second reconnect
  backoff: this is what made other users' fetches fail or take a second;
* ``accept_cpu_us_per_churn_connect`` — CPU time (user + system) of the agent's accept
  process during the churn phase per churned connection (nearly all of them shed): the
  cost of shedding, independent of what else the machine runs
  (``accept_cpu_s_during_churn``); ``agent_cpu_s_during_churn`` and
  ``agent_cpu_ms_per_quiet_fetch`` are the agent process's own;
* ``accept_wait_per_cpu_s`` — seconds the accept process was runnable but waited for a CPU
  (``/proc/<pid>/schedstat``) per second it ran, during the churn: while it waits, the
  churners fill the listen queue. ``agent_wait_per_cpu_s`` and ``victim_wait_per_cpu_s``
  are the same for the agent's main process and for this process (the victim), every
  thread; ``agent_wait_ms_per_churn_fetch`` and ``victim_wait_ms_per_churn_fetch`` are
  their waits per churn-phase fetch.

Each failed fetch is logged (stderr) with its gRPC status, details and time to failure.

With ``--json`` the last line is one JSON object: ``{"name": "workload_api_abuse", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time

import grpc
import psutil
from _common import (
    TRUST_DOMAIN,
    Workspace,
    cpu_seconds,
    create_entries,
    entry_proto,
    log,
    percentile,
    report,
)

TARGETS = [("ratio", "<=", 3.0), ("failures", "<=", 0.0)]
FETCH = "/SpiffeWorkloadAPI/FetchX509SVID"
HEADER = (("workload.spiffe.io", "true"),)
NOBODY = 65534

# Imported as root (the interpreter may live where nobody may read), then run as nobody.
CHURN = f"""
import os, socket, sys, time
path = sys.argv[1]
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
n = 0
started = time.monotonic()
try:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            n += 1
        except OSError:
            pass
        s.close()
except KeyboardInterrupt:
    pass
print(n, time.monotonic() - started, flush=True)
"""

PROBE_UID = 1
PROBE = f"""
import os, socket, sys, time
path = sys.argv[1]
os.setgroups([]); os.setgid({PROBE_UID}); os.setuid({PROBE_UID})
ok = full = 0
try:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
            ok += 1
        except BlockingIOError:
            full += 1
        s.close()
        time.sleep(0.01)
except KeyboardInterrupt:
    pass
print(ok, full, flush=True)
"""
"""A well-behaved uid's non-blocking ``connect()`` every 10 ms (as gRPC connects): ``EAGAIN``
means the listen queue, shared by every uid, was full."""


async def _one(target: str) -> float | str:
    """Seconds to the first message on a fresh channel, or why the fetch failed."""
    started = time.perf_counter()
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_stream(FETCH)(b"", metadata=HEADER, timeout=10)
            message = await call.read()
            elapsed = time.perf_counter() - started
            call.cancel()
    except grpc.aio.AioRpcError as err:
        return f"{err.code().name} after {time.perf_counter() - started:.3f}s: {err.details()}"
    return "the stream ended before a message" if message is grpc.aio.EOF else elapsed


async def _samples(target: str, n: int) -> tuple[list[float], int]:
    values: list[float] = []
    failures = 0
    for i in range(n):
        value = await _one(target)
        if isinstance(value, str):
            failures += 1
            log(f"fetch {i} failed: {value}")
        else:
            values.append(value)
    return values, failures


def _sched(pid: int) -> tuple[float, float]:
    """CPU seconds run and seconds runnable but waiting for a CPU, summed over every thread
    of ``pid`` now alive (``/proc/<pid>/task/<tid>/schedstat``, first two fields)."""
    ran = waited = 0.0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
                ran += int(fields[0]) / 1e9
                waited += int(fields[1]) / 1e9
    return ran, waited


def _waits(agent_pid: int) -> dict[str, tuple[float, float]]:
    """:func:`_sched` of the victim (this process), the agent's main process and its accept
    process (``agent_pid``'s children)."""
    accept = [0.0, 0.0]
    for child in psutil.Process(agent_pid).children(recursive=True):
        ran, waited = _sched(child.pid)
        accept[0] += ran
        accept[1] += waited
    return {"victim": _sched(os.getpid()), "agent": _sched(agent_pid), "accept": tuple(accept)}


def run(samples: int, churners: int) -> dict[str, float]:
    with Workspace() as ws:
        os.chmod(ws.root, 0o755)  # nobody must reach the agent's public socket
        server = ws.start_server()
        # In a session of its own, as systemd (or any service manager) starts a service: the
        # agent then sets its session's autogroup nice (node_agent/priority.py).
        agent = ws.start_agent(server, new_session=True)
        with server.admin_channel() as admin:
            create_entries(
                admin,
                [entry_proto(f"spiffe://{TRUST_DOMAIN}/bench/root", agent.spiffe_id,
                             ["unix:uid:0"])],
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while isinstance(asyncio.run(_one(agent.endpoint)), str):
            if time.monotonic() > deadline:
                raise RuntimeError("the agent never served the benchmark's SVID")
            time.sleep(0.1)
        asyncio.run(_samples(agent.endpoint, 20))  # warm up
        log(f"quiet: {samples} samples")
        agent_process = psutil.Process(agent.pid)
        quiet_cpu = cpu_seconds(agent_process)[0]
        quiet, quiet_failures = asyncio.run(_samples(agent.endpoint, samples))
        quiet_cpu = cpu_seconds(agent_process)[0] - quiet_cpu
        log(f"churn: {churners} churners as nobody, {samples} samples")
        cpu_before = cpu_seconds(agent_process)
        waits_before = _waits(agent.pid)
        # Another user's processes are not in this one's session: each churner in a session
        # of its own (the attacker's best choice where the kernel shares CPUs between
        # session autogroups), the probe in one more.
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CHURN, str(agent.socket)],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for _ in range(churners)
        ]
        probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(agent.socket)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            time.sleep(1.0)  # let the churn reach full speed
            churn, churn_failures = asyncio.run(_samples(agent.endpoint, samples))
        finally:
            connects, rates = 0, []
            for proc in procs:
                proc.send_signal(2)
                out, _ = proc.communicate(timeout=30)
                n, seconds = out.split() if out.strip() else ("0", "1")
                connects += int(n)
                rates.append(int(n) / float(seconds))
            cpu_after = cpu_seconds(agent_process)
            waits_after = _waits(agent.pid)
            probe.send_signal(2)
            out, _ = probe.communicate(timeout=30)
            probe_ok, probe_full = (int(x) for x in out.split()) if out.strip() else (0, 0)
        agent.check_alive()
    quiet_p99 = percentile(quiet, 99)
    waited = {k: waits_after[k][1] - waits_before[k][1] for k in waits_after}
    ran = {k: waits_after[k][0] - waits_before[k][0] for k in waits_after}
    churn_p99 = percentile(churn, 99)
    return {
        "quiet_p99_s": round(quiet_p99, 5),
        "churn_p50_s": round(percentile(churn, 50), 5),
        "churn_p99_s": round(churn_p99, 5),
        "ratio": round(churn_p99 / quiet_p99, 3),
        "failures": float(quiet_failures + churn_failures),
        "churn_connects_per_s": round(sum(rates), 1),
        "churn_connects": float(connects),
        "queue_full_probes": float(probe_full),
        "queue_full_fraction": round(probe_full / max(probe_ok + probe_full, 1), 4),
        "agent_cpu_s_during_churn": round(cpu_after[0] - cpu_before[0], 3),
        "agent_cpu_ms_per_quiet_fetch": round(quiet_cpu / samples * 1e3, 3),
        "accept_cpu_s_during_churn": round(cpu_after[1] - cpu_before[1], 3),
        "accept_wait_per_cpu_s": round(waited["accept"] / max(ran["accept"], 1e-9), 3),
        "agent_wait_per_cpu_s": round(waited["agent"] / max(ran["agent"], 1e-9), 3),
        "victim_wait_per_cpu_s": round(waited["victim"] / max(ran["victim"], 1e-9), 3),
        "agent_wait_ms_per_churn_fetch": round(waited["agent"] / samples * 1e3, 3),
        "victim_wait_ms_per_churn_fetch": round(waited["victim"] / samples * 1e3, 3),
        "accept_cpu_us_per_churn_connect": round(
            (cpu_after[1] - cpu_before[1]) / max(connects, 1) * 1e6, 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--samples", type=int, default=200, help="fetches per phase")
    parser.add_argument("--churners", type=int, default=2, help="churning processes")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("workload_api_abuse: run as root (the churners run as nobody)")
    if not (1 <= args.samples <= 5000 and 1 <= args.churners <= 16):
        sys.exit("workload_api_abuse: need 1 <= --samples <= 5000 and 1 <= --churners <= 16")
    report("workload_api_abuse", run(args.samples, args.churners), TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
