"""Generates the typed stubs of ``ern_registry.v1`` from the repository's ``proto/``.

    python clients/python/generate_stubs.py          # rewrite src/ern_registry/v1/
    python clients/python/generate_stubs.py --check  # exit 1 if they differ from proto/

The stubs (``*_pb2.py``, ``*_pb2.pyi`` type stubs, ``*_pb2_grpc.py``) are committed, so
``pip install`` needs neither protoc nor the proto files. ``tests/test_stubs.py`` runs
the check: it fails when ``proto/`` changed and the stubs were not regenerated. The
output depends on the grpcio-tools version, which the ``test`` extra pins.
"""

from __future__ import annotations

import filecmp
import pathlib
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTO = HERE.parent.parent / "proto"
PACKAGE = HERE / "src"
STUBS = PACKAGE / "ern_registry" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO)) for p in (PROTO / "ern_registry" / "v1").glob("*.proto"))


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    """Runs protoc (grpcio-tools) into ``out``; returns the files of ``ern_registry/v1``."""
    import importlib.resources

    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *proto_files(),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted(p for p in (out / "ern_registry" / "v1").iterdir() if p.name.endswith(SUFFIXES))


def committed() -> list[pathlib.Path]:
    return sorted(p for p in STUBS.iterdir() if p.name.endswith(SUFFIXES))


def differences() -> list[str]:
    """What differs between the committed stubs and stubs generated now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(pathlib.Path(tmp))}
        have = {p.name: p for p in committed()}
        problems = [f"missing: {n}" for n in sorted(fresh.keys() - have.keys())]
        problems += [f"stale (no such proto): {n}" for n in sorted(have.keys() - fresh.keys())]
        problems += [
            f"differs from proto/: {n}"
            for n in sorted(fresh.keys() & have.keys())
            if not filecmp.cmp(fresh[n], have[n], shallow=False)
        ]
        return problems


def main() -> int:
    if "--check" in sys.argv[1:]:
        problems = differences()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run: python clients/python/generate_stubs.py", file=sys.stderr)
        return 1 if problems else 0
    # Generated into a scratch directory first: a missing grpcio-tools or a protoc error
    # leaves the committed stubs as they were.
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        for p in committed():
            p.unlink()
        for p in fresh:
            shutil.copyfile(p, STUBS / p.name)
            print((STUBS / p.name).relative_to(HERE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
