"""Benchmark: Workload API ``FetchX509SVID`` first-response latency on fresh connections,
with 1 and with 100 concurrent clients, against a bare gRPC echo server in the same run.

Run: ``./scripts/bench workload_api [--json] [--rounds N] [--samples-1 N]``.

A real ``credo-server run`` and ``credo-agent run``, one entry for ``unix:uid:<our uid>``
(its SVID is signed and cached before measuring). The clients are ``grpc.aio`` tasks in this
process. **One sample** = open a new channel to the Unix socket (a fresh connection, so the
agent attests the caller: ``SO_PEERCRED`` + ``/proc`` reads), start the server-streaming call
with ``workload.spiffe.io: true``, wait for the first message, record the time from before
the channel was created to that message, cancel the stream, close the channel. Responses
are taken as raw bytes on the client (no protobuf decode), so the client does the same work
against either server.

* ``p50_1_s`` / ``p99_1_s`` — one client, ``--samples-1`` (200) samples back to back.
* ``p50_100_s`` / ``p99_100_s`` — 100 clients at once (all started together, each taking one
  sample), ``--rounds`` (5) rounds: 500 samples.
* ``echo_p99_100_s`` — the same 100-client rounds against a bare ``grpc.aio`` server in its own
  process on a Unix socket, with one unary-stream method registered by a generic handler that
  answers the request bytes as its first message and then keeps the stream open (like the
  Workload API). Rounds alternate agent/echo so both see the same machine load.
  (``echo_p50_100_s`` and ``echo_p99_1_s`` are reported too.)
* ``ratio_p99_100`` — ``p99_100_s / echo_p99_100_s``; the target is <= 2.0 (``TARGETS``).
* ``agent_cpu_ms_per_call`` / ``echo_cpu_ms_per_call`` — CPU time (user + system, psutil
  ``cpu_times``) of the agent (with its accept and holder-scan processes) and of the echo
  server over their 100-client rounds, per sample; ``cpu_ratio`` is the first over the
  second. These do not depend on what else the
  machine runs (the latencies do).

The latency includes the client's own share of the CPU: 100 clients, the echo server or the
agent, and (idle) the signing server all share this machine's cores.

With ``--json`` the last line is one JSON object: ``{"name": "workload_api", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import grpc
import psutil
from _common import (
    TRUST_DOMAIN,
    ManagedProcess,
    Workspace,
    cpu_seconds,
    create_entries,
    entry_proto,
    log,
    percentile,
    report,
    wait_for,
)

TARGETS = [("ratio_p99_100", "<=", 2.0)]
FETCH = "/SpiffeWorkloadAPI/FetchX509SVID"
ECHO = "/bench.Echo/Stream"
HEADER = (("workload.spiffe.io", "true"),)
CONCURRENCY = 100


# --- the echo server (run as a child process: --echo-server SOCKET) ----------------------


async def _echo_server(path: str) -> None:
    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> object:
        yield request
        await asyncio.Event().wait()  # hold the stream open until the client cancels

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    await server.wait_for_termination()


class EchoProcess(ManagedProcess):
    kind = "echo server"

    def __init__(self, root: Path) -> None:
        super().__init__(root / "echo.log", die_with_parent=True)
        self.socket = root / "echo.sock"

    def start(self) -> None:
        self._spawn([sys.executable, __file__, "--echo-server", str(self.socket)])

        def up() -> bool:
            self.check_alive()
            return self.socket.exists()

        wait_for(up, 30, "the echo server")


# --- clients -----------------------------------------------------------------------------


async def _one(target: str, method: str, metadata: tuple[tuple[str, str], ...]) -> float:
    """Seconds from a new channel to the first message of ``method`` (raw bytes)."""
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_stream(method)(b"", metadata=metadata, timeout=30)
        message = await call.read()
        elapsed = time.perf_counter() - started
        call.cancel()
    if message is grpc.aio.EOF:
        raise RuntimeError(f"{method}: stream ended without a message ({await call.code()})")
    return elapsed


async def _round(
    target: str, method: str, metadata: tuple[tuple[str, str], ...], n: int
) -> list[float]:
    return list(await asyncio.gather(*(_one(target, method, metadata) for _ in range(n))))


async def _measure(
    agent_target: str,
    echo_target: str,
    samples_1: int,
    rounds: int,
    cpu: dict[str, tuple[psutil.Process, float]],
) -> dict[str, list[float]]:
    """Latencies by series; ``cpu[name]`` (agent, echo) gains the CPU seconds its process
    spent in the 100-client rounds."""
    agent = (agent_target, FETCH, HEADER)
    echo = (echo_target, ECHO, ())
    lat: dict[str, list[float]] = {"agent_1": [], "echo_1": [], "agent_100": [], "echo_100": []}
    for _ in range(20):  # warm up both paths
        await _one(*agent)
        await _one(*echo)
    log(f"1 client: {samples_1} samples each")
    for _ in range(samples_1):
        lat["agent_1"].append(await _one(*agent))
        lat["echo_1"].append(await _one(*echo))
    log(f"{CONCURRENCY} clients: {rounds} rounds each")
    await _round(*agent, CONCURRENCY)  # warm-up round, not counted
    await _round(*echo, CONCURRENCY)
    for _ in range(rounds):
        for name, series, args in (("agent", "agent_100", agent), ("echo", "echo_100", echo)):
            process, spent = cpu[name]
            before = sum(cpu_seconds(process))
            lat[series].extend(await _round(*args, CONCURRENCY))
            await asyncio.sleep(0.2)  # the streams' cancellations are handled in the window
            cpu[name] = (process, spent + sum(cpu_seconds(process)) - before)
    return lat


async def _first_fetch(target: str, timeout: float = 30.0) -> None:
    """Wait until the agent serves our SVID (the entry may not have reached it yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await _one(target, FETCH, HEADER)
            return
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.PERMISSION_DENIED or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def run(samples_1: int, rounds: int) -> dict[str, float]:
    uid = os.geteuid()
    with Workspace() as ws:
        server = ws.start_server()
        agent = ws.start_agent(server)
        with server.admin_channel() as admin:
            create_entries(
                admin,
                [entry_proto(f"spiffe://{TRUST_DOMAIN}/bench/workload", agent.spiffe_id,
                             [f"unix:uid:{uid}"])],
            )  # fmt: skip
        echo = EchoProcess(ws.root)
        ws.adopt(echo)
        echo.start()
        asyncio.run(_first_fetch(agent.endpoint))
        cpu = {"agent": (psutil.Process(agent.pid), 0.0), "echo": (psutil.Process(echo.pid), 0.0)}
        lat = asyncio.run(_measure(agent.endpoint, f"unix:{echo.socket}", samples_1, rounds, cpu))
        agent.check_alive()
        echo.check_alive()
    p99_100 = percentile(lat["agent_100"], 99)
    echo_p99_100 = percentile(lat["echo_100"], 99)
    agent_ms, echo_ms = (cpu[name][1] / (rounds * CONCURRENCY) * 1000 for name in ("agent", "echo"))
    return {
        "p50_1_s": round(percentile(lat["agent_1"], 50), 5),
        "p99_1_s": round(percentile(lat["agent_1"], 99), 5),
        "p50_100_s": round(percentile(lat["agent_100"], 50), 5),
        "p99_100_s": round(p99_100, 5),
        "echo_p99_1_s": round(percentile(lat["echo_1"], 99), 5),
        "echo_p50_100_s": round(percentile(lat["echo_100"], 50), 5),
        "echo_p99_100_s": round(echo_p99_100, 5),
        "ratio_p99_100": round(p99_100 / echo_p99_100, 3),
        "agent_cpu_ms_per_call": round(agent_ms, 4),
        "echo_cpu_ms_per_call": round(echo_ms, 4),
        "cpu_ratio": round(agent_ms / echo_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--samples-1", type=int, default=200, help="samples with one client")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 100 concurrent clients")
    parser.add_argument("--echo-server", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        asyncio.run(_echo_server(args.echo_server))
        return
    if not (1 <= args.samples_1 <= 5000 and 1 <= args.rounds <= 50):
        sys.exit("workload_api: need 1 <= --samples-1 <= 5000 and 1 <= --rounds <= 50")
    metrics = run(args.samples_1, args.rounds)
    report("workload_api", metrics, TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
