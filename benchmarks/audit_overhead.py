"""Benchmark: X.509-SVID issuance with the audit trail on, against the same with it off.

Run: ``./scripts/bench audit_overhead [--json] [--batches N]``.

* ``on_svids_per_s`` — :meth:`server.issuance.Issuer.x509_svids` (CSR check, template,
  signature, in this process) for batches of 500 (entry, CSR) pairs, with the issuer
  writing each batch's 500 ``x509_svid.issue`` records to a SQLite datastore on a temp
  file (one transaction per batch, chained under the audit lock), as the server does.
* ``off_svids_per_s`` — the same issuer path without an audit writer.
* ``ratio`` — ``on / off``; the target is >= 0.8.

The CA is a real :class:`~server.ca.manager.AuthorityManager` on the same datastore. The
two modes alternate batch by batch (``--batches`` of each, 10 by default), so both see
the same machine load. The CSRs are built before the clock starts.

With ``--json`` the last line is one JSON object: ``{"name": "audit_overhead", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from _common import log, make_csr, report

from credo import generate_private_key
from server.ca.ca import CertificateAuthority
from server.ca.keymanager import DiskKeyManager
from server.ca.manager import AuthorityManager, AuthorityManagerConfig
from server.config import ServerConfig
from server.datastore.models import RegistrationEntry
from server.datastore.sql import SqlDataStore
from server.issuance import Issuer, X509SvidIssued, X509SvidRequest

BATCH = 500
TARGETS = [("ratio", ">=", 0.8)]
TD = "example.org"


async def _run(batches: int, workdir: Path) -> dict[str, float]:
    store = SqlDataStore.open(f"sqlite:///{workdir / 'datastore.sqlite3'}")
    try:
        config = ServerConfig(trust_domain=TD, data_dir=workdir)
        manager_config = AuthorityManagerConfig.from_server_config(config, "bench")
        ca = CertificateAuthority(manager_config.trust_domain)
        manager = AuthorityManager(
            manager_config,
            store,
            DiskKeyManager(workdir / "keys"),
            ca=ca,
        )
        manager.start()
        parent = f"spiffe://{TD}/credo/agent/join_token/bench"
        entries = {
            f"e{i}": RegistrationEntry(
                spiffe_id=f"spiffe://{TD}/bench/w{i}", parent_id=parent, id=f"e{i}"
            )
            for i in range(BATCH)
        }
        key = generate_private_key()
        csr = make_csr(key)
        requests = [X509SvidRequest(eid, csr, f"params[{i}].csr") for i, eid in enumerate(entries)]
        with_audit = Issuer(ca, audit_writer=store)
        without = Issuer(ca)
        seconds = {"on": 0.0, "off": 0.0}
        for _ in range(2):  # warm up both paths (the template is cut on first use)
            await with_audit.x509_svids(requests[:20], entries)
            await without.x509_svids(requests[:20], entries)
        for n in range(batches):
            for mode, issuer in (("on", with_audit), ("off", without)):
                started = time.perf_counter()
                results = await issuer.x509_svids(requests, entries)
                seconds[mode] += time.perf_counter() - started
                if not all(isinstance(r, X509SvidIssued) for r in results):
                    raise SystemExit(f"batch {n} ({mode}): not every SVID was signed")
        written = len(store.list_audit_records())
        log(f"{written} audit records in the trail")
    finally:
        store.close()
    on = batches * BATCH / seconds["on"]
    off = batches * BATCH / seconds["off"]
    return {"on_svids_per_s": on, "off_svids_per_s": off, "ratio": on / off}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--batches", type=int, default=10, help="batches of 500 per mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="credo-bench-audit-") as tmp:
        metrics = asyncio.run(_run(args.batches, Path(tmp)))
    report("audit_overhead", metrics, TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
