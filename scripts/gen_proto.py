"""Generate the Python stubs of proto/imagegen/v1/*.proto into serve/ingress/proto/.

    python scripts/gen_proto.py          write them (`make proto`)
    python scripts/gen_proto.py --check  exit 1 if the committed stubs differ

The stubs are committed, not built at install: the Serve proxy and every ingress
replica import them from the package, and the runtime image then needs no
grpcio-tools (which pins its own protobuf). They must come from the pinned
grpcio-tools (dev extra), so they match the pinned grpcio and protobuf; a test
runs --check.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "proto"
OUT = ROOT / "serve" / "ingress" / "proto"
PROTOS = ["imagegen/v1/images.proto"]


def generate(into: Path) -> dict[str, str]:
    """{file name: text} of every stub, flat: the gRPC module imports its messages
    relatively, so the stubs live in one package wherever it is installed."""
    from grpc_tools import protoc

    args = ["protoc", f"-I{SRC}", f"--python_out={into}", f"--pyi_out={into}",
            f"--grpc_python_out={into}", *(str(SRC / p) for p in PROTOS)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out = {}
    for proto in PROTOS:
        package, stem = proto.rsplit("/", 1)[0].replace("/", "."), Path(proto).stem
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            text = (into / Path(proto).parent / f"{stem}{suffix}").read_text()
            text = text.replace(f"from {package} import {stem}_pb2",
                                f"from . import {stem}_pb2")
            out[f"{stem}{suffix}"] = text
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stubs = generate(Path(tmp))
    stale = []
    for name, text in stubs.items():
        path = OUT / name
        old = path.read_text() if path.exists() else ""
        if old == text:
            continue
        if args.check:
            stale.append(name)
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(True), text.splitlines(True), f"committed/{name}",
                f"generated/{name}", n=1))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"stale stubs: {', '.join(stale)}; run `make proto`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
