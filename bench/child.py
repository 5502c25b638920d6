"""Helpers run in their own processes: ``verify <db>`` and ``abci <dir> <address> <log>``
(``address``: CometBFT's ``proxy_app``, ``tcp://HOST:PORT`` or ``unix://PATH``)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stats import peak_rss_mib


def verify(db: str) -> None:
    from medledger.node.verify import verify_store
    from medledger.storage.sqlite import SqliteStore
    store = SqliteStore(db)
    t0 = time.perf_counter()
    report = verify_store(store)
    took = time.perf_counter() - t0
    print(json.dumps({"seconds": took, "blocks": report.blocks, "txs": report.txs,
                      "bytes": report.bytes, "state_keys": report.state_keys,
                      "peak_rss_mib": peak_rss_mib(os.getpid())}))


def startcheck(home: str, workers: str) -> None:
    """The node's start check (``node/startcheck.py``) over a home, as ``node start`` runs it;
    also times its two halves (the ledger walk, the state digest) by wrapping them."""
    import resource

    from medledger.crypto import localseal
    from medledger.node import startcheck as sc
    from medledger.node.home import Home
    from medledger.storage.sqlite import SqliteStore
    h = Home(home)
    config = h.load_config()
    org = h.unlock_org(os.environ.get("MEDLEDGER_PASSWORD", "bench-password"))
    store = SqliteStore(h.db_path)
    store.set_seal_key(localseal.derive_seal_key(org.secret_root, config.chain))
    split: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                split[name] = time.perf_counter() - t
        return run

    sc._check_ledger = timed("ledger_s", sc._check_ledger)
    sc._check_state = timed("state_s", sc._check_state)
    t0 = time.perf_counter()
    report = sc.check_store(store, config.chain, None if workers == "auto" else int(workers))
    took = time.perf_counter() - t0
    print(json.dumps({"seconds": took, **split, "blocks": report.blocks, "txs": report.txs,
                      "bytes": report.tx_bytes, "audit_events": report.audit_events,
                      "state_entries": report.state_entries, "workers": workers,
                      # VmHWM: getrusage's maxrss survives exec, so it would report the
                      # parent's (a benchmark holding a 1M-record build) instead
                      "peak_rss_mib": peak_rss_mib(os.getpid()),
                      "worker_peak_rss_mib":  # the largest pool worker, same caveat (spawn)
                          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


async def abci(home: str, address: str, log_path: str) -> None:
    """One validator's application: LedgerApp + AbciServer; logs each commit's tx hashes."""
    from medledger.consensus.abci import AbciServer
    from medledger.node.ledger_app import LedgerApp
    from medledger.storage.sqlite import SqliteStore
    Path(home).mkdir(parents=True, exist_ok=True)
    app = LedgerApp(SqliteStore(Path(home) / "ledger.db"))
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def on_commit(applied, txs) -> None:  # type: ignore[no-untyped-def]
        hashes = ",".join(h.hex()[:16] for h, r in zip(applied.tx_hashes, applied.results,
                                                        strict=True) if r.code == 0)
        log.write(f"{time.time():.6f} {applied.header['height']} {hashes}\n")

    app.on_commit.append(on_commit)
    server = AbciServer.at(app, address)
    await server.start()
    print("ready", flush=True)
    await server.wait_stopped()


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "verify":
        verify(sys.argv[2])
    elif cmd == "startcheck":
        startcheck(sys.argv[2], sys.argv[3])
    elif cmd == "abci":
        asyncio.run(abci(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        raise SystemExit(f"unknown child command {cmd}")


if __name__ == "__main__":
    main()
