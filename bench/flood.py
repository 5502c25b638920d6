"""Login and search flood (issue 9, item 2): other clients' read latency while 16 clients
flood ``/auth/login`` (wrong passwords) and type-wide searches, against a real node
process on loopback. Bounded in time (``--seconds`` per phase) and in clients.

``python -m bench.flood`` prints the readers' p50/p99 without and with the flood, and what
the flooders got (401 wrong password, 429 throttled, 503 busy, 200 search pages). The 4
readers are ordinary users by default: 25 reads a second each on a fixed schedule,
latency taken from the scheduled time; ``--reader-rate 0`` sends their reads back to
back instead (then the readers saturate the node themselves and their p99 alone is
mostly their own queueing).
Figures on a shared 2-core machine are noisy: compare the two phases of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from rich.console import Console
from rich.table import Table

from bench import http, loadgen
from bench.lab import Lab
from bench.stats import latency_ms

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _client(url: str, make: Any, until: float, out: loadgen.Outcome,
                  rate: float = 0.0) -> None:
    """One keep-alive client sending ``make()`` requests until ``until``: back to back
    (``rate`` 0), or ``rate`` requests a second on a fixed schedule, each latency taken
    from the request's scheduled time (a stalled node cannot hide behind a late send)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port, limit=2**24)
    due = time.perf_counter() + (random.random() / rate if rate else 0.0)
    try:
        while due < until:
            if rate:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            data = loadgen.encode(f"{host}:{port}", make())
            t = due if rate else time.perf_counter()
            status, _ = await loadgen._one(reader, writer, data)
            now = time.perf_counter()
            out.latencies.append(now - t)
            out.statuses[status] = out.statuses.get(status, 0) + 1
            due = due + 1 / rate if rate else now
    finally:
        writer.close()


async def _phase(url: str, tok: str, records: list[str], seconds: float, flood: bool,
                 reader_rate: float = 0.0) -> dict[str, Any]:
    """The readers here; the flooders (if any) in a process of their own, as they would be
    on other machines: their client-side work must not delay the readers' own requests
    and answers in this process."""
    rng = random.Random(7)
    auth = {"Authorization": f"Bearer {tok}"}
    readers = loadgen.Outcome()
    flooders = None
    if flood:
        ctx = multiprocessing.get_context("fork")
        start, (result, sink) = ctx.Event(), ctx.Pipe(duplex=False)
        flooders = ctx.Process(target=_flood_process, args=(url, tok, seconds, start, sink))
        flooders.start()
        start.wait(30)  # the flooders are connected: go
    until = time.perf_counter() + seconds
    await asyncio.gather(*(_client(url, lambda: ("GET",
                                                 f"/fhir/Observation/{rng.choice(records)}",
                                                 auth, None), until, readers, reader_rate)
                           for _ in range(4)))
    flood_doc: dict[str, Any] = {"login_flood": {"n": 0, "statuses": {}},
                                 "search_flood": {"n": 0, "statuses": {}}}
    if flooders is not None:
        flood_doc = result.recv()
        flooders.join()
    return {"readers": {**latency_ms(readers.latencies), "n": len(readers.latencies),
                        "statuses": readers.statuses}, **flood_doc}


def _flood_process(url: str, tok: str, seconds: float, start: Any, sink: Any) -> None:
    """8 clients sending wrong passwords and 8 running type-wide searches, back to back."""
    sink.send(asyncio.run(_flood(url, tok, seconds, start)))


async def _flood(url: str, tok: str, seconds: float, start: Any) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {tok}"}
    logins, searches = loadgen.Outcome(), loadgen.Outcome()
    n = iter(range(10**9))
    start.set()
    until = time.perf_counter() + seconds
    tasks = [_client(url, lambda: ("POST", "/auth/login", {"Content-Type": "application/json"},
                                   orjson.dumps({"id": f"user-{next(n) % 50}",
                                                 "password": "wrong-password"})),
                     until, logins) for _ in range(8)]
    tasks += [_client(url, lambda: ("GET", "/fhir/Observation?_count=20", auth, None),
                      until, searches) for _ in range(8)]
    await asyncio.gather(*tasks)
    return {"login_flood": {"n": len(logins.latencies), "statuses": logins.statuses},
            "search_flood": {"n": len(searches.latencies), "statuses": searches.statuses,
                             **(latency_ms(searches.latencies) if searches.latencies else {})}}


def _wait_index(url: str, tok: str, console: Console, timeout: float = 300) -> None:
    """Wait until the restarted node's search index has caught up with its ledger (until
    then searches answer 503 and the index thread competes with the readers)."""
    deadline = time.monotonic() + timeout
    with console.status("waiting for the search index to catch up"):
        while time.monotonic() < deadline:
            resp = httpx.get(f"{url}/fhir/Observation?_count=1", timeout=30,
                             headers={"Authorization": f"Bearer {tok}"})
            if resp.status_code == 200:
                return
            time.sleep(0.5)
    raise SystemExit(f"the search index did not catch up within {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--reader-rate", type=float, default=25.0,
                    help="requests a second per reader, on a fixed schedule (ordinary "
                         "users); 0 = back to back (the readers saturate the node "
                         "themselves)")
    args = ap.parse_args()
    console = Console(width=160)
    work = Path(tempfile.mkdtemp(prefix="medledger-flood-"))
    port = _free_port()
    try:
        lab = Lab(work / "node", port=port)
        lab.register_patients(100)
        prac = lab.register_practitioner("dr-flood", "physician")
        lab.load_records(args.records, "flood")
        records = list(lab.records)
        lab.close()
        node = http.NodeProcess(lab.home.path, port, work / "node.log")
        try:
            tok = http.token(node.url, prac)
            _wait_index(node.url, tok, console)
            asyncio.run(_phase(node.url, tok, records, 2, False))  # warm-up
            quiet = asyncio.run(_phase(node.url, tok, records, args.seconds, False,
                                       args.reader_rate))
            flood = asyncio.run(_phase(node.url, tok, records, args.seconds, True,
                                       args.reader_rate))
        finally:
            node.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = Table("phase", "reader p50 ms", "reader p99 ms", "reads", "logins (statuses)",
                  "searches (statuses)", "search p99 ms")
    readers = (f"4 readers at {args.reader_rate:g}/s each" if args.reader_rate
               else "4 back-to-back readers")
    for name, r in ((f"{readers}, alone", quiet), ("+ 8 login + 8 search flooders", flood)):
        table.add_row(name, f"{r['readers']['p50_ms']:.1f}", f"{r['readers']['p99_ms']:.1f}",
                      f"{r['readers']['n']:,}",
                      f"{r['login_flood']['n']:,} {r['login_flood']['statuses']}",
                      f"{r['search_flood']['n']:,} {r['search_flood']['statuses']}",
                      f"{r['search_flood'].get('p99_ms', 0):.0f}")
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    name = "flood-paced.json" if args.reader_rate else "flood-back-to-back.json"
    (RESULTS / name).write_bytes(orjson.dumps(
        {"seconds": args.seconds, "records": args.records, "reader_rate": args.reader_rate,
         "quiet": quiet, "flood": flood},
        option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


if __name__ == "__main__":
    main()
