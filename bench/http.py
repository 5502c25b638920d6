"""Figures over HTTP against a real node process: writes (1), reads (3), bundles (6), memory."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import loadgen
from bench.lab import PASSWORD
from bench.stats import latency_ms, peak_rss_mib
from medledger.cli.demo import start_node_process, stop_node_process, wait_healthy
from medledger.client import Client
from medledger.crypto import keys
from medledger.fhir.synthetic import synthetic_observation, synthetic_patient_bundle


class NodeProcess:
    """``medledger node start`` for a home, in its own process (solo mode)."""

    def __init__(self, home: Path, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = start_node_process(home, log, PASSWORD, port)
        try:
            wait_healthy(self.url, self.proc, timeout=60)
            self.wait_indexed()
        except Exception:
            self.stop()
            raise

    def wait_indexed(self, timeout: float = 600) -> None:
        """Until the search index has caught up with the ledger (``/readyz``): a node
        opened on a home built in-process indexes every record at start, and writes
        measured meanwhile would share the cores with that catch-up."""
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                doc = httpx.get(self.url + "/readyz", timeout=10).json()
            except (httpx.HTTPError, ValueError):  # busy indexing: ask again
                time.sleep(0.5)
                continue
            if doc.get("search_index_height", doc["height"]) >= doc["height"]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"search index not caught up after {timeout:.0f} s: {doc}")

    @property
    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.proc.pid)

    def stop(self) -> None:
        stop_node_process(self.proc)


def token(url: str, identity: keys.Identity) -> str:
    with Client(url, identity) as c:
        return c.token()


Request = loadgen.Request


def drive(url: str, requests: Sequence[Request], concurrency: int, what: str,
          unit: str) -> dict[str, Any]:
    """Send ``requests`` over ``concurrency`` keep-alive connections (bench.loadgen).
    ``client_cpu_us_per_request``: the load generator's own CPU (it shares the cores)."""
    cpu0 = time.process_time()
    out = asyncio.run(loadgen.run(url, requests, concurrency))
    client_cpu = time.process_time() - cpu0
    if out.errors:
        raise RuntimeError(f"{what}: {out.statuses}; first error: {out.errors[0][:500]!r}")
    return {"requests": len(requests), "concurrency": concurrency, "seconds": out.seconds,
            f"{unit}_per_s": len(requests) / out.seconds, **latency_ms(out.latencies),
            "statuses": out.statuses, "client": "bench.loadgen (raw HTTP/1.1 keep-alive)",
            "client_cpu_us_per_request": client_cpu / max(1, len(requests)) * 1e6}


def fhir_writes(url: str, tok: str, patients: list[str], n: int, concurrency: int = 32
                ) -> dict[str, Any]:
    hdrs = {"Authorization": f"Bearer {tok}", "Content-Type": "application/fhir+json"}
    reqs: list[Request] = [
        ("POST", "/fhir/Observation", hdrs,
         orjson.dumps(synthetic_observation(patients[i % len(patients)], 10**6 + i)))
        for i in range(n)]
    return drive(url, reqs, concurrency, "POST /fhir/Observation", "writes")


def presigned_writes(url: str, tok: str, raws: list[bytes], concurrency: int = 64
                     ) -> dict[str, Any]:
    """Pre-signed txs relayed with a member organisation's token (the raw ledger API is
    members-only: a tx's signer or a member submits it)."""
    hdrs = {"Content-Type": "application/octet-stream", "Authorization": f"Bearer {tok}"}
    reqs: list[Request] = [("POST", "/ledger/tx", hdrs, raw) for raw in raws]
    return drive(url, reqs, concurrency, "POST /ledger/tx", "writes")


def reads(url: str, tok: str, records: list[str], n: int, concurrency: int = 32
          ) -> dict[str, Any]:
    hdrs = {"Authorization": f"Bearer {tok}"}
    rng = random.Random(5)
    reqs: list[Request] = [("GET", f"/fhir/Observation/{rng.choice(records)}", hdrs, None)
                           for _ in range(n)]
    drive(url, reqs[:200], concurrency, "warm-up reads", "reads")
    return drive(url, reqs, concurrency, "GET /fhir/Observation/{id}", "reads")


def bundles(url: str, tok: str, n: int, concurrency: int = 4, seed0: int = 500
            ) -> dict[str, Any]:
    hdrs = {"Authorization": f"Bearer {tok}", "Content-Type": "application/fhir+json"}
    docs = [synthetic_patient_bundle(seed0 + i, n_encounters=3) for i in range(n)]
    resources = sum(len(d["entry"]) for d in docs)
    reqs: list[Request] = [("POST", "/fhir", hdrs, orjson.dumps(d)) for d in docs]
    out = drive(url, reqs, concurrency, "POST /fhir (transaction Bundle)", "bundles")
    out["resources"] = resources
    out["resources_per_s"] = resources / out["seconds"]
    out["resources_per_bundle"] = resources / n
    out["bundle_kib"] = sum(len(r[3] or b"") for r in reqs) / n / 1024
    return out
