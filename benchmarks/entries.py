"""Benchmark: registration entries created per second through the admin API, and server start
time with 100,000 entries in the datastore.

Run: ``./scripts/bench entries [--json] [--entries N] [--batch N] [--total N]``;
``--million``: the start with 1,000,000 entries on SQLite and PostgreSQL instead
(:mod:`_entries_million`).

* ``create_per_s`` — entries stored per second by ``Entries.BatchCreateEntry`` on the admin
  Unix socket of a real ``credo-server run`` (SQLite in its data dir), ``--batch`` entries a
  call (500), ``--entries`` in all (20,000), one client, calls back to back. Each entry has
  its own SPIFFE ID, a common parent and one ``unix:uid:N`` selector. Target >= 2,000.
* ``start_100k_s`` — the server is stopped, the datastore is topped up to ``--total``
  (100,000) entries directly through ``SqlDataStore.create_registration_entries`` (not
  timed), and a fresh ``credo-server run`` is timed from spawn until it serves: gRPC health
  SERVING on the admin socket, ``server.addr`` written and the agent port accepting TCP.
  The median of ``--starts`` (2) starts. Target < 5 s. From the server's own log of the
  last start: ``start_entry_load_s`` (loading every entry into the authorization cache) and
  ``start_in_process_s`` (from ``serve()`` entry to ready; the rest of ``start_100k_s`` is
  the interpreter, imports and the CLI).
* ``start_empty_s`` — the same start on an empty datastore (same run): the fixed cost of
  starting Python, loading keys and binding the endpoints.
* ``sqlite_insert_per_s`` — reference: the same rows (entry, selector, event) written with the
  stdlib ``sqlite3`` ``executemany``, ``--batch`` entries a transaction, into a datastore with
  Credo's schema, WAL and ``synchronous=NORMAL`` like the server's. The ceiling for
  ``create_per_s`` on this disk.

With ``--json`` the last line is one JSON object: ``{"name": "entries", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import statistics
import sys
import time
import uuid
from pathlib import Path

from _common import (
    TRUST_DOMAIN,
    ServerProcess,
    Workspace,
    create_entries,
    entry_proto,
    log,
    report,
)

from credo.selector import Selector
from server.datastore import RegistrationEntry, SqlDataStore

PARENT = f"spiffe://{TRUST_DOMAIN}/bench/agent"
TARGETS = [("create_per_s", ">=", 2000.0), ("start_100k_s", "<", 5.0)]
MILLION_TARGETS = [("start_1m_s", "<", 15.0)]


def _logged_seconds(logs: str, message: str) -> float:
    """The ``seconds=`` field of the last server log line with ``message`` (NaN if none)."""
    found = re.findall(re.escape(message) + r".*?\bseconds=([\d.]+)", logs)
    return float(found[-1]) if found else float("nan")


def _spiffe_id(i: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/bench/workload-{i}"


def measure_create(server: ServerProcess, count: int, batch: int) -> float:
    """Entries per second through BatchCreateEntry (protos built before the clock starts)."""
    protos = [entry_proto(_spiffe_id(i), PARENT, [f"unix:uid:{i}"]) for i in range(count)]
    with server.admin_channel() as channel:
        create_entries(channel, protos[:1], batch)  # connect and warm up outside the clock
        started = time.perf_counter()
        ids = create_entries(channel, protos[1:], batch)
        elapsed = time.perf_counter() - started
    if len(ids) != count - 1:
        raise RuntimeError(f"created {len(ids)} entries, expected {count - 1}")
    return (count - 1) / elapsed


def top_up(datastore_path: Path, first: int, total: int, batch: int = 5000) -> None:
    """Add entries ``first``..``total``-1 straight into the (stopped) server's SQLite file."""
    store = SqlDataStore.open(f"sqlite:///{datastore_path}")
    try:
        for start in range(first, total, batch):
            store.create_registration_entries(
                [
                    RegistrationEntry(
                        spiffe_id=_spiffe_id(i),
                        parent_id=PARENT,
                        selectors=(Selector("unix", f"uid:{i}"),),
                    )
                    for i in range(start, min(start + batch, total))
                ]
            )
        count = store.count_registration_entries()
    finally:
        store.close()
    if count < total:
        raise RuntimeError(f"datastore holds {count} entries, expected {total}")


def sqlite_reference(root: Path, count: int, batch: int) -> float:
    """Raw executemany rate of the same rows into Credo's schema (see module doc)."""
    path = root / "reference.sqlite3"
    SqlDataStore.open(f"sqlite:///{path}").close()  # create the schema by migration
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        now = int(time.time())
        rows = []
        for i in range(count):
            entry_id = str(uuid.uuid4())
            rows.append(
                (
                    (entry_id, _spiffe_id(i), PARENT, 0, 0, 0, 0, 0, "", 0, 0, now,
                     uuid.uuid4().hex + uuid.uuid4().hex, uuid.uuid4().hex, 1),
                    (entry_id, "unix", f"uid:{i}"),
                    ("entry_created", entry_id, now),
                )
            )  # fmt: skip
        started = time.perf_counter()
        for start in range(0, count, batch):
            chunk = rows[start : start + batch]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO registration_entries (entry_id, spiffe_id, parent_id, x509_svid_ttl,"
                " jwt_svid_ttl, admin, downstream, node_alias, hint, expires_at, revision_number,"
                " created_at, unique_key, selectors_key, selector_count)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [r[0] for r in chunk],
            )
            conn.executemany(
                "INSERT INTO entry_selectors (entry_id, type, value) VALUES (?,?,?)",
                [r[1] for r in chunk],
            )
            conn.executemany(
                "INSERT INTO events (kind, subject, created_at) VALUES (?,?,?)",
                [r[2] for r in chunk],
            )
            conn.execute("COMMIT")
        return count / (time.perf_counter() - started)
    finally:
        conn.close()


def run(count: int, batch: int, total: int, starts: int) -> dict[str, float]:
    with Workspace() as ws:
        log("reference: raw sqlite3 executemany")
        reference = sqlite_reference(ws.root, count, batch)

        empty = ws.start_server("empty")
        start_empty = empty.start_seconds
        empty.stop()

        server = ws.start_server("server", log_level="info")
        log(f"creating {count} entries through the admin API, batches of {batch}")
        create_rate = measure_create(server, count, batch)
        server.stop()

        log(f"topping the datastore up to {total} entries (server stopped)")
        top_up(server.datastore_path, count, total)
        start_times = []
        for n in range(starts):
            start_times.append(server.start().start_seconds)
            log(f"start {n + 1}/{starts} with {total} entries: {start_times[-1]:.2f}s")
            server.stop()
        logs = server.logs
    return {
        "create_per_s": round(create_rate, 1),
        "start_100k_s": round(statistics.median(start_times), 3),
        "start_entry_load_s": _logged_seconds(logs, "loaded registration entries"),
        "start_in_process_s": _logged_seconds(logs, "server ready"),
        "start_empty_s": round(start_empty, 3),
        "sqlite_insert_per_s": round(reference, 1),
        "create_vs_sqlite": round(create_rate / reference, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--entries", type=int, default=20_000, help="entries created via the API")
    parser.add_argument("--batch", type=int, default=500, help="entries per BatchCreateEntry")
    parser.add_argument("--total", type=int, default=100_000, help="entries at the timed start")
    parser.add_argument("--starts", type=int, default=2, help="timed starts (median reported)")
    parser.add_argument(
        "--million",
        action="store_true",
        help="instead: start with 1,000,000 entries on SQLite and PostgreSQL (_entries_million.py)",
    )
    parser.add_argument("--million-total", type=int, default=1_000_000, help=argparse.SUPPRESS)
    parser.add_argument("--no-postgres", action="store_true", help="--million on SQLite only")
    args = parser.parse_args()
    if args.million:
        import _entries_million

        metrics = _entries_million.run(args.million_total, not args.no_postgres)
        report("entries", metrics, MILLION_TARGETS, as_json=args.json)
        return
    if not 1 <= args.batch <= 500 or args.entries < 2 or args.total < args.entries:
        sys.exit("entries: need 1 <= --batch <= 500, --entries >= 2, --total >= --entries")
    metrics = run(args.entries, args.batch, args.total, max(1, args.starts))
    report("entries", metrics, TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
