"""The generated stubs work with the oldest grpcio and protobuf that pyproject.toml allows."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import grpc, google.protobuf
from credo._proto import workload_pb2, workload_pb2_grpc
from credo._proto.credo.server.v1 import admin_pb2_grpc, agent_pb2, agent_pb2_grpc, types_pb2
msg = agent_pb2.SyncEntriesResponse(event_id=7, entries=[types_pb2.RegistrationEntry(id="e")])
assert agent_pb2.SyncEntriesResponse.FromString(msg.SerializeToString()).event_id == 7
resp = workload_pb2.ValidateJWTSVIDResponse(spiffe_id="spiffe://example.org/x")
resp.claims.update({"aud": ["a"]})
print(grpc.__version__, google.protobuf.__version__)
"""


def _floors() -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        m = re.match(r"^(grpcio|protobuf)>=([\d.]+)$", dep)
        if m:
            pins.append(f"{m.group(1)}=={m.group(2)}")
    assert len(pins) == 2, f"expected grpcio and protobuf floors, found {pins}"
    return pins


def test_stubs_import_with_the_lowest_allowed_runtime(tmp_path: Path) -> None:
    """A venv with exactly the minimum grpcio and protobuf loads and uses every stub module."""
    pins = _floors()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
        check=True,
        capture_output=True,
    )
    # Copy only the stubs: the probe must not see the outer venv's newer packages.
    pkg = tmp_path / "src" / "credo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    subprocess.run(["cp", "-r", str(ROOT / "credo" / "_proto"), str(pkg / "_proto")], check=True)
    out = subprocess.run(
        [str(py), "-I", "-c", PROBE, str(tmp_path / "src")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == [pin.split("==")[1] for pin in pins]
