"""``python -m bench.synthea_import``: importing real Synthea output into medledger.

Measures what issue 10 asks: resources/s and MB/s, with the peak RSS of the node's
processes, for

- a population of at least 50 patients (``synthea_generate.py -p 50 -s 7``): the
  hospital and practitioner batches, then every patient Bundle, one after the other
  over HTTP (``POST /fhir``) as a FHIR client loads a server;
- the single largest patient of the default population (``-p 5 -s 42``: 34,600
  resources, 86 MB) into a fresh node (after its directory batches);

embedded (one node, solo block producer) and, with ``--network``, on a 4-validator
CometBFT network of medledger nodes on this machine (loaded at org-1; the figure
counts until every node has committed the last Bundle). Populations are generated
once and cached (``.tools/synthea-data``). Figures go to ``bench/results/synthea.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.http import NodeProcess
from bench.lab import PASSWORD
from bench.stats import peak_rss_mib
from medledger.client import Client
from medledger.node.home import Home, init_home

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def population(n: int, seed: int) -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "synthea_generate.py"),
                          "-p", str(n), "-s", str(seed)], check=True, capture_output=True,
                         text=True).stdout
    return Path(out.strip().splitlines()[-1])


def _files(fhir: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(fhir.glob("*.json"), key=lambda p: p.stat().st_size)
    directory = [p for p in files if p.name.startswith(("hospitalInformation",
                                                         "practitionerInformation"))]
    directory.sort(key=lambda p: not p.name.startswith("hospital"))
    return directory, [p for p in files if p not in directory]


def _entries(path: Path) -> int:
    return len(orjson.loads(path.read_bytes())["entry"])


def _tree_peak_rss(pid: int) -> dict[str, float]:
    """VmHWM of a process and each of its children (the validation workers), MiB."""
    out = {"node": peak_rss_mib(pid)}
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for i, child in enumerate(children):
        try:
            out[f"worker{i}"] = peak_rss_mib(int(child))
        except OSError:
            continue
    return out


def _post(url: str, token: str, path: Path) -> None:
    resp = httpx.post(url + "/fhir", content=path.read_bytes(), timeout=7200,
                      headers={"Authorization": f"Bearer {token}",
                               "Content-Type": "application/fhir+json"})
    if resp.status_code != 200:
        raise RuntimeError(f"{path.name}: {resp.status_code} {resp.text[:500]}")


def load(url: str, token: str, files: list[Path], label: str) -> dict[str, Any]:
    entries = sum(_entries(p) for p in files)
    size = sum(p.stat().st_size for p in files)
    started = time.perf_counter()
    for i, path in enumerate(files):
        _post(url, token, path)
        print(f"  {label}: {i + 1}/{len(files)} bundles, "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    return {"bundles": len(files), "resources": entries, "mb": size / 1e6,
            "seconds": seconds, "resources_per_s": entries / seconds,
            "mb_per_s": size / 1e6 / seconds}


def embedded(work: Path, directory: list[Path], patients: list[Path], label: str,
             workers: int) -> dict[str, Any]:
    """A fresh solo node: the directory batches (not timed), then ``patients`` (timed)."""
    port = _free_port()
    home = init_home(work / label, "org-bench", "Bench Hospital", PASSWORD,
                     chain="medledger-bench", port=port, scrypt_n=2**12)
    config = home.load_config()
    config.extra["validation_workers"] = workers
    home.save_config(config)
    node = NodeProcess(home.path, port, work / f"{label}.log")
    try:
        org = Home(home.path).unlock_org(PASSWORD)
        with Client(node.url, org) as c:
            token = c.token()
        load(node.url, token, directory, f"{label} directory")
        figures = load(node.url, token, patients, label)
        figures["peak_rss_mib"] = _tree_peak_rss(node.proc.pid)
        figures["validation_workers"] = workers
        return figures
    finally:
        node.stop()


def on_network(work: Path, directory: list[Path], patients: list[Path], label: str
               ) -> dict[str, Any]:
    """A fresh 4-validator network: load at org-1, time until all four have committed."""
    from medledger.node import network

    net = network.create_network(work / f"net-{label}", 4, PASSWORD,
                                 chain="medledger-bench-synthea", scrypt_n=2**12)
    procs = network.start_members(net, [0, 1, 2, 3], PASSWORD, die_with_parent=True)
    try:
        urls = [m.api_url for m in net.members]
        org = network.org_identity(net.members[0], PASSWORD)
        with Client(urls[0], org) as c:
            token = c.token()
        load(urls[0], token, directory, f"{label} directory")
        figures = load(urls[0], token, patients, label)
        target = httpx.get(urls[0] + "/ledger/status", timeout=10).json()["height"]
        started = time.perf_counter()
        while min(httpx.get(u + "/ledger/status", timeout=10).json()["height"]
                  for u in urls) < target:
            time.sleep(0.2)
        figures["all_nodes_committed_after_s"] = time.perf_counter() - started
        seconds = figures["seconds"] + figures["all_nodes_committed_after_s"]
        figures["resources_per_s_all_nodes"] = figures["resources"] / seconds
        figures["peak_rss_mib"] = {m.org_id: _tree_peak_rss(p.pid)
                                   for m, p in zip(net.members, procs, strict=False)}
        return figures
    finally:
        network.stop_network(net, timeout=10)
        for p in procs:
            if p.poll() is None:
                p.kill()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", action="store_true", help="also on 4 validators")
    parser.add_argument("--no-embedded", action="store_true", help="only on 4 validators")
    parser.add_argument("--patients", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2, help="validation workers")
    parser.add_argument("--skip-population", action="store_true")
    parser.add_argument("--skip-largest", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"load_avg_at_start": list(__import__("os").getloadavg())}
    with tempfile.TemporaryDirectory(prefix="medledger-bench-synthea-") as tmp:
        work = Path(tmp)
        runs = []
        if not args.skip_population:
            directory, patients = _files(population(args.patients, args.seed))
            runs.append((f"population_p{args.patients}_s{args.seed}", directory, patients))
        if not args.skip_largest:
            directory, patients = _files(population(5, 42))
            runs.append(("largest_patient", directory, patients[-1:]))
        for label, directory, patients in runs:
            if not args.no_embedded:
                print(f"» {label}: {len(patients)} bundles, embedded", file=sys.stderr)
                results[f"{label}_embedded"] = embedded(work, directory, patients, label,
                                                        args.workers)
                print(json.dumps(results[f"{label}_embedded"], indent=1), file=sys.stderr)
            if args.network:
                print(f"» {label}: 4-validator network", file=sys.stderr)
                results[f"{label}_network"] = on_network(work, directory, patients, label)
                print(json.dumps(results[f"{label}_network"], indent=1), file=sys.stderr)
    results["load_avg_at_end"] = list(__import__("os").getloadavg())
    RESULTS.mkdir(exist_ok=True)
    name = "synthea-network.json" if args.no_embedded else "synthea.json"
    (RESULTS / name).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
