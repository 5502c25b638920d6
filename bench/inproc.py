"""In-process figures: embedded writes (1), authorised reads (3), verify (4), audit query (5)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rich.progress import Progress, TimeElapsedColumn

from bench.lab import Lab
from bench.stats import latency_ms, pct
from medledger.consensus.solo import SoloProducer
from medledger.crypto.canonical import canonical
from medledger.node.service import Node
from medledger.storage.sqlite import SqliteStore

# ------------------------------------------------------------------ figure 1 (in-process)

def write_pipeline(lab: Lab, txs: list[bytes], block: int = 2000) -> dict[str, Any]:
    """check_tx every tx, then finalize_block + commit per block; per-stage timing."""
    lat: list[float] = []
    stage = {"check_tx": 0.0, "finalize_block": 0.0, "commit": 0.0}
    t0 = time.perf_counter()
    for i in range(0, len(txs), block):
        chunk = txs[i:i + block]
        starts = []
        a = time.perf_counter()
        for raw in chunk:
            starts.append(time.perf_counter())
            r = lab.app.check_tx(raw, False)
            assert r.code == 0, r.log
        b = time.perf_counter()
        lab.time_ns = max(time.time_ns(), lab.time_ns + 1)
        out = lab.app.finalize_block(lab.store.height + 1, lab.time_ns, chunk, b"", b"")
        c = time.perf_counter()
        lab.app.commit()
        d = time.perf_counter()
        assert all(r.code == 0 for r in out.tx_results)
        stage["check_tx"] += b - a
        stage["finalize_block"] += c - b
        stage["commit"] += d - c
        lat.extend(d - s for s in starts)
    took = time.perf_counter() - t0
    n = len(txs)
    return {"txs": n, "seconds": took, "tx_per_s": n / took, **latency_ms(lat),
            "us_per_tx": {k: v / n * 1e6 for k, v in stage.items()}}


async def _solo(lab: Lab, txs: list[bytes], window: int) -> dict[str, Any]:
    producer = SoloProducer(lab.app)
    producer.last_time_ns = lab.time_ns
    producer.start()
    sem = asyncio.Semaphore(window)
    lat: list[float] = []
    heights: set[int] = set()

    async def one(raw: bytes) -> None:
        async with sem:
            t = time.perf_counter()
            c = await producer.submit(raw)
            lat.append(time.perf_counter() - t)
            assert c.code == 0, c.log
            heights.add(c.height)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(r) for r in txs))
    took = time.perf_counter() - t0
    await producer.stop()
    lab.time_ns = max(lab.time_ns, producer.last_time_ns)
    return {"txs": len(txs), "seconds": took, "tx_per_s": len(txs) / took, "blocks": len(heights),
            "in_flight": window, **latency_ms(lat)}


def write_solo(lab: Lab, txs: list[bytes], window: int = 4000) -> dict[str, Any]:
    """The embedded producer itself: ``window`` concurrent submitters, submit -> committed."""
    return asyncio.run(_solo(lab, txs, window))


# ------------------------------------------------------------------ figure 3 (in-process)

def make_node(lab: Lab) -> Node:
    return Node(lab.home, lab.home.load_config(), lab.store, lab.app, lab.org, blobs=lab.blobs)


def reads_inproc(lab: Lab, practitioner: Any, n: int = 5000) -> dict[str, Any]:
    node = make_node(lab)
    _, session = node.auth.login(practitioner)
    rng = random.Random(3)
    ids = [rng.choice(lab.records) for _ in range(n)]
    loop = asyncio.new_event_loop()
    for rid in ids[:200]:  # warm caches
        loop.run_until_complete(node.read(session, "Observation", rid))
    lat = []
    t0 = time.perf_counter()
    for rid in ids:
        t = time.perf_counter()
        stored = loop.run_until_complete(node.read(session, "Observation", rid))
        lat.append(time.perf_counter() - t)
        assert stored.resource["id"] == rid
    took = time.perf_counter() - t0
    loop.close()
    return {"reads": n, "reads_per_s": n / took, **latency_ms(lat),
            "audit_rows_written": n}


# ------------------------------------------------------------------ figure 4

def build_chain(root: Path, n: int) -> tuple[Lab, dict[str, Any]]:
    """A node home holding ``n`` record.put txs in blocks of 2000 (built through LedgerApp).

    Txs are sealed and signed on worker processes while the main process applies the
    blocks before (``Lab.stream_records``), on a store without fsync and with a 1 GiB page
    cache (``Lab(bulk=True)``): a throwaway chain; the figures measure what runs on it."""
    lab = Lab(root, org_id="org-chain", chain="medledger-bench-chain", bulk=True)
    lab.register_patients(1000)
    t0 = time.perf_counter()
    with Progress(*Progress.get_default_columns(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(f"building a {n:,}-record chain", total=n)
        split = lab.stream_records(n, "obs", lambda k: bar.advance(task, k))
    took = time.perf_counter() - t0
    lab.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db_mb = os.path.getsize(lab.home.db_path) / 1e6
    return lab, {"txs": n, "build_s": took, "build_tx_per_s": n / took, **split,
                 "apply_commit_tx_per_s": n / split["apply_commit_s"], "db_mb": db_mb,
                 "blobs_mb": os.path.getsize(lab.home.blobs_path) / 1e6}


def verify_child(db_path: Path) -> dict[str, Any]:
    """Run ``verify_store`` in a fresh process (clean peak RSS); returns its report."""
    out = subprocess.run([sys.executable, "-m", "bench.child", "verify", str(db_path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def startcheck_child(home: Path, workers: str = "auto") -> dict[str, Any]:
    """Run the node's start check over ``home`` in a fresh process; returns its report."""
    out = subprocess.run([sys.executable, "-m", "bench.child", "startcheck", str(home),
                          workers], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ------------------------------------------------------------------ figure 5

def _event(rng: random.Random, patient: str, recorded: str, node: str) -> bytes:
    return canonical({
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "recorded": recorded,
        "action": "R", "subtype": "read", "outcome": "0", "agent": f"dr-{rng.randrange(500)}",
        "agent_org": node, "agent_role": "physician", "patient": patient,
        "entity": [f"Observation/obs-{rng.randrange(10**7)}/_history/1"], "purpose": "TREAT",
        "reason": "", "node": node, "basis": "care", "break_glass": False, "detail": ""})


def audit_query(root: Path, n_events: int, queries: int = 2000) -> dict[str, Any]:
    """Bulk-load ``n_events`` into the anchored ``audit`` table, then time a patient's log."""
    path = root / f"audit-{n_events}.db"
    store = SqliteStore(path)
    store.db.execute("PRAGMA cache_size=-1500000")  # bulk-load only: 1.5 GB page cache
    n_patients = max(1000, n_events // 200)
    rng = random.Random(n_events)
    t0 = time.perf_counter()
    base = 1_700_000_000
    per_block, height = 5000, 0
    for start in range(0, n_events, 100_000):
        rows = []
        for i in range(start, min(n_events, start + 100_000)):
            patient = f"pat-{rng.randrange(n_patients)}"
            s = base + i // 20
            recorded = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{i % 20:06d}Z"
            if i % per_block == 0:
                height += 1
            rows.append((str(uuid.UUID(int=rng.getrandbits(128), version=4)), patient, recorded,
                         height, i % per_block, _event(rng, patient, recorded, "org-bench")))
        store.db.execute("BEGIN IMMEDIATE")
        store.db.executemany("INSERT INTO audit (event_id, patient, recorded, height, leaf, "
                             "event) VALUES (?, ?, ?, ?, ?, ?)", rows)
        store.db.execute("COMMIT")
    load_s = time.perf_counter() - t0
    store.close()
    store = SqliteStore(path)  # a node's normal connection (64 MiB cache) for the queries
    qrng = random.Random(7)
    patients = [f"pat-{qrng.randrange(n_patients)}" for _ in range(queries)]
    for p in patients[:100]:
        store.audit_for_patient(p, "", 100)
    lat, raw_lat, rows_seen = [], [], 0
    for p in patients:
        t = time.perf_counter()
        rows_seen += len(store.audit_for_patient(p, "", 100))
        lat.append(time.perf_counter() - t)
    for p in patients:  # the bare indexed SQL, nothing around it: the ceiling
        t = time.perf_counter()
        store.db.execute("SELECT event, height, recorded FROM audit WHERE patient = ? AND "
                         "recorded >= ? ORDER BY recorded DESC LIMIT ?", (p, "", 100)).fetchall()
        raw_lat.append(time.perf_counter() - t)
    store.close()
    size_mb = os.path.getsize(path) / 1e6
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return {"events": n_events, "patients": n_patients, "load_s": load_s,
            "load_rows_per_s": n_events / load_s, "db_mb": size_mb,
            "avg_rows_returned": rows_seen / queries, **latency_ms(lat),
            "raw_sql_p99_ms": pct(raw_lat, 99) * 1e3, "raw_sql_p50_ms": pct(raw_lat, 50) * 1e3}
