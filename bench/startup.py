"""``python -m bench.startup [--sizes 20000,100000,1000000]``: a node's start-up check time
against ledger size. For each size a chain of record.put txs (blocks of 2000, built through
LedgerApp like ``make bench``'s figure 4) is checked by ``node/startcheck.py`` in a fresh
process, inline and with the process pool, and by the full ``verify`` replay (sizes up to
``--verify-up-to``). Prints a table (start check seconds, split into the ledger walk and
the state digest; peak RSS of the checking process, and of its largest pool worker) and
writes ``bench/results/startup.json``."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from bench import inproc

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20000,100000")
    ap.add_argument("--verify-up-to", type=int, default=200_000,
                    help="also time the full verify replay for sizes up to this")
    args = ap.parse_args()
    console = Console(width=160)
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.sizes.split(",")):
        work = Path(tempfile.mkdtemp(prefix="medledger-startup-"))
        try:
            lab, built = inproc.build_chain(work / "chain", n)
            lab.close()
            console.print(f"built {n:,} records in {built['build_s']:.0f}s (applying blocks "
                          f"{built['apply_commit_s']:.0f}s, waiting for txs "
                          f"{built['wait_generate_s']:.0f}s): ledger {built['db_mb']:.0f} MB, "
                          f"blobs {built['blobs_mb']:.0f} MB; load average {_load()}")
            inline = inproc.startcheck_child(lab.home.path, "0")
            pool = inproc.startcheck_child(lab.home.path, "auto")
            verify = (inproc.verify_child(lab.home.db_path)  # the full replay, same store
                      if n <= args.verify_up_to else None)
            rows.append({"records": n, "db_mb": built["db_mb"], "build": built,
                         "inline": inline, "pool": pool, "verify": verify, "load": _load()})
            console.print(rows[-1])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    table = Table("records", "build s", "db MB", "blocks", "tx MB", "state entries",
                  "inline s (ledger / state)", "pool s (ledger / state)", "peak RSS MiB",
                  "verify s", "verify / pool")
    for r in rows:
        p, i = r["pool"], r["inline"]
        table.add_row(f"{r['records']:,}", f"{r['build']['build_s']:.0f}", f"{r['db_mb']:.0f}",
                      f"{p['blocks']:,}", f"{p['bytes'] / 1e6:.0f}", f"{p['state_entries']:,}",
                      _split(i), _split(p),
                      f"{i['peak_rss_mib']:.0f} / {p['peak_rss_mib']:.0f}+"
                      f"{p['worker_peak_rss_mib']:.0f}",
                      f"{r['verify']['seconds']:.1f}" if r["verify"] else "-",
                      f"{r['verify']['seconds'] / p['seconds']:.1f}x" if r["verify"] else "-")
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))


def _split(run: dict[str, Any]) -> str:
    return f"{run['seconds']:.1f} ({run['ledger_s']:.1f} / {run['state_s']:.1f})"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
