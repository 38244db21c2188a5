"""Generate the Python gRPC stubs (and mypy .pyi stubs) under credo/_proto.

Usage: python scripts/gen_proto.py [OUT_DIR]   (default: credo/_proto)

Two adjustments are made to protoc's output, both for a reason:

* Import paths. protoc writes absolute imports named after the .proto path
  (``import workload_pb2``, ``from credo.server.v1 import types_pb2``); they are
  rewritten to point into ``credo._proto``.
* A private descriptor pool for the Workload API. Its standard proto declares no
  package, so its message names (``X509SVIDRequest``...) are global; py-spiffe
  registers the same names in the default pool, and both could not be loaded in
  one process. Our copy lives in its own pool; the wire format is unchanged.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"

_PRIVATE_POOL = (
    "from google.protobuf import struct_pb2 as _struct_pb2\n"
    "# Private pool: see scripts/gen_proto.py.\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
    "_POOL.AddSerializedFile(_struct_pb2.DESCRIPTOR.serialized_pb)\n"
)


def _run(args: list[str]) -> None:
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    bindir = Path(sys.executable).parent
    plugins = [
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
    ]
    code = protoc.main(["protoc", f"-I{include}", *plugins, *args])
    if code != 0:
        raise SystemExit(f"protoc failed ({code}): {' '.join(args)}")


def generate(out: Path) -> None:
    """Write every stub into ``out`` (a directory that becomes credo._proto)."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        outs = [
            f"--python_out={t}",
            f"--grpc_python_out={t}",
            f"--mypy_out={t}",
            f"--mypy_grpc_out={t}",
        ]
        _run(
            [
                f"-I{PROTO / 'spiffe' / 'workload'}",
                *outs,
                str(PROTO / "spiffe" / "workload" / "workload.proto"),
            ]
        )
        credo_protos = sorted(str(p) for p in (PROTO / "credo").rglob("*.proto"))
        _run([f"-I{PROTO}", *outs, *credo_protos])

        for path in sorted(t.rglob("*.py*")):
            text = path.read_text()
            text = re.sub(
                r"^import workload_pb2 as",
                "from credo._proto import workload_pb2 as",
                text,
                flags=re.M,
            )
            text = re.sub(
                r"^import workload_pb2$", "from credo._proto import workload_pb2", text, flags=re.M
            )
            text = text.replace(
                "from credo.server.v1 import", "from credo._proto.credo.server.v1 import"
            )
            text = text.replace("import credo.server.v1.", "import credo._proto.credo.server.v1.")
            if path.name == "workload_pb2.py":
                text = text.replace(
                    "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
                    _PRIVATE_POOL + "DESCRIPTOR = _POOL.AddSerializedFile(",
                )
                text = text.replace(
                    "from google.protobuf import struct_pb2 as "
                    "google_dot_protobuf_dot_struct__pb2\n",
                    "",
                )
            path.write_text(text)

        for d in [t, *[p for p in t.rglob("*") if p.is_dir()]]:
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("")
        (t / "__init__.py").write_text(
            '"""Generated gRPC stubs; regenerate with ./scripts/gen-proto."""\n'
        )

        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(t, out)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "credo" / "_proto"
    generate(out)
    print(f"generated stubs in {out}")


if __name__ == "__main__":
    main()
