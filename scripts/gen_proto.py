#!/usr/bin/env python3
"""Generate the CometBFT v0.38 ABCI protobuf classes into ``medledger.consensus._proto``.

Sources are the ``.proto`` files of the pinned Go modules (never a copy in this repo):
``github.com/cometbft/cometbft@<version>/proto`` (``tendermint/abci/types.proto`` and
everything it imports) and ``github.com/cosmos/gogoproto@<version>`` (``gogo.proto``).
Both are located with ``go mod download -json`` (which downloads them into the module
cache when missing, e.g. on a machine where ``go install`` was never run); the
gogoproto version is the one cometbft's own ``go.mod`` requires.
``google/protobuf/*`` comes with grpcio-tools and the protobuf runtime.

Generated absolute imports (``from tendermint.crypto import proof_pb2``) are rewritten
to package imports (``from medledger.consensus._proto.tendermint.crypto import ...``) so
nothing is put on ``sys.path`` and no top-level ``tendermint`` package can clash.

Idempotent: a stamp file records the inputs; nothing is regenerated when it matches.
Usage: ``python scripts/gen_proto.py [--force] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

COMETBFT_MODULE = "github.com/cometbft/cometbft"
COMETBFT_VERSION = os.environ.get("COMETBFT_VERSION", "v0.38.25")
GOGOPROTO_MODULE = "github.com/cosmos/gogoproto"
ROOT_PROTO = "tendermint/abci/types.proto"
PACKAGE = "medledger.consensus._proto"
LOCAL_TOP_PACKAGES = ("tendermint", "gogoproto")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "medledger" / "consensus" / "_proto"
STAMP_NAME = "_generated.json"

_IMPORT_RE = re.compile(r'^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)"\s*;', re.MULTILINE)
_LOCAL_IMPORT_RE = re.compile(
    r"^(\s*)(from|import)\s+(" + "|".join(LOCAL_TOP_PACKAGES) + r")(\.|\s)", re.MULTILINE
)


def go_module_dir(module: str, version: str) -> Path:
    """Directory of ``module@version`` in the Go module cache, downloading it if needed."""
    if shutil.which("go") is None:
        sys.exit("gen_proto: 'go' not found on PATH (needed to locate the CometBFT protos)")
    env = dict(os.environ, GOFLAGS="-mod=mod", GO111MODULE="on")
    with tempfile.TemporaryDirectory() as cwd:  # outside any go.mod
        proc = subprocess.run(
            ["go", "mod", "download", "-json", f"{module}@{version}"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        sys.exit(f"gen_proto: go mod download {module}@{version} failed:\n{proc.stderr}")
    if proc.returncode != 0 or info.get("Error") or not info.get("Dir"):
        sys.exit(
            f"gen_proto: go mod download {module}@{version} failed: "
            f"{info.get('Error') or proc.stderr}"
        )
    return Path(info["Dir"])


def required_version(go_mod: Path, module: str) -> str:
    """The version of ``module`` that a ``go.mod`` file requires (honouring replace)."""
    text = go_mod.read_text()
    m = re.search(r"^\s*" + re.escape(module) + r"\s*=>\s*(\S+)\s+(v\S+)", text, re.MULTILINE)
    if m and m.group(1) == module:
        return m.group(2)
    m = re.search(r"^\s*(?:require\s+)?" + re.escape(module) + r"\s+(v\S+)", text, re.MULTILINE)
    if not m:
        sys.exit(f"gen_proto: {go_mod} does not require {module}")
    return m.group(1)


def proto_closure(root: str, include_dirs: list[Path]) -> list[tuple[str, Path]]:
    """``root`` and every non-google .proto it imports, transitively: (import name, file)."""
    seen: dict[str, Path] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen or name.startswith("google/protobuf/"):
            continue
        for inc in include_dirs:
            if (inc / name).is_file():
                seen[name] = inc / name
                break
        else:
            sys.exit(f"gen_proto: cannot find {name} in {[str(d) for d in include_dirs]}")
        todo.extend(_IMPORT_RE.findall(seen[name].read_text()))
    return sorted(seen.items())


def rewrite_imports(text: str) -> str:
    """``from tendermint.x import y`` -> ``from medledger.consensus._proto.tendermint.x ...``."""
    return _LOCAL_IMPORT_RE.sub(lambda m: f"{m[1]}{m[2]} {PACKAGE}.{m[3]}{m[4]}", text)


def fingerprint(files: list[tuple[str, Path]], protoc_version: str) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(protoc_version.encode())
    for name, path in files:
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def protoc_version() -> str:
    from grpc_tools import protoc  # noqa: F401  (fail early with a clear message)

    out = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def generate(out: Path, force: bool = False) -> bool:
    """Generate into ``out``; return True if files were (re)written."""
    try:
        import grpc_tools
    except ImportError:
        sys.exit("gen_proto: grpcio-tools is not installed (pip install -e '.[dev]')")
    comet = go_module_dir(COMETBFT_MODULE, COMETBFT_VERSION)
    gogo_version = required_version(comet / "go.mod", GOGOPROTO_MODULE)
    gogo = go_module_dir(GOGOPROTO_MODULE, gogo_version)
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    includes = [comet / "proto", gogo]
    files = proto_closure(ROOT_PROTO, includes)
    version = protoc_version()
    stamp = {
        "cometbft": f"{COMETBFT_MODULE}@{COMETBFT_VERSION}",
        "gogoproto": f"{GOGOPROTO_MODULE}@{gogo_version}",
        "protoc": version,
        "files": [name for name, _ in files],
        "fingerprint": fingerprint(files, version),
    }
    stamp_path = out / STAMP_NAME
    if not force and stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                print(f"gen_proto: {out} is up to date ({len(files)} protos, skipped)")
                return False
        except json.JSONDecodeError:
            pass

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *[f"-I{d}" for d in (*includes, wkt)],
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            *[name for name, _ in files],
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"gen_proto: protoc failed:\n{proc.stderr}")
        for path in tmp.rglob("*.py*"):
            path.write_text(rewrite_imports(path.read_text()))
        for d in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
            init = d / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated by scripts/gen_proto.py; do not edit."""\n')
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
        # Replace the old tree (keep .keep if the repo tracks one).
        if out.exists():
            for child in out.iterdir():
                if child.name == ".keep":
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        for child in tmp.iterdir():
            shutil.move(str(child), out / child.name)
    print(
        f"gen_proto: generated {len(files)} protos from {stamp['cometbft']} and "
        f"{stamp['gogoproto']} with {version} into {out}"
    )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output package directory")
    args = parser.parse_args(argv)
    generate(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
