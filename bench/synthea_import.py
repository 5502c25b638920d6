"""``python -m bench.synthea_import``: importing real Synthea output into medledger.

Measures what issue 10 asks: resources/s and MB/s, with the peak RSS of the node's
processes, for

- a population of at least 50 patients (``synthea_generate.py -p 50 -s 7``): the
  hospital and practitioner batches, then every patient Bundle over HTTP
  (``POST /fhir``) as a FHIR client loads a server: one after the other, or
  ``--clients N`` at a time as bulk loaders do;
- the single largest patient of the default population (``-p 5 -s 42``: 34,600
  resources, 86 MB) into a fresh node (after its directory batches);

embedded (one node, solo block producer) and, with ``--network``, on a 4-validator
CometBFT network of medledger nodes on this machine (loaded at org-1; the figure
counts until every node has committed the last Bundle). Populations are generated
once and cached (``.tools/synthea-data``). Figures go to ``bench/results/synthea.json``
and a table is printed: resources/s, MB/s, peak RSS, and the CPU seconds the node's
processes spent (node + validation workers; on the network, all four nodes): on a
shared machine wall-clock rates follow the load, CPU per resource much less so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds of processes and their children (the validation workers)."""
    total = 0.0
    for pid in pids:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        for one in [pid, *map(int, children)]:
            try:
                total += _cpu_s(one)
            except OSError:
                continue
    return total


def _timed_load(url: str, token: str, files: list[Path], label: str, pids: list[int],
                clients: int = 1) -> dict[str, Any]:
    """``load`` with the CPU its node processes spent and the load average around it."""
    before, load_before = _tree_cpu_s(pids), os.getloadavg()[0]
    figures = load(url, token, files, label, clients)
    cpu = _tree_cpu_s(pids) - before
    figures.update(node_cpu_s=cpu, node_cpu_ms_per_resource=cpu / figures["resources"] * 1e3,
                   load_avg_1m=[load_before, os.getloadavg()[0]])
    return figures


def _post(url: str, token: str, path: Path) -> None:
    resp = httpx.post(url + "/fhir", content=path.read_bytes(), timeout=7200,
                      headers={"Authorization": f"Bearer {token}",
                               "Content-Type": "application/fhir+json"})
    if resp.status_code != 200:
        raise RuntimeError(f"{path.name}: {resp.status_code} {resp.text[:500]}")


def load(url: str, token: str, files: list[Path], label: str, clients: int = 1
         ) -> dict[str, Any]:
    """Post ``files`` in order, or with ``clients`` > 1 that many at a time (a bulk
    loader's way: the node overlaps one Bundle's validation with another's sealing and
    commit)."""
    entries = sum(_entries(p) for p in files)
    size = sum(p.stat().st_size for p in files)
    started = time.perf_counter()
    done = 0

    def post(path: Path) -> None:
        nonlocal done
        _post(url, token, path)
        done += 1
        print(f"  {label}: {done}/{len(files)} bundles, "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max(1, clients)) as pool:
        list(pool.map(post, files))
    seconds = time.perf_counter() - started
    return {"bundles": len(files), "resources": entries, "mb": size / 1e6,
            "seconds": seconds, "resources_per_s": entries / seconds,
            "mb_per_s": size / 1e6 / seconds, "clients": clients}


def embedded(work: Path, directory: list[Path], patients: list[Path], label: str,
             workers: int, clients: int = 1) -> dict[str, Any]:
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
        figures = _timed_load(node.url, token, patients, label, [node.proc.pid], clients)
        figures["peak_rss_mib"] = _tree_peak_rss(node.proc.pid)
        figures["validation_workers"] = workers
        return figures
    finally:
        node.stop()


def on_network(work: Path, directory: list[Path], patients: list[Path], label: str,
               clients: int = 1) -> dict[str, Any]:
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
        figures = _timed_load(urls[0], token, patients, label, [p.pid for p in procs],
                              clients)
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
        network.stop_and_reap(net, procs)


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
    parser.add_argument("--clients", type=int, default=1,
                        help="concurrent HTTP clients posting the patient Bundles")
    parser.add_argument("--skip-population", action="store_true")
    parser.add_argument("--skip-largest", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"load_avg_at_start": list(os.getloadavg()),
                               "cpus": os.cpu_count()}
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
                                                        args.workers, args.clients)
                print(json.dumps(results[f"{label}_embedded"], indent=1), file=sys.stderr)
            if args.network:
                print(f"» {label}: 4-validator network", file=sys.stderr)
                results[f"{label}_network"] = on_network(work, directory, patients, label,
                                                         args.clients)
                print(json.dumps(results[f"{label}_network"], indent=1), file=sys.stderr)
    results["load_avg_at_end"] = list(os.getloadavg())
    RESULTS.mkdir(exist_ok=True)
    name = "synthea-network.json" if args.no_embedded else "synthea.json"
    (RESULTS / name).write_text(json.dumps(results, indent=1) + "\n")
    _print_table(results)
    print(f"figures written to {RESULTS / name}")


def _worker_peak(rss: dict[str, float]) -> float:
    return max((v for k, v in rss.items() if k != "node"), default=0.0)


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Synthea import (issue 10)")
    for column in ("run", "bundles", "resources", "MB", "resources/s", "MB/s",
                   "CPU ms/resource", "peak RSS MiB (node / worker)", "load 1m"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for label, f in results.items():
        if not isinstance(f, dict) or "resources" not in f:
            continue
        rss = f["peak_rss_mib"]
        nodes = rss.values() if "node" not in rss else [rss]
        peak = " | ".join(f"{n['node']:.0f} / {_worker_peak(n):.0f}" for n in nodes)
        rate = f.get("resources_per_s_all_nodes", f["resources_per_s"])
        clients = f" ({f['clients']} clients)" if f.get("clients", 1) > 1 else ""
        table.add_row(label + clients, str(f["bundles"]), f"{f['resources']:,}", f"{f['mb']:.1f}",
                      f"{rate:,.0f}", f"{f['mb'] / f['resources'] * rate:.2f}",
                      f"{f['node_cpu_ms_per_resource']:.2f}", peak,
                      "{:.1f}-{:.1f}".format(*f["load_avg_1m"]))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
