"""CPU per tx of one validator's application, through the ABCI request mapping.

``python -m bench.abci_cost`` drives ``RequestHandler`` (the ABCI server's request ->
response mapping, ``consensus/abci.py``) over a ``LedgerApp`` in this process, with the
protobuf bytes CometBFT would send: every tx is CheckTx'd once when it arrives (by RPC
or gossip), waits in a mempool of ``--backlog`` txs that is rechecked after every block,
and is then finalized in a block of ``--block`` txs and committed. It reports CPU
seconds (``time.process_time``: time waiting for a core on a busy machine is not
counted) per tx for each phase, so a change to the app's per-tx cost can be measured
apart from the socket, CometBFT and the machine's load. The network figure
(``bench.network``) measures the whole.

The txs are ``bench.network``'s workload: 200 patient registrations, then ``record.put``
txs by one organisation (~510 B each).
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from bench.network import CHAIN, Workload, medledger_workload
from medledger.consensus.abci import RequestHandler, frame, pb
from medledger.crypto import keys
from medledger.crypto.canonical import canonical
from medledger.node.home import org_genesis_entry
from medledger.node.ledger_app import LedgerApp
from medledger.storage.sqlite import SqliteStore

T0_NS = 1_700_000_000 * 1_000_000_000


def _check(tx: bytes, recheck: bool = False) -> bytes:
    kind = pb.RECHECK if recheck else pb.NEW
    return pb.Request(check_tx=pb.RequestCheckTx(tx=tx, type=kind)).SerializeToString()


def _finalize(height: int, txs: list[bytes]) -> bytes:
    req = pb.RequestFinalizeBlock(txs=txs, height=height, hash=height.to_bytes(32, "big"))
    req.time.seconds = T0_NS // 1_000_000_000 + height
    return pb.Request(finalize_block=req).SerializeToString()


_COMMIT = pb.Request(commit=pb.RequestCommit()).SerializeToString()


class Driver:
    """Feeds serialized requests to the handler as the socket server does; counts CPU."""

    def __init__(self, handler: RequestHandler) -> None:
        self.handler = handler
        self.cpu: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.samples: dict[str, list[float]] = {}  # CPU per tx of each call batch

    def call(self, data: bytes) -> pb.Response:
        resp = self.handler.handle(pb.Request.FromString(data))
        frame(resp.SerializeToString())
        return resp

    def timed(self, phase: str, requests: list[bytes], n: int) -> list[pb.Response]:
        t = time.process_time()
        out = [self.call(r) for r in requests]
        took = time.process_time() - t
        self.cpu[phase] = self.cpu.get(phase, 0.0) + took
        self.count[phase] = self.count.get(phase, 0) + n
        if n:
            self.samples.setdefault(phase, []).append(took / n)
        return out


def workload(n_txs: int, cache: Path | None) -> tuple[list[keys.Identity], Workload]:
    """The orgs and txs, generated (~5 ms of CPU per tx) or loaded from ``cache``."""
    if cache is not None and cache.exists():
        doc = pickle.loads(cache.read_bytes())
        if len(doc["txs"]) >= n_txs:
            orgs = [keys.Identity.from_json(o) for o in doc["orgs"]]
            return orgs, Workload(orgs, doc["setup"], doc["txs"][:n_txs])
    orgs = [keys.new_identity(f"org-{i}", "org") for i in range(4)]
    work = medledger_workload(orgs, n_txs)
    if cache is not None:
        cache.write_bytes(pickle.dumps({"orgs": [o.to_json() for o in orgs],
                                        "setup": work.setup, "txs": work.txs}))
    return orgs, work


def run(n_txs: int = 10_000, block: int = 200, backlog: int = 1000,
        workdir: Path | None = None, cache: Path | None = None) -> dict[str, Any]:
    orgs, work = workload(n_txs, cache)
    app_state = {"orgs": [org_genesis_entry(o, f"Hospital {i}") for i, o in enumerate(orgs)]}
    with tempfile.TemporaryDirectory(prefix="medledger-abci-cost-", dir=workdir) as tmp:
        app = LedgerApp(SqliteStore(Path(tmp) / "ledger.db"))
        d = Driver(RequestHandler(app))
        init = pb.RequestInitChain(chain_id=CHAIN, app_state_bytes=canonical(app_state))
        d.call(pb.Request(init_chain=init).SerializeToString())
        for tx in work.setup:
            assert d.call(_check(tx)).check_tx.code == 0
        d.call(_finalize(1, work.setup))
        d.call(_COMMIT)
        height = 1
        arriving = deque(work.txs)
        mempool: deque[bytes] = deque()

        def arrive(n: int) -> None:
            batch = [arriving.popleft() for _ in range(min(n, len(arriving)))]
            for resp in d.timed("check_tx", [_check(tx) for tx in batch], len(batch)):
                assert resp.check_tx.code == 0, resp.check_tx.log
            mempool.extend(batch)

        arrive(backlog + block)
        while mempool:
            txs = [mempool.popleft() for _ in range(min(block, len(mempool)))]
            height += 1
            res = d.timed("finalize_block", [_finalize(height, txs)], len(txs))[0]
            assert all(r.code == 0 for r in res.finalize_block.tx_results)
            d.timed("commit", [_COMMIT], len(txs))
            d.timed("recheck", [_check(tx, True) for tx in mempool], len(mempool))
            arrive(block)
    per_tx = {k: d.cpu[k] / max(1, d.count[k]) * 1e6 for k in d.cpu}
    median = {k: statistics.median(v) * 1e6 for k, v in d.samples.items()}
    total = per_tx["check_tx"] + per_tx["finalize_block"] + per_tx["commit"] \
        + per_tx["recheck"] * d.count["recheck"] / max(1, d.count["check_tx"])
    return {"txs": n_txs, "block": block, "backlog": backlog,
            "tx_bytes": round(work.mean_tx_bytes), "cpu_us_per_tx": per_tx,
            "median_batch_cpu_us_per_tx": median,
            "rechecks_per_tx": d.count["recheck"] / max(1, d.count["check_tx"]),
            "cpu_us_per_tx_all_phases": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--txs", type=int, default=10_000)
    ap.add_argument("--block", type=int, default=200)
    ap.add_argument("--backlog", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1, help="runs; the best of each phase")
    ap.add_argument("--txs-cache", type=Path, default=None,
                    help="pickle of the generated txs: written once, then reused")
    args = ap.parse_args()
    runs = [run(args.txs, args.block, args.backlog, cache=args.txs_cache)
            for _ in range(args.repeat)]
    best = {k: min(r["cpu_us_per_tx"][k] for r in runs) for k in runs[0]["cpu_us_per_tx"]}
    print(json.dumps({**runs[-1], "best_cpu_us_per_tx": best,
                      "runs_all_phases_us": [r["cpu_us_per_tx_all_phases"] for r in runs]},
                     indent=2))


if __name__ == "__main__":
    main()
