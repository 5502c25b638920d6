#!/usr/bin/env python3
"""Generate a Synthea population once and cache it in .tools/synthea-data (idempotent).

    python scripts/synthea_generate.py                 # -p 5 -s 42: tests and `make demo`
    python scripts/synthea_generate.py -p 50 -s 7      # the import benchmark's population

Runs ``java -cp '.tools/synthea/lib/*' App -p N -s SEED -cs SEED -r REFERENCE_DATE
Massachusetts`` (installing Synthea first with scripts/install_synthea.sh) and keeps
its FHIR output in ``.tools/synthea-data/p<N>-s<SEED>/fhir/``: one transaction Bundle
per patient, plus the ``hospitalInformation*`` and ``practitionerInformation*``
batch Bundles. The last line printed on stdout is that directory; progress goes to
stderr and Synthea's own log to ``synthea.log`` next to ``fhir/``.

The seed, the clinician seed and the reference date ("today" of the simulation) are
fixed, so the same command yields the same patients on every machine. Synthea's
defaults are kept otherwise (10 years of history, US Core 5.0.1, transaction
Bundles), so the files are what a Synthea user gets. ``-p 5 -s 42`` yields 9 records
(5 alive, 4 deceased) from 230 to 34,600 resources; the largest (a 102-year-old,
86 MB) is the big-import case.

A population already generated with the same settings is reused (``generated.json``
records the settings and the files); generation writes to a temporary directory
renamed into place, under a lock, so a crash or a concurrent run never leaves half a
population. Needs Java >= 11 (exit status 3 without it) and, to install Synthea the
first time, Maven.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"
LIB = TOOLS / "synthea" / "lib"
DATA = TOOLS / "synthea-data"
SYNTHEA_VERSION = "3.3.0"
REFERENCE_DATE = "20250101"
STATE = "Massachusetts"
MISSING_TOOL = 3
_PATIENT_LINE = re.compile(r"^\d+ -- .*\(\d+ y/o [MF]\)")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if shutil.which("java") is None:
        print("error: 'java' not found on PATH: Synthea needs Java >= 11 "
              "(apt-get install openjdk-17-jre-headless)", file=sys.stderr)
        return MISSING_TOOL
    installed = subprocess.run([str(ROOT / "scripts" / "install_synthea.sh")],
                               stdout=sys.stderr)  # needs Maven unless already installed
    if installed.returncode != 0:
        return installed.returncode
    settings = _settings(args)
    out = DATA / _dir_name(args)
    DATA.mkdir(parents=True, exist_ok=True)
    with open(DATA / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(out, settings):
            print(f"synthea population {out.name} already generated (skipped)", file=sys.stderr)
        else:
            _generate(out, settings, args)
    print(out / "fhir")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-p", "--population", type=int, default=5,
                        help="living patients to generate (deceased ones come on top)")
    parser.add_argument("-s", "--seed", type=int, default=42)
    parser.add_argument("-a", "--age", default=None, help="age range, e.g. 0-79")
    parser.add_argument("--history", type=int, default=None,
                        help="years of history to export (Synthea's default 10; 0 = all)")
    args = parser.parse_args(argv)
    if args.population < 1:
        parser.error("population must be at least 1")
    if args.age is not None and not re.fullmatch(r"\d{1,3}-\d{1,3}", args.age):
        parser.error("age must look like 0-79")
    return args


def _dir_name(args: argparse.Namespace) -> str:
    name = f"p{args.population}-s{args.seed}"
    if args.age is not None:
        name += f"-a{args.age}"
    if args.history is not None:
        name += f"-h{args.history}"
    return name


def _settings(args: argparse.Namespace) -> dict[str, object]:
    synthea_args = ["-p", str(args.population), "-s", str(args.seed), "-cs", str(args.seed),
                    "-r", REFERENCE_DATE]
    if args.age is not None:
        synthea_args += ["-a", args.age]
    if args.history is not None:
        synthea_args.append(f"--exporter.years_of_history={args.history}")
    return {"synthea": SYNTHEA_VERSION, "args": synthea_args, "state": STATE}


def _is_complete(out: Path, settings: dict[str, object]) -> bool:
    try:
        stamp = json.loads((out / "generated.json").read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("settings") != settings:
        return False
    files = stamp.get("files", {})
    return bool(files) and all(
        (out / "fhir" / name).is_file() and (out / "fhir" / name).stat().st_size == size
        for name, size in files.items())


def _generate(out: Path, settings: dict[str, object], args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=DATA))
    try:
        command = ["java", "-cp", f"{LIB}/*", "App", *settings["args"],  # type: ignore[misc]
                   f"--exporter.baseDirectory={tmp}/", STATE]
        print(f"generating {out.name} with Synthea {SYNTHEA_VERSION}: "
              f"{' '.join(command[3:-2])} ...", file=sys.stderr)
        started = time.monotonic()
        with open(tmp / "synthea.log", "w") as log:
            proc = subprocess.Popen(command, cwd=tmp, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if _PATIENT_LINE.match(line):
                    print(f"  {line.rstrip()}", file=sys.stderr)
            status = proc.wait()
        if status != 0:
            tail = (tmp / "synthea.log").read_text().splitlines()[-20:]
            raise SystemExit("error: Synthea failed (exit status "
                             f"{status}); last lines of its log:\n" + "\n".join(tail))
        fhir = tmp / "fhir"
        files = {p.name: p.stat().st_size for p in sorted(fhir.glob("*.json"))}
        if not files:
            raise SystemExit(f"error: Synthea wrote no FHIR files into {fhir}")
        stamp = {"settings": settings, "files": files,
                 "seconds": round(time.monotonic() - started, 1)}
        (tmp / "generated.json").write_text(json.dumps(stamp, indent=1) + "\n")
        shutil.rmtree(tmp / "metadata", ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        print(f"generated {len(files)} files ({sum(files.values()) / 1e6:.0f} MB) in "
              f"{stamp['seconds']} s into {out / 'fhir'}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
