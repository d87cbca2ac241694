"""Generates the Python gRPC stubs of every .proto under protos/.

    python protos/generate.py [--out DIR]

Without --out the stubs are written beside the .proto files (where they are
committed); a test regenerates them into a temporary directory and compares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent


def generate(out: Path) -> list[Path]:
    sources = sorted(PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(s.relative_to(PROTOS)) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[str(s) for s in sources]}")
    return sources


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTOS)
    generate(parser.parse_args().out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
