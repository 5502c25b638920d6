"""Figure 2: a 4-validator CometBFT network on this machine, against CometBFT's own ceiling.

``ceiling_pair`` runs the same network twice, back to back in one run: first with
CometBFT's built-in ``kvstore`` application (``cometbft start --proxy_app=kvstore``:
a Go app whose CheckTx only looks for one ``=``), then with medledger (one Python
process per validator, ``bench.child abci``: ``LedgerApp`` behind ``AbciServer``).
Both use the same ``config.toml`` (``consensus.cometbft.make_testnet``), the same tx
size (the mean size of medledger's ``record.put`` txs; ``tx_bytes`` overrides kvstore's
to see how the engine scales with size) and the same load: pre-signed txs broadcast
with ``broadcast_tx_sync`` in JSON-RPC batches, round-robin to all four RPC endpoints,
at most ``max_in_flight`` uncommitted.

Commits are observed the same way for both apps, through CometBFT's RPC: every node's
``abci_info`` (the height the *application* has committed) is polled every 50 ms, and
node 0's ``block`` gives each new height's txs. Latency = submit -> the last of the four
applications has committed the block holding the tx.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.lab import Nonces, PatientKey, record_txs, register_body
from bench.stats import latency_ms, pct
from medledger.consensus.cometbft import (
    BLOCK_MAX_BYTES,
    CometRpc,
    NodeLayout,
    edit_config,
    make_testnet,
    start_node,
    stop_node,
)
from medledger.core.tx import make_tx
from medledger.crypto import keys
from medledger.node.home import org_genesis_entry

REPO = Path(__file__).resolve().parents[1]
CHAIN = "medledger-bench-net"
POLL_S = 0.05
APPS = ("kvstore", "medledger")


def _h(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()[:12]


# --------------------------------------------------------------------------- txs


@dataclass
class Workload:
    """The identities of the network and the pre-built txs for one app."""

    orgs: list[keys.Identity]
    setup: list[bytes] = field(default_factory=list)  # must commit before the timed load
    txs: list[bytes] = field(default_factory=list)

    @property
    def mean_tx_bytes(self) -> float:
        return sum(map(len, self.txs)) / max(1, len(self.txs))


def medledger_workload(orgs: list[keys.Identity], n_txs: int) -> Workload:
    """200 patient registrations, then ``n_txs`` ``record.put`` txs by org-0 (synthetic
    Observations; since ADR 4 a tx carries the sealed blob's hash, not the ciphertext,
    so its size is what it is: kvstore is measured at that size)."""
    patients = [keys.new_identity(f"pat-{i}", "patient") for i in range(200)]
    nonce, signer = Nonces(), orgs[0].signer()
    regs = [make_tx("org-0", signer, CHAIN, "actor.register", register_body(p), nonce()).raw
            for p in patients]
    keys_ = [PatientKey(p.id, p.enc_public) for p in patients]
    txs = [raw for _, raw in record_txs(CHAIN, orgs[0], keys_, n_txs, "net")]
    return Workload(orgs, regs, txs)


def kvstore_workload(orgs: list[keys.Identity], n_txs: int, tx_bytes: int) -> Workload:
    """``n_txs`` distinct ``key=value`` txs of ``tx_bytes`` each (kvstore's format)."""
    prefix = os.urandom(4).hex()
    txs = []
    for i in range(n_txs):
        head = f"k{prefix}{i:010d}=".encode()
        txs.append(head + b"v" * max(1, tx_bytes - len(head)))
    return Workload(orgs, [], txs)


# --------------------------------------------------------------------------- watching commits


class CommitWatcher:
    """Which height each node's application has committed, and when; node 0's block txs."""

    def __init__(self, client: httpx.AsyncClient, layouts: list[NodeLayout]) -> None:
        self.client = client
        self.urls = [lay.rpc_url for lay in layouts]
        self.app_height = [0] * len(layouts)
        self.height_time: list[dict[int, float]] = [{} for _ in layouts]
        self.tx_height: dict[bytes, int] = {}
        self.fetched = 0
        self._task: asyncio.Task[None] | None = None

    async def _rpc(self, url: str, method: str, params: dict[str, Any] | None = None) -> Any:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        resp = await self.client.post(url, content=orjson.dumps(body))
        return orjson.loads(resp.content)["result"]

    async def _poll_node(self, i: int) -> None:
        try:
            res = await self._rpc(self.urls[i], "abci_info")
        except (httpx.HTTPError, KeyError, ValueError):
            return
        height = int(res["response"].get("last_block_height") or 0)
        now = time.time()
        for h in range(self.app_height[i] + 1, height + 1):
            self.height_time[i][h] = now
        self.app_height[i] = max(self.app_height[i], height)

    async def _fetch_blocks(self) -> None:
        while self.fetched < self.app_height[0]:
            h = self.fetched + 1
            res = await self._rpc(self.urls[0], "block", {"height": str(h)})
            for tx in res["block"]["data"]["txs"] or []:
                self.tx_height[_h(base64.b64decode(tx))] = h
            self.fetched = h

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll_node(i) for i in range(len(self.urls))))
        await self._fetch_blocks()

    async def _loop(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self.poll_once()
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - t0)))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def committed_on_all(self, tx: bytes) -> float | None:
        """Wall time the last node committed ``tx`` (by its short hash), or ``None``."""
        h = self.tx_height.get(tx)
        if h is None:
            return None
        times = [ht.get(h) for ht in self.height_time]
        return None if any(t is None for t in times) else max(t for t in times if t)

    def committed_on_first(self, tx: bytes) -> bool:
        return tx in self.tx_height

    async def wait_all(self, hashes: list[bytes], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.committed_on_all(h) is not None for h in hashes):
                return True
            await asyncio.sleep(POLL_S)
        return False


# --------------------------------------------------------------------------- one run


BROADCAST = "broadcast_tx_sync"  # waits for CheckTx; "broadcast_tx_async" does not


async def _broadcast(client: httpx.AsyncClient, url: str, raws: list[bytes]
                     ) -> list[tuple[int, str]]:
    body = [{"jsonrpc": "2.0", "id": i, "method": BROADCAST,
             "params": {"tx": base64.b64encode(r).decode()}} for i, r in enumerate(raws)]
    resp = await client.post(url, content=orjson.dumps(body))
    doc = orjson.loads(resp.content)
    if not isinstance(doc, list):
        raise RuntimeError(f"CometBFT batch RPC: {resp.text[:300]}")
    out = []
    for item in sorted(doc, key=lambda d: d["id"]):
        if item.get("error"):
            out.append((-1, str(item["error"].get("data") or item["error"])))
        else:
            out.append((int(item["result"]["code"]), str(item["result"].get("log", ""))))
    return out


def _start_apps(app: str, layouts: list[NodeLayout]) -> list[subprocess.Popen[str]]:
    if app == "kvstore":
        return []
    children = []
    for lay in layouts:
        with open(lay.home / "app.err", "w") as err:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "bench.child", "abci", str(lay.home / "app"),
                 str(lay.abci_port), str(lay.home / "commits.log")],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                start_new_session=True))
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return children


def _stop_all(comets: list[subprocess.Popen[bytes]], children: list[subprocess.Popen[str]]
              ) -> None:
    for proc in comets:
        stop_node(proc, 10.0)
    for child in children:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


async def _run(base: Path, app: str, work: Workload, duration: float, max_in_flight: int,
               batch: int, senders_per_node: int, extra_config: dict[str, Any]
               ) -> dict[str, Any]:
    app_state = {"orgs": [org_genesis_entry(o, f"Hospital {i}")
                          for i, o in enumerate(work.orgs)]}
    extra = dict(extra_config)
    block_max = int(extra.pop("block_max_bytes", BLOCK_MAX_BYTES))
    tc = str(extra.pop("timeout_commit", "300ms"))
    layouts = make_testnet(base, 4, CHAIN, app_state, log_level="error",
                           block_max_bytes=block_max, timeout_commit=tc)
    for lay in layouts:  # batched broadcast_tx_sync (default batch limit is 10 requests)
        edit_config(lay.config_path, {"rpc.max_request_batch_size": 0, **extra})
    extra_args = ["--proxy_app=kvstore"] if app == "kvstore" else []
    children: list[subprocess.Popen[str]] = []
    comets: list[subprocess.Popen[bytes]] = []
    rpcs = [CometRpc(lay.rpc_url) for lay in layouts]
    try:
        children = _start_apps(app, layouts)
        for lay in layouts:
            comets.append(start_node(lay, extra_args=extra_args))
        await asyncio.gather(*(r.wait_for_height(2, timeout=60) for r in rpcs))
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(
                max_connections=64, max_keepalive_connections=64)) as client:
            watcher = CommitWatcher(client, layouts)
            watcher.start()
            try:
                for i in range(0, len(work.setup), batch):
                    res = await _broadcast(client, layouts[0].rpc_url, work.setup[i:i + batch])
                    assert all(c == 0 for c, _ in res), res[:3]
                assert await watcher.wait_all([_h(r) for r in work.setup], 60), "setup stuck"
                out = await _load(client, layouts, watcher, work.txs, duration, max_in_flight,
                                  batch, senders_per_node, [*children, *comets])
            finally:
                await watcher.stop()
        statuses = [await r.status() for r in rpcs]
        common = min(s.height for s in statuses)
        app_hashes = {await r.block_app_hash(common) for r in rpcs}
    finally:
        await asyncio.to_thread(_stop_all, comets, children)
        for r in rpcs:
            await r.aclose()
    return {"app": app, "validators": 4, "mean_tx_bytes": work.mean_tx_bytes,
            "blocks": common, "app_hash_agree_at_common_height": len(app_hashes) == 1, **out}


async def _load(client: httpx.AsyncClient, layouts: list[NodeLayout], watcher: CommitWatcher,
                txs: list[bytes], duration: float, max_in_flight: int, batch: int,
                senders_per_node: int, procs: list[Any]) -> dict[str, Any]:
    submitted: dict[bytes, float] = {}
    batch_s: list[float] = []
    rejected: dict[str, int] = defaultdict(int)
    queue = iter(range(0, len(txs), batch))
    n_apps = len(procs) - len(layouts)
    cpu0 = _cpu(procs)
    t_start = time.time()
    stop_at = t_start + duration
    exhausted = False

    pending: set[bytes] = set()

    def in_flight() -> int:
        pending.difference_update([h for h in pending if watcher.committed_on_first(h)])
        return len(pending)

    async def sender(url: str) -> None:
        nonlocal exhausted
        for i in queue:
            while in_flight() + batch > max_in_flight and time.time() < stop_at:
                await asyncio.sleep(0.02)
            if time.time() >= stop_at:
                return
            chunk = txs[i:i + batch]
            sent = time.time()
            answers = await _broadcast(client, url, chunk)
            batch_s.append(time.time() - sent)
            for (code, log), raw in zip(answers, chunk, strict=True):
                if code == 0:
                    submitted[_h(raw)] = sent
                    pending.add(_h(raw))
                else:
                    rejected[log[:60]] += 1
        exhausted = True

    await asyncio.gather(*(sender(lay.rpc_url) for lay in layouts
                           for _ in range(senders_per_node)))
    t_stop = time.time()
    cpu1 = _cpu(procs)
    drained = await watcher.wait_all(list(submitted), 60)
    done = {h: t for h in submitted if (t := watcher.committed_on_all(h)) is not None}
    lat = [done[h] - submitted[h] for h in done]
    in_window = sum(1 for t in done.values() if t <= t_stop)
    last = max(done.values(), default=t_stop)
    return {"txs_available": len(txs), "ran_out_of_txs": exhausted,
            "submitted": len(submitted), "committed_on_all": len(done),
            "rejected": dict(rejected), "drained": drained,
            "submit_window_s": t_stop - t_start,
            "tx_per_s": in_window / (t_stop - t_start),
            "tx_per_s_incl_drain": len(done) / max(1e-9, last - t_start),
            "max_in_flight": max_in_flight, "rpc_batch": batch,
            "concurrent_rpc_requests": len(layouts) * senders_per_node,
            "broadcast_batch_p50_ms": pct(batch_s, 50) * 1e3,
            "broadcast_batch_p99_ms": pct(batch_s, 99) * 1e3,
            "cpu_s_in_window": {"apps": sum(cpu1[:n_apps]) - sum(cpu0[:n_apps]),
                                "cometbft": sum(cpu1[n_apps:]) - sum(cpu0[n_apps:])},
            **latency_ms(lat)}


def _cpu(procs: list[Any]) -> list[float]:
    """user+system CPU seconds of each process (from /proc)."""
    out = []
    for p in procs:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        except (OSError, IndexError):
            out.append(0.0)
    return out


# --------------------------------------------------------------------------- entry points


def network(base: Path, app: str = "medledger", duration: float = 30.0,
            max_in_flight: int = 3000, batch: int = 50, senders_per_node: int = 2,
            n_txs: int = 30_000, tx_bytes: int | None = None,
            extra_config: dict[str, Any] | None = None,
            workload: Workload | None = None) -> dict[str, Any]:
    """One run of ``app`` (``kvstore`` or ``medledger``) on a fresh 4-validator network."""
    if app not in APPS:
        raise ValueError(f"app must be one of {APPS}")
    orgs = workload.orgs if workload else [keys.new_identity(f"org-{i}", "org")
                                           for i in range(4)]
    t0 = time.perf_counter()
    if workload is None:
        workload = (medledger_workload(orgs, n_txs) if app == "medledger"
                    else kvstore_workload(orgs, n_txs, tx_bytes or 3000))
    gen_s = time.perf_counter() - t0
    res = asyncio.run(_run(base, app, workload, duration, max_in_flight, batch,
                           senders_per_node, extra_config or {}))
    return {**res, "generate_s": gen_s}


def ceiling_pair(base: Path, duration: float = 30.0, tx_bytes: int | None = None,
                 n_txs: int = 30_000, extra_config: dict[str, Any] | None = None,
                 **load: Any) -> dict[str, Any]:
    """kvstore then medledger on identical networks and load; their ratio."""
    orgs = [keys.new_identity(f"org-{i}", "org") for i in range(4)]
    med = medledger_workload(orgs, n_txs)
    size = round(med.mean_tx_bytes)
    kv = kvstore_workload(orgs, 4 * n_txs, tx_bytes or size)
    out: dict[str, Any] = {"tx_bytes": size, "kvstore_tx_bytes": tx_bytes or size,
                           "duration_s": duration, "load_avg_before": os.getloadavg()}
    out["kvstore"] = network(base / "kvstore", "kvstore", duration, workload=kv,
                             extra_config=extra_config, **load)
    out["medledger"] = network(base / "medledger", "medledger", duration, workload=med,
                               extra_config=extra_config, **load)
    out["load_avg_after"] = os.getloadavg()
    out["ratio"] = out["medledger"]["tx_per_s"] / max(1e-9, out["kvstore"]["tx_per_s"])
    return out


def main() -> None:
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser(description="kvstore vs medledger on a 4-validator network")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--tx-bytes", type=int, default=None)
    ap.add_argument("--txs", type=int, default=30_000)
    ap.add_argument("--only", choices=APPS, default=None)
    ap.add_argument("--max-in-flight", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=50, help="txs per JSON-RPC batch")
    ap.add_argument("--senders", type=int, default=2, help="concurrent batches per node")
    ap.add_argument("--async-broadcast", action="store_true",
                    help="broadcast_tx_async (do not wait for CheckTx)")
    ap.add_argument("--config", default="{}", help="JSON: config.toml keys, block_max_bytes, "
                    "timeout_commit")
    args = ap.parse_args()
    extra = json.loads(args.config)
    global BROADCAST
    if args.async_broadcast:
        BROADCAST = "broadcast_tx_async"
    load = {"max_in_flight": args.max_in_flight, "batch": args.batch,
            "senders_per_node": args.senders}
    with tempfile.TemporaryDirectory(prefix="medledger-net-bench-") as tmp:
        if args.only:
            res = network(Path(tmp), args.only, args.seconds, n_txs=args.txs,
                          tx_bytes=args.tx_bytes, extra_config=extra, **load)
        else:
            res = ceiling_pair(Path(tmp), args.seconds, args.tx_bytes, args.txs,
                               extra_config=extra, **load)
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
