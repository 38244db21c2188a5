"""Tests for the signing worker pool (server.ca.pool) against the in-process signer."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ca_testkit import TD, FakeClock, MakeManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_ca_manager import _write_upstream

from credo.keys import generate_private_key
from credo.spiffe_id import SpiffeId
from credo.x509svid import verify_x509_svid
from server.ca.manager import AuthorityManager
from server.ca.pool import ERROR_INVALID, ItemResult, SigningPool, SignItem
from tests.helpers.server import make_csr

WORKLOAD = SpiffeId.from_segments(TD, "workload", "db")


@pytest.fixture
def pool(key_dir: Path) -> Iterator[SigningPool]:
    signing_pool = SigningPool(2, key_dir, TD, min_batch=1)
    signing_pool.start()
    assert signing_pool.ready
    yield signing_pool
    signing_pool.close()


def _sign(pool: SigningPool, manager: AuthorityManager, items: list[SignItem]) -> list[ItemResult]:
    ca, now = manager.ca.x509_snapshot()
    return asyncio.run(pool.sign(ca, now, items))


def _chain(manager: AuthorityManager, leaf_der: bytes) -> list[x509.Certificate]:
    ca = manager.ca.x509_ca
    assert ca is not None
    return [x509.load_der_x509_certificate(leaf_der), *ca.chain]


def _shape(cert: x509.Certificate) -> tuple[object, ...]:
    """Everything but the serial number and the signature."""
    return (
        cert.subject,
        cert.issuer,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        cert.signature_hash_algorithm.name if cert.signature_hash_algorithm else None,
        [(e.oid, e.critical, e.value) for e in cert.extensions],
    )


@pytest.mark.parametrize("upstream", [None, "root-signs", "root-mid-signs"])
def test_pool_svids_match_in_process_ones(
    make_manager: MakeManager,
    clock: FakeClock,
    pool: SigningPool,
    tmp_path: Path,
    upstream: str | None,
) -> None:
    """Pool-signed SVIDs have the in-process shape and chain and verify against the bundle."""
    overrides: dict[str, object] = {}
    if upstream is not None:
        clock.now = datetime.now(UTC)  # the upstream certificates are valid from today
        cert_path, key_path, _ = _write_upstream(
            tmp_path, with_intermediate=upstream == "root-mid-signs"
        )
        overrides = {"upstream_ca_cert": cert_path, "upstream_ca_key": key_path}
    manager = make_manager(**overrides)
    manager.start()
    key = generate_private_key()
    csr = make_csr(key)
    [(leaf_der, not_after, error, _)] = _sign(
        pool, manager, [("params[0].csr", csr, str(WORKLOAD), ("db.local",), 60)]
    )
    assert leaf_der is not None and error == ""
    pooled = _chain(manager, leaf_der)
    in_process = manager.ca.sign_x509_svid(WORKLOAD, key.public_key(), 60, ("db.local",))
    assert [_shape(c) for c in pooled] == [_shape(c) for c in in_process]
    assert [c.public_bytes(serialization.Encoding.DER) for c in pooled[1:]] == [
        c.public_bytes(serialization.Encoding.DER) for c in in_process[1:]
    ]
    assert not_after == int(pooled[0].not_valid_after_utc.timestamp())
    bundle = manager.bundle().x509_bundle()
    assert verify_x509_svid(pooled, bundle, now=clock()) == WORKLOAD


def test_bad_csr_gets_its_own_error(
    make_manager: MakeManager, clock: FakeClock, pool: SigningPool
) -> None:
    """A bad-signature CSR fails alone, with the in-process message; the others are signed."""
    manager = make_manager()
    manager.start()
    bad = bytearray(make_csr())
    bad[-1] ^= 0x01
    items: list[SignItem] = [
        (f"params[{i}].csr", bytes(bad) if i == 3 else make_csr(), str(WORKLOAD), (), 60)
        for i in range(8)
    ]
    results = _sign(pool, manager, items)
    assert [r[0] is None for r in results] == [i == 3 for i in range(8)]
    _, _, error, message = results[3]
    assert error == ERROR_INVALID
    assert message.startswith("params[3].csr: signature does not verify")


def test_pool_follows_ca_rotation(
    make_manager: MakeManager, clock: FakeClock, pool: SigningPool
) -> None:
    """After prepare + activate, the workers load and sign with the new CA's key."""
    manager = make_manager()
    manager.start()
    item: SignItem = ("params[0].csr", make_csr(), str(WORKLOAD), (), 60)
    [(first, *_)] = _sign(pool, manager, [item])
    old = manager.ca.x509_ca
    assert first is not None and old is not None
    prepared = manager.prepare("x509")
    manager.activate("x509", prepared.authority_id)
    new = manager.ca.x509_ca
    assert new is not None and new.authority_id != old.authority_id
    results = _sign(pool, manager, [item] * 4)
    bundle = manager.bundle().x509_bundle()
    for leaf_der, *_ in results:
        assert leaf_der is not None
        leaf = x509.load_der_x509_certificate(leaf_der)
        assert leaf.issuer == new.certificate.subject
        leaf.verify_directly_issued_by(new.certificate)
        assert verify_x509_svid([leaf], bundle, now=clock()) == WORKLOAD


_ORPHAN_SCRIPT = """
import sys
from credo.spiffe_id import TrustDomain
from server.ca.pool import SigningPool

if __name__ == "__main__":
    pool = SigningPool(2, sys.argv[1], TrustDomain("example.org"))
    pool.start()
    print(" ".join(str(pid) for pid in pool._executor._processes), flush=True)
    sys.stdin.read()
"""


def test_workers_exit_when_the_server_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the server process makes its signing workers exit within seconds."""
    script = tmp_path / "serve_pool.py"
    script.write_text(_ORPHAN_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "keys")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[4],
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} outlived the server"
        time.sleep(0.1)
