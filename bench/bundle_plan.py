"""``python -m bench.bundle_plan [FILE ...]``: cost of planning real Synthea Bundles.

For each file (default: the largest patient of the generated population, see
scripts/synthea_generate.py) a fresh child process reads the bytes, plans the Bundle
with :func:`medledger.fhir.bundle.plan_bundle` (conditional references answered from
the population's directory batches, as the node's index would) and reports entries,
seconds, resources/s, MB/s and memory: the RSS before planning (interpreter, models,
the body's bytes), its peak while planning and what the finished plan holds. Planning
is parse + FHIR validation + reference resolution: the part of an import that happens
before any sealing or ledger work.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _child(path: Path) -> dict[str, Any]:
    import orjson

    from medledger.fhir.bundle import bundle_match, plan_bundle
    from medledger.fhir.validate import resource_model

    directory = [e["resource"] for p in path.parent.glob("*Information*.json")
                 for e in orjson.loads(p.read_bytes())["entry"]]
    for rtype in ("Patient", "Encounter", "Observation", "Claim", "ExplanationOfBenefit",
                  "DiagnosticReport", "DocumentReference", "Procedure", "Provenance"):
        resource_model(rtype)  # model classes built up front: not part of the figure
    data = path.read_bytes()
    gc.collect()
    before = _rss_mib()
    ids = itertools.count()
    started = time.perf_counter()
    cpu = time.process_time()
    plan = plan_bundle(data, lambda: f"n{next(ids)}",
                       lambda q: [r["id"] for r in directory if bundle_match(q, r)])
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del data
    gc.collect()
    return {"file": path.name, "mb": path.stat().st_size / 1e6, "entries": len(plan.entries),
            "seconds": seconds, "cpu_seconds": cpu,
            "resources_per_s": len(plan.entries) / seconds,
            "mb_per_s": path.stat().st_size / 1e6 / seconds,
            "rss_before_mib": before, "peak_rss_mib": peak, "plan_held_mib": _rss_mib() - before}


def _default_file() -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "synthea_generate.py")],
                         check=True, capture_output=True, text=True).stdout
    fhir = Path(out.strip().splitlines()[-1])
    patients = [p for p in fhir.glob("*.json") if "Information" not in p.name]
    return max(patients, key=lambda p: p.stat().st_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child)))
        return
    for path in args.files or [_default_file()]:
        out = subprocess.run([sys.executable, "-m", "bench.bundle_plan", "--child", str(path)],
                             check=True, capture_output=True, text=True, cwd=ROOT).stdout
        r = json.loads(out)
        print(f"{r['file'][:48]:48} {r['mb']:6.1f} MB {r['entries']:6d} entries "
              f"{r['seconds']:6.1f} s ({r['cpu_seconds']:.1f} s CPU) "
              f"{r['resources_per_s']:6.0f} res/s {r['mb_per_s']:5.2f} MB/s | RSS before "
              f"{r['rss_before_mib']:.0f} MiB, peak {r['peak_rss_mib']:.0f} MiB "
              f"(+{r['peak_rss_mib'] - r['rss_before_mib']:.0f}), plan holds "
              f"{r['plan_held_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
