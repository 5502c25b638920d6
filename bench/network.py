"""Figure 2: a 4-validator CometBFT network on this machine, one LedgerApp process per node.

Each validator is a ``cometbft start`` process plus a Python process running
``LedgerApp`` behind ``AbciServer`` (``bench.child abci``), which logs the wall time
and tx hashes of every commit. Pre-signed ``record.put`` txs are broadcast
(``broadcast_tx_sync`` in JSON-RPC batches) round-robin to all four RPC endpoints,
keeping a bounded number in flight; latency is submit -> committed on all four.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench.lab import Nonces, PatientKey, record_txs, register_body
from bench.stats import latency_ms, pct
from medledger.consensus.cometbft import CometRpc, edit_config, make_testnet, start_node, stop_node
from medledger.core.tx import make_tx
from medledger.crypto import keys
from medledger.node.home import org_genesis_entry

REPO = Path(__file__).resolve().parents[1]
CHAIN = "medledger-bench-net"


def _h(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


class CommitLog:
    """Tails one node's commit log: tx hash -> commit wall time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.times: dict[str, float] = {}
        self.height = 0

    def poll(self) -> None:
        try:
            with open(self.path) as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind("\n")
        if end < 0:
            return
        self.pos += len(data[:end + 1].encode())
        for line in data[:end].splitlines():
            t, height, hashes = (line.split(" ") + [""])[:3]
            self.height = int(height)
            for h in filter(None, hashes.split(",")):
                self.times[h] = float(t)


async def _broadcast(client: httpx.AsyncClient, url: str, raws: list[bytes]
                     ) -> list[tuple[int, str]]:
    import base64
    body = [{"jsonrpc": "2.0", "id": i, "method": "broadcast_tx_sync",
             "params": {"tx": base64.b64encode(r).decode()}} for i, r in enumerate(raws)]
    resp = await client.post(url, json=body)
    if not isinstance(resp.json(), list):
        raise RuntimeError(f"CometBFT batch RPC: {resp.text[:300]}")
    out = []
    for item in sorted(resp.json(), key=lambda d: d["id"]):
        if item.get("error"):
            out.append((-1, str(item["error"].get("data") or item["error"])))
        else:
            out.append((int(item["result"]["code"]), str(item["result"].get("log", ""))))
    return out


async def _wait_all(logs: list[CommitLog], hashes: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for lg in logs:
            lg.poll()
        if all(h in lg.times for lg in logs for h in hashes):
            return True
        await asyncio.sleep(0.05)
    return False


async def _run(base: Path, duration: float, max_in_flight: int, batch: int,
               senders_per_node: int, extra_config: dict[str, Any],
               n_txs: int) -> dict[str, Any]:
    orgs = [keys.new_identity(f"org-{i}", "org") for i in range(4)]
    app_state = {"orgs": [org_genesis_entry(o, f"Hospital {i}") for i, o in enumerate(orgs)]}
    layouts = make_testnet(base, 4, CHAIN, app_state, log_level="error")
    for lay in layouts:  # batched broadcast_tx_sync (default batch limit is 10 requests)
        edit_config(lay.config_path, {"rpc.max_request_batch_size": 0,
                                      "rpc.max_body_bytes": 8_000_000, **extra_config})
    children: list[subprocess.Popen[str]] = []
    comets: list[subprocess.Popen[bytes]] = []
    logs = [CommitLog(lay.home / "commits.log") for lay in layouts]
    rpcs = [CometRpc(lay.rpc_url) for lay in layouts]
    try:
        for lay in layouts:
            child = subprocess.Popen(
                [sys.executable, "-m", "bench.child", "abci", str(lay.home / "app"),
                 str(lay.abci_port), str(lay.home / "commits.log")],
                stdout=subprocess.PIPE, stderr=open(lay.home / "app.err", "w"), text=True,
                cwd=REPO, start_new_session=True)
            children.append(child)
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for lay in layouts:
            comets.append(start_node(lay))
        await asyncio.gather(*(r.wait_for_height(2, timeout=60) for r in rpcs))

        # patients (registered by org-0) and the pre-signed record txs
        patients = [keys.new_identity(f"pat-{i}", "patient") for i in range(200)]
        nonce, signer = Nonces(), orgs[0].signer()
        regs = [make_tx("org-0", signer, CHAIN, "actor.register", register_body(p),
                        nonce()).raw for p in patients]
        t0 = time.perf_counter()
        txs = [raw for _, raw in record_txs(CHAIN, orgs[0],
                                            [PatientKey(p.id, p.enc_public) for p in patients],
                                            n_txs, "net")]
        gen_s = time.perf_counter() - t0
        async with httpx.AsyncClient(timeout=60) as client:
            for i in range(0, len(regs), batch):
                res = await _broadcast(client, layouts[0].rpc_url, regs[i:i + batch])
                assert all(c == 0 for c, _ in res), res[:3]
            assert await _wait_all(logs, [_h(r) for r in regs], 30), "registrations stuck"

            submitted: dict[str, float] = {}
            batch_s: list[float] = []
            cpu0 = _cpu([*children, *comets])
            rejected: dict[str, int] = defaultdict(int)
            queue = iter(range(0, len(txs), batch))
            t_start = time.time()
            stop_at = t_start + duration

            async def sender(url: str) -> None:
                for i in queue:
                    while True:
                        logs[0].poll()
                        in_flight = len(submitted) - sum(1 for h in submitted
                                                         if h in logs[0].times) \
                            if len(submitted) < 2 * max_in_flight else \
                            len(submitted) - len(logs[0].times.keys() & submitted.keys())
                        if in_flight + batch <= max_in_flight or time.time() >= stop_at:
                            break
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
                        else:
                            rejected[log[:60]] += 1

            await asyncio.gather(*(sender(lay.rpc_url) for lay in layouts
                                   for _ in range(senders_per_node)))
            t_stop = time.time()
            cpu1 = _cpu([*children, *comets])
            drained = await _wait_all(logs, list(submitted), 60)
        statuses = [await r.status() for r in rpcs]
        common = min(s.height for s in statuses)
        app_hashes = {await r.block_app_hash(common) for r in rpcs}
    finally:
        for proc in comets:
            await asyncio.to_thread(stop_node, proc, 10.0)
        for child in children:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        for r in rpcs:
            await r.aclose()
    done = {h: max(lg.times[h] for lg in logs) for h in submitted
            if all(h in lg.times for lg in logs)}
    lat = [done[h] - submitted[h] for h in done]
    in_window = sum(1 for h, t in done.items() if t <= t_stop)
    last = max(done.values(), default=t_stop)
    return {"validators": 4, "txs_generated": n_txs, "generate_s": gen_s,
            "submitted": len(submitted), "committed_on_all": len(done),
            "rejected": dict(rejected), "drained": drained,
            "submit_window_s": t_stop - t_start,
            "tx_per_s": in_window / (t_stop - t_start),
            "tx_per_s_incl_drain": len(done) / (last - t_start),
            "max_in_flight": max_in_flight, "rpc_batch": batch,
            "concurrent_rpc_requests": 4 * senders_per_node,
            "blocks": common, "app_hash_agree_at_common_height": len(app_hashes) == 1,
            "broadcast_batch_p50_ms": pct(batch_s, 50) * 1e3,
            "broadcast_batch_p99_ms": pct(batch_s, 99) * 1e3,
            "cpu_s_in_window": {"ledger_apps": sum(cpu1[:4]) - sum(cpu0[:4]),
                                "cometbft": sum(cpu1[4:]) - sum(cpu0[4:])},
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


def network(base: Path, duration: float = 30.0, max_in_flight: int = 3000, batch: int = 50,
            senders_per_node: int = 2,
            n_txs: int = 45_000, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    return asyncio.run(_run(base, duration, max_in_flight, batch, senders_per_node,
                            extra_config or {}, n_txs))
