"""The committed gRPC stubs match proto/, and the dependency floors match the stubs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    """Regenerating the stubs from proto/ reproduces credo/_proto byte for byte."""
    out = tmp_path / "_proto"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(out)],
        check=True,
        capture_output=True,
    )
    committed = _tree(ROOT / "credo" / "_proto")
    fresh = _tree(out)
    assert sorted(committed) == sorted(fresh), "stub files differ: run ./scripts/gen-proto"
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert not stale, f"stale stubs {stale}: run ./scripts/gen-proto"


def _floor(requirement: str) -> tuple[int, ...]:
    m = re.search(r"(?:>=|==)\s*([\d.]+)", requirement)
    assert m, f"no lower bound in {requirement!r}"
    return tuple(int(x) for x in m.group(1).split("."))


def _requirements() -> dict[str, str]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(doc["project"]["dependencies"])
    for extra in doc["project"]["optional-dependencies"].values():
        reqs.extend(extra)
    out = {}
    for r in reqs:
        name = re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower()
        out[name] = r
    return out


def test_protobuf_floor_matches_generated_code() -> None:
    """pyproject's protobuf lower bound is the gencode version the stubs were made for."""
    text = (ROOT / "credo" / "_proto" / "workload_pb2.py").read_text()
    m = re.search(r"Protobuf Python Version: ([\d.]+)", text)
    assert m
    gencode = tuple(int(x) for x in m.group(1).split("."))
    assert _floor(_requirements()["protobuf"]) == gencode


def test_grpcio_floor_matches_generated_code() -> None:
    """pyproject's grpcio lower bound is the version the *_grpc stubs require at import."""
    text = (ROOT / "credo" / "_proto" / "workload_pb2_grpc.py").read_text()
    m = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", text)
    assert m
    generated = tuple(int(x) for x in m.group(1).split("."))
    reqs = _requirements()
    assert _floor(reqs["grpcio"]) == generated
    assert _floor(reqs["grpcio-tools"]) == generated


def test_workload_api_wire_names() -> None:
    """The Workload API keeps the standard's unpackaged names and field numbers."""
    from credo._proto import workload_pb2

    svc = workload_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
    assert svc.full_name == "SpiffeWorkloadAPI"
    assert {m.name for m in svc.methods} >= {
        "FetchX509SVID",
        "FetchX509Bundles",
        "FetchJWTSVID",
        "FetchJWTBundles",
        "ValidateJWTSVID",
    }
    fields = {
        (msg, f.name): f.number
        for msg in ("X509SVID", "X509SVIDResponse", "JWTSVID", "JWTSVIDRequest")
        for f in workload_pb2.DESCRIPTOR.message_types_by_name[msg].fields
    }
    assert fields == {
        ("X509SVID", "spiffe_id"): 1,
        ("X509SVID", "x509_svid"): 2,
        ("X509SVID", "x509_svid_key"): 3,
        ("X509SVID", "bundle"): 4,
        ("X509SVID", "hint"): 5,
        ("X509SVIDResponse", "svids"): 1,
        ("X509SVIDResponse", "crl"): 2,
        ("X509SVIDResponse", "federated_bundles"): 3,
        ("JWTSVID", "spiffe_id"): 1,
        ("JWTSVID", "svid"): 2,
        ("JWTSVID", "hint"): 3,
        ("JWTSVIDRequest", "audience"): 1,
        ("JWTSVIDRequest", "spiffe_id"): 2,
    }


def test_workload_stubs_coexist_with_py_spiffe() -> None:
    """Our Workload API stubs and py-spiffe's load in one process and speak the same bytes."""
    pytest.importorskip("spiffe")
    from spiffe._proto import workload_pb2 as theirs  # type: ignore[import-untyped]

    from credo._proto import workload_pb2 as ours

    msg = ours.X509SVIDResponse(svids=[ours.X509SVID(spiffe_id="spiffe://example.org/a", hint="h")])
    back = theirs.X509SVIDResponse.FromString(msg.SerializeToString())
    assert back.svids[0].spiffe_id == "spiffe://example.org/a"
    assert back.svids[0].hint == "h"
