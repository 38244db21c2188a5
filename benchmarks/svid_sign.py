"""Benchmark: X.509-SVIDs signed per second, against raw ECDSA P-256 signatures per second.

Run: ``python benchmarks/svid_sign.py [--json] [--seconds N]``.

* ``credo_svids_per_s`` — leaf X509-SVIDs built from the template and signed by a P-256
  CA (:func:`credo.sign_x509_svid`); the workload public key is generated outside the loop.
* ``raw_sign_per_s`` — ``key.sign(data, ECDSA(SHA256()))`` with cryptography, same run.
* ``ratio`` — the first over the second; the target is >= 0.33.

With ``--json`` the last line is one JSON object: ``{"name": "svid_sign", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from credo import (
    SpiffeId,
    TrustDomain,
    ca_certificate_template,
    generate_private_key,
    sign_x509_svid,
)

TARGET_RATIO = 0.33


def _rates(
    first: Callable[[], object], second: Callable[[], object], seconds: float
) -> tuple[float, float]:
    """Calls per second of ``first`` and ``second``, measured in alternating short bursts.

    Interleaving means both see the same machine load, so their ratio stays meaningful
    on a busy host even when the absolute numbers move.
    """
    for _ in range(50):
        first()
        second()
    counts, spent = [0, 0], [0.0, 0.0]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            for _ in range(100):
                fn()
            spent[i] += time.perf_counter() - start
            counts[i] += 100
    return counts[0] / spent[0], counts[1] / spent[1]


def run(seconds: float) -> dict[str, float]:
    """Measure both rates and their ratio."""
    td = TrustDomain("example.org")
    now = datetime.now(UTC)
    ca_key = generate_private_key()
    ca_cert = ca_certificate_template(
        td, ca_key.public_key(), not_before=now, not_after=now + timedelta(days=1)
    ).sign(ca_key, hashes.SHA256())
    spiffe_id = SpiffeId.parse("spiffe://example.org/bench/workload")
    public_key = generate_private_key().public_key()
    ttl = timedelta(hours=1)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    data = b"x" * 300

    def credo_sign() -> object:
        return sign_x509_svid(spiffe_id, public_key, ca_cert=ca_cert, ca_key=ca_key, ttl=ttl)

    def raw_sign() -> object:
        return ca_key.sign(data, ec.ECDSA(hashes.SHA256()))

    credo_rate, raw_rate = _rates(credo_sign, raw_sign, seconds)
    return {
        "credo_svids_per_s": round(credo_rate, 1),
        "raw_sign_per_s": round(raw_rate, 1),
        "ratio": round(credo_rate / raw_rate, 3),
    }


def main() -> None:
    """Parse flags, run, print a table or one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--seconds", type=float, default=4.0, help="total measuring time")
    args = parser.parse_args()
    metrics = run(args.seconds)
    if args.json:
        print(json.dumps({"name": "svid_sign", "metrics": metrics}))
        return
    print(f"{'metric':<20} {'value':>12}")
    for name, value in metrics.items():
        print(f"{name:<20} {value:>12}")
    verdict = "met" if metrics["ratio"] >= TARGET_RATIO else "NOT met"
    print(f"target ratio >= {TARGET_RATIO}: {verdict}")


if __name__ == "__main__":
    main()
