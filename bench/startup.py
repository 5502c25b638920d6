"""``python -m bench.startup [--sizes 20000,100000,1000000]``: a node's start-up check time
against ledger size. For each size a chain of record.put txs (blocks of 2000, built through
LedgerApp like ``make bench``'s figure 4) is checked by ``node/startcheck.py`` in a fresh
process, inline and with the process pool, and by the full ``verify`` replay. Prints a
table and writes ``bench/results/startup.json``."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
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
            t0 = time.perf_counter()
            lab, built = inproc.build_chain(work / "chain", n)
            lab.close()
            console.print(f"built {n:,} txs in {time.perf_counter() - t0:.0f}s "
                          f"({built['db_mb']:.0f} MB)")
            inline = inproc.startcheck_child(lab.home.path, "0")
            pool = inproc.startcheck_child(lab.home.path, "auto")
            verify = (inproc.verify_child(lab.home.db_path)  # the full replay, same store
                      if n <= args.verify_up_to else None)
            rows.append({"records": n, "db_mb": built["db_mb"], "inline": inline,
                         "pool": pool, "verify": verify})
            console.print(rows[-1])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    table = Table("records", "db MB", "blocks", "tx MB", "inline s", "pool s", "pool MB/s",
                  "verify s", "verify / pool")
    for r in rows:
        p = r["pool"]
        table.add_row(f"{r['records']:,}", f"{r['db_mb']:.0f}", f"{p['blocks']:,}",
                      f"{p['bytes'] / 1e6:.0f}", f"{r['inline']['seconds']:.2f}",
                      f"{p['seconds']:.2f}", f"{p['bytes'] / 1e6 / p['seconds']:.0f}",
                      f"{r['verify']['seconds']:.1f}" if r["verify"] else "-",
                      f"{r['verify']['seconds'] / p['seconds']:.1f}x" if r["verify"] else "-")
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
