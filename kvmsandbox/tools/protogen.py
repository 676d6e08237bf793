"""Generates the Python code for every ``.proto`` file under ``proto/``.

One command (``make proto`` or ``python -m kvmsandbox.tools.protogen``) regenerates everything; the
test suite regenerates into a temporary dir and fails when the committed code differs.
A file ``proto/X/Y/name.proto`` becomes ``kvmsandbox/X/Y/name_pb2.py`` (+ ``.pyi`` typing stubs, and
``name_pb2_grpc.py`` for files that define gRPC services served over gRPC).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PACKAGE_ROOT = REPO_ROOT / "kvmsandbox"

# The agent protocol uses only messages (its own framing, see agent.proto); the CRI uses gRPC.
GRPC_PROTOS = ("cri/runtime/v1/api.proto",)


def proto_files() -> list[str]:
    """Every .proto file under proto/, relative to it, in a stable order."""
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated modules for every proto file into ``out_dir``; returns their paths.

    Raises:
        RuntimeError: protoc failed; the message carries its output.
    """
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    for rel in proto_files():
        args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--mypy_out={out_dir}",
        ]
        if rel in GRPC_PROTOS:
            args += [f"--grpc_python_out={out_dir}", f"--mypy_grpc_out={out_dir}"]
        proc = subprocess.run([*args, rel], capture_output=True, text=True, env=env, cwd=PROTO_ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"protoc failed for {rel}: {proc.stderr.strip() or proc.stdout.strip()}")
    paths = sorted(p for p in out_dir.rglob("*") if p.is_file() and "_pb2" in p.name)
    for path in paths:
        _qualify_imports(path)
    return paths


def _qualify_imports(path: Path) -> None:
    """protoc names imported modules relative to proto/ (``from cri.runtime.v1 import ...``);
    the code lives in the kvmsandbox package."""
    text = path.read_text()
    top_dirs = sorted({rel.split("/")[0] for rel in proto_files()})
    for top in top_dirs:
        text = re.sub(rf"^(from|import) {top}\.", rf"\1 kvmsandbox.{top}.", text, flags=re.MULTILINE)
    path.write_text(text)


def generated_paths(root: Path) -> list[Path]:
    """The generated files below ``root``, relative to it."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and "_pb2" in p.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        for rel in generated_paths(out):
            target = PACKAGE_ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, target)
            print(f"wrote {target.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
