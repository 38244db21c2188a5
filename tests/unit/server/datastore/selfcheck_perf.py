"""Self-check: time batch creation and a full list of 100,000 entries (not a test).

Run ``.venv/bin/python tests/unit/server/datastore/selfcheck_perf.py [URL] [COUNT]``;
the URL defaults to a fresh SQLite file in a temp directory. Prints one JSON line.
Targets: >= 2,000 created/s on SQLite; listing 100k entries well under 2 s.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from credo.selector import Selector
from server.datastore import RegistrationEntry, SqlDataStore


def main() -> None:
    """Fill a store with COUNT entries in batches of 1,000, then list them all."""
    with tempfile.TemporaryDirectory() as tmp:
        url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{Path(tmp) / 'perf.db'}"
        count = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
        store = SqlDataStore.open(url)
        try:
            batch = 1000
            started = time.perf_counter()
            for start in range(0, count, batch):
                store.create_registration_entries(
                    [
                        RegistrationEntry(
                            spiffe_id=f"spiffe://example.org/workload/{i}",
                            parent_id=f"spiffe://example.org/credo/agent/join_token/{i % 100}",
                            selectors=(
                                Selector("unix", f"uid:{i}"),
                                Selector("unix", f"gid:{i % 50}"),
                            ),
                            dns_names=(f"w{i}.example.org",),
                        )
                        for i in range(start, min(start + batch, count))
                    ]
                )
            created_s = time.perf_counter() - started
            started = time.perf_counter()
            listed = store.list_registration_entries().entries
            list_s = time.perf_counter() - started
            assert len(listed) == count, len(listed)
            print(
                json.dumps(
                    {
                        "backend": url.split(":", 1)[0],
                        "entries": count,
                        "create_per_s": round(count / created_s),
                        "list_all_s": round(list_s, 3),
                    }
                )
            )
        finally:
            store.close()


if __name__ == "__main__":
    main()
