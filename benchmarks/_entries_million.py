"""The ``--million`` part of the ``entries`` benchmark: a server start with 1,000,000
entries in SQLite and in PostgreSQL, its RSS, and one agent's full sync of 10,000 of them.

Setup (not timed): the schema is made by :meth:`SqlDataStore.open` (its migrations), then
the rows are written straight into the tables: SQLAlchemy Core ``executemany`` in batches
inside one transaction for SQLite, ``COPY`` through psycopg for PostgreSQL. Each entry has
its own SPIFFE ID and one ``unix:uid:N`` selector; 10,000 of them are children of one
group SPIFFE ID, the rest spread over 1,000 (absent) agents' SPIFFE IDs, 990 each.

Measured, for each backend:

* ``start_1m_s`` — a real ``credo-server run`` from spawn until it serves (as
  ``start_100k_s``); ``start_1m_entry_load_s`` from its log (the entry cache load).
* ``rss_1m_mb`` — the server's RSS once it serves; ``rss_1m_mb_per_10k`` is
  ``(rss_1m_mb - rss_empty_mb) / 100``.
* ``sync_10k_s`` — a simulated agent (:mod:`tests.helpers.fleet`: the agent's own
  ``ServerClient``, ``AgentSession`` and ``EntrySyncer``) attests with a join token and
  receives its full entry set: one entry created through the admin API with the group's
  SPIFFE ID under the agent, so the agent is authorized for it and its 10,000 preloaded
  children (10,001 in all; checked).

Metric names carry ``_pg`` for PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from _common import TRUST_DOMAIN, Workspace, create_entries, entry_proto, log, rss_mb
from sqlalchemy import create_engine, insert

from server.datastore import SqlDataStore
from server.datastore.schema import entries, entry_selectors
from tests.helpers.fleet import Fleet, create_join_tokens
from tests.helpers.processes import write_server_bundle

LOADED = "loaded registration entries"
GROUP = f"spiffe://{TRUST_DOMAIN}/bench/group"
AUTHORIZED = 10_000
OTHER_PARENTS = 1_000
BATCH = 20_000
START_TIMEOUT = 180.0  # the default 30 s would cut a slow start short instead of timing it
SELECTOR_COLUMNS = ("entry_id", "type", "value")
COLUMNS = (
    "entry_id", "spiffe_id", "parent_id", "x509_svid_ttl", "jwt_svid_ttl", "admin",
    "downstream", "node_alias", "hint", "expires_at", "revision_number", "created_at",
    "unique_key", "selectors_key", "selector_count", "owner", "purpose",
)  # fmt: skip


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def rows(total: int) -> Iterator[tuple[tuple[Any, ...], tuple[str, str, str]]]:
    """(entry row, selector row) for ``total`` entries, in entry id order (the fill is
    faster appending to the primary key; the other indexes see random keys as in use)."""
    now = int(time.time())
    ids = sorted(str(uuid.uuid4()) for _ in range(total))
    for i, entry_id in enumerate(ids):
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/bench/workload-{i}"
        if i < AUTHORIZED:
            parent = GROUP
        else:
            parent = f"spiffe://{TRUST_DOMAIN}/credo/agent/join_token/bench-{i % OTHER_PARENTS}"
        value = f"uid:{i}"
        selectors = json.dumps([["unix", value]], separators=(",", ":"))
        unique = json.dumps([spiffe_id, parent, [["unix", value]]], separators=(",", ":"))
        yield (
            (entry_id, spiffe_id, parent, 0, 0, False, False, False, "", 0, 1, now,
             _sha(unique), _sha(selectors), 1, "", ""),
            (entry_id, "unix", value),
        )  # fmt: skip


def fill_sqlite(url: str, total: int) -> None:
    """Every row through SQLAlchemy Core executemany, ``BATCH`` rows a call, one transaction."""
    SqlDataStore.open(url).close()  # the schema, by migration
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            entry_rows: list[dict[str, Any]] = []
            selector_rows: list[dict[str, Any]] = []
            for entry, selector in rows(total):
                entry_rows.append(dict(zip(COLUMNS, entry, strict=True)))
                selector_rows.append(dict(zip(SELECTOR_COLUMNS, selector, strict=True)))
                if len(entry_rows) == BATCH:
                    conn.execute(insert(entries), entry_rows)
                    conn.execute(insert(entry_selectors), selector_rows)
                    entry_rows, selector_rows = [], []
            if entry_rows:
                conn.execute(insert(entries), entry_rows)
                conn.execute(insert(entry_selectors), selector_rows)
    finally:
        engine.dispose()


def fill_postgres(url: str, total: int) -> None:
    """Every row through ``COPY ... FROM STDIN`` (psycopg), one transaction."""
    import psycopg

    SqlDataStore.open(url).close()
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        selector_rows = []
        with cur.copy(f"COPY registration_entries ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for entry, selector in rows(total):
                copy.write_row(entry)
                selector_rows.append(selector)
        with cur.copy("COPY entry_selectors (entry_id, type, value) FROM STDIN") as copy:
            for selector in selector_rows:
                copy.write_row(selector)
        cur.execute("ANALYZE registration_entries")
        cur.execute("ANALYZE entry_selectors")


def measure(ws: Workspace, name: str, total: int, url: str | None) -> dict[str, float]:
    """Fill, start, RSS, sync for one backend (``url`` None: SQLite in the data dir)."""
    from entries import _logged_seconds  # the log parser of the main benchmark

    data_dir = ws.root / name
    data_dir.mkdir()
    flags: dict[str, Any] = {"log_level": "info"}
    if url is None:
        store_url = f"sqlite:///{data_dir / 'datastore.sqlite3'}"
    else:
        store_url = url
        flags["datastore"] = url
    log(f"{name}: filling {total:,} entries (setup, not timed)")
    started = time.perf_counter()
    (fill_sqlite if url is None else fill_postgres)(store_url, total)
    log(f"{name}: filled in {time.perf_counter() - started:.1f}s; starting the server")
    server = ws.start_server(name, timeout=START_TIMEOUT, **flags)
    start_s = server.start_seconds
    rss = rss_mb(server.pid)
    log(f"{name}: serving after {start_s:.2f}s, RSS {rss:.0f} MiB; one agent syncs")
    bundle = write_server_bundle(server, ws.root / f"{name}-bundle.pem")
    with server.admin_channel() as admin:
        token = create_join_tokens(admin, 1)[0]
        agent_id = f"spiffe://{TRUST_DOMAIN}/credo/agent/join_token/{token}"
        create_entries(admin, [entry_proto(GROUP, agent_id, ["unix:uid:4000000000"])])
    with Fleet(server.address, bundle, TRUST_DOMAIN, ws.root / f"{name}-agent") as fleet:
        started = time.perf_counter()
        agents = fleet.call(fleet.attest_all([token]), timeout=300)
        fleet.call(fleet.wait_synced(300), timeout=310)
        sync_s = time.perf_counter() - started
        got = len(agents[0].recorder.entries)
    if got != AUTHORIZED + 1:
        raise RuntimeError(f"{name}: the agent got {got} entries, expected {AUTHORIZED + 1}")
    server.stop()
    suffix = "" if url is None else "_pg"
    return {
        f"start_1m_s{suffix}": round(start_s, 3),
        f"start_1m_entry_load_s{suffix}": _logged_seconds(server.logs, LOADED),
        f"rss_1m_mb{suffix}": round(rss, 1),
        f"sync_10k_s{suffix}": round(sync_s, 3),
    }


def empty_rss(ws: Workspace) -> float:
    server = ws.start_server("empty-rss")
    try:
        return rss_mb(server.pid)
    finally:
        server.stop()


def run(total: int, postgres: bool) -> dict[str, float]:
    from fleet import postgres_database

    metrics: dict[str, float] = {}
    with Workspace() as ws:
        empty = empty_rss(ws)
        metrics["rss_empty_mb"] = round(empty, 1)
        metrics.update(measure(ws, "sqlite", total, None))
        if postgres:
            with postgres_database() as url:
                metrics.update(measure(ws, "postgres", total, url))
    scale = total / 10_000
    for suffix in ("", "_pg"):
        if f"rss_1m_mb{suffix}" in metrics:
            metrics[f"rss_mb_per_10k{suffix}"] = round(
                (metrics[f"rss_1m_mb{suffix}"] - empty) / scale, 2
            )
    return metrics
