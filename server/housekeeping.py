"""Housekeeping: prune expired join tokens, entries and issued-SVID records, CRLs of
authorities gone from the journal, and old change-feed events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

from credo.errors import CredoError
from server.datastore.protocol import DataStore

__all__ = ["EVENT_RETENTION", "HOUSEKEEPING_INTERVAL", "run_housekeeping"]

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL: Final = 60.0
"""Seconds between two pruning rounds."""
EVENT_RETENTION: Final = 24 * 3600
"""Change-feed events older than this (seconds) are pruned; a sync resuming from before
them gets the full set."""


async def run_housekeeping(
    ds: DataStore, stop: asyncio.Event, interval: float = HOUSEKEEPING_INTERVAL
) -> None:
    """Prune expired join tokens and entries, and events older than the retention."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            return
        now = int(time.time())
        try:
            tokens = await asyncio.to_thread(ds.prune_join_tokens, now)
            entries = await asyncio.to_thread(ds.prune_registration_entries, now)
            events = await asyncio.to_thread(ds.prune_events, now - EVENT_RETENTION)
            svids = await asyncio.to_thread(ds.prune_issued_x509_svids, now)
            svids += await asyncio.to_thread(ds.prune_issued_jwt_svids, now)
            crls = await asyncio.to_thread(ds.prune_crls)
        except CredoError as err:
            log.error("housekeeping failed", extra={"error": str(err)})
            continue
        if tokens or entries or events or svids or crls:
            log.info(
                "pruned expired records",
                extra={
                    "join_tokens": tokens,
                    "entries": entries,
                    "events": events,
                    "issued_svids": svids,
                    "crls": crls,
                },
            )
