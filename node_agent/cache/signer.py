"""Signing one batch of workload X509-SVIDs: a key per identity, CSRs, one server call.

The agent makes each key itself (ec-p256, in a worker thread: key generation holds the
GIL for a while) and sends the CSRs in one ``BatchNewX509SVID`` call of at most
:data:`~node_agent.server_client.MAX_BATCH`. Each answer is checked (a chain, for the
entry's SPIFFE ID) before it becomes an :class:`~credo.x509svid.X509Svid`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from credo.errors import CredoError
from credo.keys import PrivateKey, generate_private_key, make_csr
from credo.x509svid import X509Svid, leaf_spiffe_id
from node_agent.server_client import X509SvidResult
from node_agent.sync.entries import RegistrationEntry

__all__ = ["SignedBatch", "SigningClient", "sign_batch"]

log = logging.getLogger(__name__)


class SigningClient(Protocol):
    """What signing needs from the server client."""

    async def batch_new_x509_svid(
        self, csrs: Sequence[tuple[str, bytes]]
    ) -> list[X509SvidResult]: ...


@dataclass
class SignedBatch:
    """What came back for one batch."""

    issued: list[tuple[RegistrationEntry, X509Svid]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """Entry ids the server refused, answered with something unusable, or did not answer."""


def _keys_and_csrs(count: int) -> list[tuple[PrivateKey, bytes]]:
    """Generate ``count`` ec-p256 keys and their CSRs (run in a worker thread)."""
    out = []
    for _ in range(count):
        key = generate_private_key()
        out.append((key, make_csr(key)))
    return out


def _svid(entry: RegistrationEntry, key: PrivateKey, result: X509SvidResult) -> X509Svid:
    """The answer for ``entry`` as an SVID; ValueError or CredoError if unusable."""
    if not result.chain:
        raise ValueError("empty certificate chain")
    spiffe_id = leaf_spiffe_id(result.chain[0])
    if spiffe_id != entry.spiffe_id:
        raise ValueError(f"SVID is for {spiffe_id}, expected {entry.spiffe_id}")
    return X509Svid(spiffe_id, result.chain, key, entry.hint)


async def sign_batch(client: SigningClient, batch: Sequence[RegistrationEntry]) -> SignedBatch:
    """Sign ``batch``; raises the client's errors when the call itself fails."""
    pairs = await asyncio.to_thread(_keys_and_csrs, len(batch))
    results = await client.batch_new_x509_svid(
        [(entry.id, csr) for entry, (_, csr) in zip(batch, pairs, strict=True)]
    )
    by_entry = {e.id: (e, k) for e, (k, _) in zip(batch, pairs, strict=True)}
    signed = SignedBatch()
    answered: set[str] = set()
    for result in results:
        answered.add(result.entry_id)
        item = by_entry.get(result.entry_id)
        if item is None:
            continue
        entry, key = item
        if result.refusal:
            signed.refused.append(entry.id)
            log.warning(
                "server refused an X509-SVID",
                extra={"entry_id": entry.id, "error": result.refusal},
            )
            continue
        try:
            signed.issued.append((entry, _svid(entry, key, result)))
        except (CredoError, ValueError) as exc:
            signed.refused.append(entry.id)
            log.warning(
                "server returned an unusable X509-SVID",
                extra={"entry_id": entry.id, "error": str(exc)},
            )
    signed.refused += [entry_id for entry_id in by_entry if entry_id not in answered]
    return signed
