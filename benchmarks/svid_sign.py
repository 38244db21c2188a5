"""Benchmark: X.509-SVIDs signed per second, against raw ECDSA P-256 signatures per second.

Run: ``./scripts/bench svid_sign [--json] [--seconds N]``.

* ``credo_svids_per_s`` — workload leaf X509-SVIDs signed by a P-256 CA the way the server
  signs them: :func:`server.ca.ca.build_workload_svid` with the CA's leaf signer (the
  TBSCertificate encoded from the per-CA template, :mod:`server.ca.tbs`), the function both
  the in-process path and the signing workers call for every SVID; the current time is read
  for each one. The workload key comes from a CSR, as in the server: the CSR is made and
  loaded (its signature is checked in the server, which ``issuance`` measures) outside the
  loop; inside it, its SubjectPublicKeyInfo is cut out of the CSR's DER
  (:func:`server.ca.tbs.request_key_info`) and handed to the signer, which puts it in the
  leaf instead of encoding the key again.
* ``builder_svids_per_s`` — the same leaf built with pyca/cryptography's
  ``CertificateBuilder`` (:func:`credo.sign_x509_svid`) for the same key, as the server did
  before the template; for comparison.
* ``raw_sign_per_s`` — ``key.sign(data, ECDSA(SHA256()))`` over 300 bytes with cryptography.
* ``ratio`` — ``credo_svids_per_s / raw_sign_per_s``; the target is >= 0.6.
  ``builder_ratio`` is ``builder_svids_per_s / raw_sign_per_s``.

All three are measured in the same run, in alternating short bursts.
With ``--json`` the last line is one JSON object: ``{"name": "svid_sign", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from credo import (
    SpiffeId,
    TrustDomain,
    ca_certificate_template,
    generate_private_key,
    sign_x509_svid,
)
from server.ca.ca import X509CA, build_workload_svid
from server.ca.tbs import request_key_info

TARGET_RATIO = 0.6
BURST = 100


def _rates(functions: Sequence[Callable[[], object]], seconds: float) -> list[float]:
    """Calls per second of each function, measured in alternating short bursts.

    Interleaving means all see the same machine load, so their ratios stay meaningful
    on a busy host even when the absolute numbers move.
    """
    for _ in range(50):
        for fn in functions:
            fn()
    counts = [0] * len(functions)
    spent = [0.0] * len(functions)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for i, fn in enumerate(functions):
            start = time.perf_counter()
            for _ in range(BURST):
                fn()
            spent[i] += time.perf_counter() - start
            counts[i] += BURST
    return [count / elapsed for count, elapsed in zip(counts, spent, strict=True)]


def run(seconds: float) -> dict[str, float]:
    """Measure the three rates and the ratios."""
    td = TrustDomain("example.org")
    now = datetime.now(UTC)
    ca_key = generate_private_key()
    ca_cert = ca_certificate_template(
        td, ca_key.public_key(), not_before=now, not_after=now + timedelta(days=1)
    ).sign(ca_key, hashes.SHA256())
    ca = X509CA("bench", ca_cert, ca_key)
    spiffe_id = SpiffeId.parse("spiffe://example.org/bench/workload")
    workload_key = generate_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(workload_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    public_key = x509.load_der_x509_csr(csr).public_key()
    ttl = timedelta(hours=1)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    data = b"x" * 300

    def credo_sign() -> object:
        return build_workload_svid(
            td,
            ca.leaf_signer,
            spiffe_id,
            public_key,
            3600,
            (),
            datetime.now(UTC),
            request_key_info(csr),
        )

    def builder_sign() -> object:
        return sign_x509_svid(spiffe_id, public_key, ca_cert=ca_cert, ca_key=ca_key, ttl=ttl)

    def raw_sign() -> object:
        return ca_key.sign(data, ec.ECDSA(hashes.SHA256()))

    credo_rate, builder_rate, raw_rate = _rates((credo_sign, builder_sign, raw_sign), seconds)
    return {
        "credo_svids_per_s": round(credo_rate, 1),
        "builder_svids_per_s": round(builder_rate, 1),
        "raw_sign_per_s": round(raw_rate, 1),
        "ratio": round(credo_rate / raw_rate, 3),
        "builder_ratio": round(builder_rate / raw_rate, 3),
    }


def main() -> None:
    """Parse flags, run, print a table or one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--seconds", type=float, default=6.0, help="total measuring time")
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
