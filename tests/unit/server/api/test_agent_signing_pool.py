"""BatchNewX509SVID through the signing worker pool and with ``--signing-workers 0``."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from credo._proto.credo.server.v1 import agent_pb2
from server.cli.run import config_from_flags
from server.config import ServerConfig
from tests.helpers.server import InProcessServer, make_csr
from tests.unit.server.api.test_agent_api import create_entry, sign

BATCH = 20  # above server.ca.pool.MIN_POOLED_BATCH


def _wait_for_pool(caplog: pytest.LogCaptureFixture) -> None:
    deadline = time.monotonic() + 60
    while not any(r.getMessage() == "signing workers ready" for r in caplog.records):
        assert time.monotonic() < deadline, "signing workers did not start within 60s"
        time.sleep(0.05)


def _batch(
    tmp_path: Path, workers: int, caplog: pytest.LogCaptureFixture
) -> tuple[list[agent_pb2.BatchNewX509SVIDResponse.Result], list[x509.Certificate], list[str]]:
    """Sign BATCH items (item 5 with a bad CSR, item 7 not authorized); results and roots."""
    caplog.set_level(logging.DEBUG, logger="server")
    with InProcessServer(tmp_path, signing_workers=workers) as server:
        if workers:
            _wait_for_pool(caplog)
        agent = server.attest(server.create_join_token())
        other = server.attest(server.create_join_token())
        entries = [
            create_entry(
                server, f"spiffe://example.org/w{i}", agent.agent_id, dns_names=["w.local"]
            )
            for i in range(BATCH)
        ]
        entries[7] = create_entry(server, "spiffe://example.org/theirs", other.agent_id)
        bad = bytearray(make_csr())
        bad[-1] ^= 0x01
        csrs = [bytes(bad) if i == 5 else make_csr() for i in range(BATCH)]
        results = list(sign(agent, *zip(entries, csrs, strict=True)).results)
        roots = [x509.load_der_x509_certificate(a.asn1) for a in agent.bundle.x509_authorities]
    return results, roots, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("workers", [2, 0], ids=["pool", "in-process"])
def test_batch_statuses_and_svids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    """Per-item statuses and messages are the same with or without workers; SVIDs verify."""
    results, roots, messages = _batch(tmp_path, workers, caplog)
    assert ("signed x509-svid batch in workers" in messages) == bool(workers)
    codes = [r.status.code for r in results]
    expected = [0] * BATCH
    expected[5] = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    expected[7] = grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert codes == expected
    assert results[5].status.message.startswith("params[5].csr: signature does not verify")
    assert "is not authorized for this agent" in results[7].status.message
    for i, result in enumerate(results):
        if i in (5, 7):
            assert not result.svid.cert_chain
            continue
        assert result.svid.spiffe_id == f"spiffe://example.org/w{i}"
        assert len(result.svid.cert_chain) == 1  # self-signed CA: the leaf only
        leaf = x509.load_der_x509_certificate(result.svid.cert_chain[0])
        leaf.verify_directly_issued_by(roots[0])
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [result.svid.spiffe_id]
        assert san.get_values_for_type(x509.DNSName) == ["w.local"]
        assert result.svid.expires_at == int(leaf.not_valid_after_utc.timestamp())


def test_signing_workers_setting() -> None:
    """--signing-workers 0 means in-process; the default is min(2, CPUs); negatives are refused."""
    assert config_from_flags(None, {"signing_workers": 0}).signing_workers == 0
    assert ServerConfig().signing_workers == min(2, os.cpu_count() or 1)
    with pytest.raises(Exception, match="signing_workers"):
        config_from_flags(None, {"signing_workers": -1})
