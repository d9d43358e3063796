"""The build step that turns the .proto files into the committed Python stubs (needs grpcio-tools).

grinfer.proto (grinfer.v1.Recommender) and inference.proto (the KServe v2 GRPCInferenceService):

    python -m grinfer.serving.proto.generate          # regenerate <name>_pb2.py, <name>_pb2_grpc.py, .pyi
    python -m grinfer.serving.proto.generate --check  # exit 1 if the committed stubs differ from the .proto

protoc runs with the repository root as its include path and the .proto at its package path, so the
generated modules import each other as `grinfer.serving.proto.*` (no sys.path tricks). The check
regenerates into a temporary directory and compares the text, ignoring only the version stamps that
protoc/grpcio-tools write (so a newer grpcio-tools that generates the same code still passes).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO = Path(__file__).resolve().with_name("grinfer.proto")
PROTOS = (PROTO, PROTO.with_name("inference.proto"))
ROOT = PROTO.parents[3]  # the directory that holds the grinfer package
STUBS = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")  # suffixes of the .proto's stem

_STAMPS = (
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: <stamp>"),
    (re.compile(r"ValidateProtobufRuntimeVersion\((.*?)\)", re.S), "ValidateProtobufRuntimeVersion(<stamp>)"),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = <stamp>"),
)


def generate(out_root: Path = ROOT, proto: Path = PROTO) -> list[Path]:
    """Run protoc on one .proto; its stubs land in out_root/grinfer/serving/proto/ (returned)."""
    import grpc_tools  # noqa: F401  (a clear ImportError if grpcio-tools is missing)

    relative = proto.relative_to(ROOT)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_root}",
           f"--grpc_python_out={out_root}", f"--pyi_out={out_root}", str(relative)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed ({done.returncode}): {done.stderr.strip()}")
    return [out_root / relative.parent / f"{proto.stem}{suffix}" for suffix in STUBS]


def normalized(text: str) -> str:
    """The stub's text without the generator's version stamps."""
    for pattern, stamp in _STAMPS:
        text = pattern.sub(stamp, text)
    return text


def check() -> list[str]:
    """Names of committed stubs that are missing or differ from freshly generated ones (empty: up to date)."""
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in (stub for proto in PROTOS for stub in generate(Path(tmp), proto)):
            committed = PROTO.with_name(fresh.name)
            if not committed.is_file() or normalized(committed.read_text()) != normalized(fresh.read_text()):
                stale.append(fresh.name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--check", action="store_true", help="only verify that the committed stubs are current")
    args = parser.parse_args(argv)
    if args.check:
        stale = check()
        if stale:
            print(f"stale gRPC stubs: {', '.join(stale)}; run `python -m grinfer.serving.proto.generate`",
                  file=sys.stderr)
            return 1
        print("gRPC stubs are up to date")
        return 0
    for path in (stub for proto in PROTOS for stub in generate(proto=proto)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
