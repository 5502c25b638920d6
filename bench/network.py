"""Figure 2: a 4-validator CometBFT network on this machine, against CometBFT's own ceilings.

``ceilings`` runs the same network three times, back to back in one run, with the same
``config.toml`` (``consensus.cometbft.make_testnet``), tx size and load:

- ``kvstore``: CometBFT's built-in ``kvstore`` app *inside* the CometBFT process
  (``cometbft start --proxy_app=kvstore``: a Go app whose CheckTx only looks for one
  ``=``, state in memory). No ABCI socket: calls are Go function calls.
- ``kvstore-socket``: the same Go app *out of process*, behind CometBFT's ABCI socket,
  exactly as medledger is served (``abci-cli kvstore`` from the same CometBFT module
  version, installed by ``scripts/install_cometbft.sh``; its state persisted in
  goleveldb). This is the ceiling of any out-of-process app on this transport:
  CometBFT's socket client sends queued requests only when its 20 ms flush timer fires
  or its 4 KiB write buffer fills, and ``broadcast_tx_sync`` waits for each CheckTx.
- ``medledger``: one Python process per validator (``bench.child abci``: ``LedgerApp``
  behind ``AbciServer``).

The tx size is the mean size of medledger's ``record.put`` txs (``tx_bytes`` overrides
kvstore's to see how the engine scales with size). Load (``LOADS``, the ``load``
argument): pre-signed txs broadcast with ``broadcast_tx_sync`` round-robin to all four
RPC endpoints, at most ``max_in_flight`` uncommitted, in one of two shapes:

- ``issue``: JSON-RPC batches of 50 txs, 2 concurrent batches per node (the issue's
  pattern: a few bulk submitters);
- ``clients``: one tx per request, 16 concurrent requests per node (the shape of many
  API clients, each write one ``broadcast_tx_sync``).

Requests go over raw HTTP/1.1 keep-alive connections (pre-encoded bodies; httpx's
~1 ms of CPU per request would starve the apps on 2 cores). Commits are observed the
same way for every app, through CometBFT's RPC: every node's ``abci_info`` (the height
the *application* has committed) is polled every 50 ms, and node 0's ``block`` gives
each new height's txs. Latency = submit -> the last of the four applications has
committed the block holding the tx.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
APPS = ("kvstore", "kvstore-socket", "medledger")


@dataclass(frozen=True)
class Load:
    """A load shape: ``batch`` txs per JSON-RPC request, ``senders_per_node`` requests
    in flight at each node, at most ``max_in_flight`` txs submitted but not committed."""

    batch: int
    senders_per_node: int
    max_in_flight: int = 3000


LOADS = {
    "issue": Load(batch=50, senders_per_node=2),  # a few bulk submitters
    "clients": Load(batch=1, senders_per_node=16),  # many API clients, one tx each
}


def _h(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()[:12]


def abci_cli_path() -> Path:
    """``abci-cli`` of the pinned CometBFT version: ``$MEDLEDGER_ABCI_CLI``, else
    ``<repo>/.tools/bin/abci-cli`` (``scripts/install_cometbft.sh``), else on ``PATH``."""
    for candidate in (os.environ.get("MEDLEDGER_ABCI_CLI"), str(REPO / ".tools/bin/abci-cli"),
                      shutil.which("abci-cli")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise SystemExit("abci-cli not found: run scripts/install_cometbft.sh (make cometbft)")


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


# --------------------------------------------------------------------------- JSON-RPC client


def rpc_body(raws: list[bytes], method: str) -> bytes:
    """A JSON-RPC batch of one ``method`` call per tx (ids = positions)."""
    return orjson.dumps([{"jsonrpc": "2.0", "id": i, "method": method,
                          "params": {"tx": base64.b64encode(r).decode()}}
                         for i, r in enumerate(raws)])


def parse_answers(content: bytes) -> list[tuple[int, str]]:
    """``(code, log)`` per tx of a batch answer, in request order (code -1: RPC error)."""
    doc = orjson.loads(content)
    if isinstance(doc, dict) and "id" in doc:  # CometBFT answers a batch of one unwrapped
        doc = [doc]
    if not isinstance(doc, list):
        raise RuntimeError(f"CometBFT batch RPC: {content[:300]!r}")
    out = []
    for item in sorted(doc, key=lambda d: d["id"]):
        if item.get("error"):
            out.append((-1, str(item["error"].get("data") or item["error"])))
        else:
            out.append((int(item["result"]["code"]), str(item["result"].get("log", ""))))
    return out


class RawRpc:
    """One keep-alive HTTP/1.1 connection posting pre-encoded JSON-RPC bodies: reads
    ``Content-Length`` and chunked answers (Go sends batches over 2 KiB chunked)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.head = (f"POST / HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()
        self._io: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, body: bytes) -> bytes:
        if self._io is None:
            self._io = await asyncio.open_connection(self.host, self.port, limit=2**24)
        reader, writer = self._io
        writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked = -1, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        content = await self._chunks(reader) if chunked else await reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"CometBFT RPC answered {status}: {content[:300]!r}")
        return content

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def close(self) -> None:
        if self._io is not None:
            self._io[1].close()
            self._io = None


# --------------------------------------------------------------------------- watching commits


class CommitWatcher:
    """Which height each node's application has committed, and when; node 0's block txs."""

    def __init__(self, client: httpx.AsyncClient, layouts: list[NodeLayout]) -> None:
        self.client = client
        self.urls = [lay.rpc_url for lay in layouts]
        self.app_height = [0] * len(layouts)
        self.height_time: list[dict[int, float]] = [{} for _ in layouts]
        self.tx_height: dict[bytes, int] = {}
        self.block_txs: list[int] = []
        self.fetched = 0
        self.pending: set[bytes] = set()  # submitted, not yet seen in a block
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
            txs = res["block"]["data"]["txs"] or []
            for tx in txs:
                short = _h(base64.b64decode(tx))
                self.tx_height[short] = h
                self.pending.discard(short)
            self.block_txs.append(len(txs))
            self.fetched = h

    def submitted(self, short: bytes) -> None:
        """Count ``short`` as in flight until a block holds it."""
        if short not in self.tx_height:
            self.pending.add(short)

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

    async def wait_all(self, hashes: list[bytes], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.committed_on_all(h) is not None for h in hashes):
                return True
            await asyncio.sleep(POLL_S)
        return False


# --------------------------------------------------------------------------- one run


BROADCAST = "broadcast_tx_sync"  # waits for CheckTx; "broadcast_tx_async" does not


def _wait_listening(lay: NodeLayout, proc: subprocess.Popen[bytes],
                    timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"abci-cli kvstore exited with {proc.returncode}")
        try:
            if lay.abci_socket is not None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1)
                    s.connect(str(lay.abci_socket))
            else:
                socket.create_connection(("127.0.0.1", lay.abci_port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"abci-cli kvstore not listening on {lay.proxy_app} after {timeout} s")


def _start_apps(app: str, layouts: list[NodeLayout]) -> list[subprocess.Popen[Any]]:
    if app == "kvstore":
        return []
    children: list[subprocess.Popen[Any]] = []
    if app == "kvstore-socket":
        cli = abci_cli_path()
        for lay in layouts:
            with open(lay.home / "app.log", "wb") as out:
                children.append(subprocess.Popen(
                    [str(cli), "kvstore", "--address", lay.proxy_app, "--log_level", "error",
                     "--persist", str(lay.home / "kvstore-data")],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        for lay, child in zip(layouts, children, strict=True):
            _wait_listening(lay, child)
        return children
    for lay in layouts:
        with open(lay.home / "app.err", "w") as err:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "bench.child", "abci", str(lay.home / "app"),
                 lay.proxy_app, str(lay.home / "commits.log")],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                start_new_session=True))
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return children


def _stop_all(comets: list[subprocess.Popen[bytes]], children: list[subprocess.Popen[Any]]
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


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy (a pinned dev dependency) sampling ``pid`` for ``seconds``: collapsed stacks
    (``--format raw``: one line per stack with its sample count, idle included)."""
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration",
                             str(max(1, int(seconds))), "--rate", "200", "--idle",
                             "--nonblocking", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _run(base: Path, app: str, work: Workload, duration: float, load: Load,
               extra_config: dict[str, Any], profile: Path | None = None) -> dict[str, Any]:
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
    children: list[subprocess.Popen[Any]] = []
    comets: list[subprocess.Popen[bytes]] = []
    rpcs = [CometRpc(lay.rpc_url) for lay in layouts]
    spy: subprocess.Popen[bytes] | None = None
    try:
        children = _start_apps(app, layouts)
        for lay in layouts:
            comets.append(start_node(lay, extra_args=extra_args))
        await asyncio.gather(*(r.wait_for_height(2, timeout=60) for r in rpcs))
        async with httpx.AsyncClient(timeout=60) as client:
            watcher = CommitWatcher(client, layouts)
            watcher.start()
            try:
                setup = RawRpc(layouts[0].rpc_url)
                for i in range(0, len(work.setup), 50):
                    res = parse_answers(await setup.post(rpc_body(work.setup[i:i + 50],
                                                                  BROADCAST)))
                    assert all(c == 0 for c, _ in res), res[:3]
                setup.close()
                assert await watcher.wait_all([_h(r) for r in work.setup], 60), "setup stuck"
                spy = (_profile(children[0].pid, duration, profile)
                       if profile and app == "medledger" else None)
                out = await _load(layouts, watcher, work.txs, duration, load,
                                  [*children, *comets])
            finally:
                await watcher.stop()
        if spy is not None:
            await asyncio.to_thread(spy.wait, 30)
        statuses = [await r.status() for r in rpcs]
        common = min(s.height for s in statuses)
        app_hashes = {await r.block_app_hash(common) for r in rpcs}
    finally:
        await asyncio.to_thread(_stop_all, comets, children)
        for r in rpcs:
            await r.aclose()
    return {"app": app, "validators": 4, "mean_tx_bytes": work.mean_tx_bytes,
            "blocks": common, "app_hash_agree_at_common_height": len(app_hashes) == 1, **out}


async def _load(layouts: list[NodeLayout], watcher: CommitWatcher, txs: list[bytes],
                duration: float, load: Load, procs: list[Any]) -> dict[str, Any]:
    batch = load.batch
    submitted: dict[bytes, float] = {}
    batch_s: list[float] = []
    rejected: dict[str, int] = defaultdict(int)
    queue = iter(range(0, len(txs), batch))
    n_apps = len(procs) - len(layouts)
    cpu0, own0 = _cpu(procs), time.process_time()
    first_block = watcher.fetched
    t_start = time.time()
    stop_at = t_start + duration
    exhausted = False

    async def sender(url: str) -> None:
        nonlocal exhausted
        conn = RawRpc(url)
        try:
            for i in queue:
                while (len(watcher.pending) + batch > load.max_in_flight
                       and time.time() < stop_at):
                    await asyncio.sleep(0.02)
                if time.time() >= stop_at:
                    return
                chunk = txs[i:i + batch]
                body = rpc_body(chunk, BROADCAST)
                sent = time.time()
                answers = parse_answers(await conn.post(body))
                batch_s.append(time.time() - sent)
                for (code, log), raw in zip(answers, chunk, strict=True):
                    if code == 0:
                        short = _h(raw)
                        submitted[short] = sent
                        watcher.submitted(short)
                    else:
                        rejected[log[:60]] += 1
            exhausted = True
        finally:
            conn.close()

    await asyncio.gather(*(sender(lay.rpc_url) for lay in layouts
                           for _ in range(load.senders_per_node)))
    t_stop = time.time()
    cpu1, own1 = _cpu(procs), time.process_time()
    drained = await watcher.wait_all(list(submitted), 60)
    done = {h: t for h in submitted if (t := watcher.committed_on_all(h)) is not None}
    lat = [done[h] - submitted[h] for h in done]
    in_window = sum(1 for t in done.values() if t <= t_stop)
    last = max(done.values(), default=t_stop)
    blocks = [n for n in watcher.block_txs[first_block:] if n]
    return {"txs_available": len(txs), "ran_out_of_txs": exhausted,
            "submitted": len(submitted), "committed_on_all": len(done),
            "rejected": dict(rejected), "drained": drained,
            "submit_window_s": t_stop - t_start,
            "tx_per_s": in_window / (t_stop - t_start),
            "tx_per_s_incl_drain": len(done) / max(1e-9, last - t_start),
            "max_in_flight": load.max_in_flight, "rpc_batch": batch,
            "concurrent_rpc_requests": len(layouts) * load.senders_per_node,
            "broadcast_request_p50_ms": pct(batch_s, 50) * 1e3,
            "broadcast_request_p99_ms": pct(batch_s, 99) * 1e3,
            "txs_per_nonempty_block": sum(blocks) / max(1, len(blocks)),
            "cpu_s_in_window": {"apps": sum(cpu1[:n_apps]) - sum(cpu0[:n_apps]),
                                "cometbft": sum(cpu1[n_apps:]) - sum(cpu0[n_apps:]),
                                "load_generator": own1 - own0},
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
            load: Load = LOADS["issue"], n_txs: int = 30_000, tx_bytes: int | None = None,
            extra_config: dict[str, Any] | None = None,
            workload: Workload | None = None, profile: Path | None = None) -> dict[str, Any]:
    """One run of ``app`` (one of ``APPS``) on a fresh 4-validator network."""
    if app not in APPS:
        raise ValueError(f"app must be one of {APPS}")
    orgs = workload.orgs if workload else [keys.new_identity(f"org-{i}", "org")
                                           for i in range(4)]
    t0 = time.perf_counter()
    if workload is None:
        workload = (medledger_workload(orgs, n_txs) if app == "medledger"
                    else kvstore_workload(orgs, n_txs, tx_bytes or 3000))
    gen_s = time.perf_counter() - t0
    res = asyncio.run(_run(base, app, workload, duration, load, extra_config or {}, profile))
    return {**res, "generate_s": gen_s}


def ceilings(base: Path, duration: float = 30.0, tx_bytes: int | None = None,
             n_txs: int = 30_000, extra_config: dict[str, Any] | None = None,
             loads: tuple[str, ...] = tuple(LOADS), apps: tuple[str, ...] = APPS,
             log: Any = None, profile_dir: Path | None = None) -> dict[str, Any]:
    """For each load shape: ``apps`` on identical networks, back to back; medledger's
    ratio to the in-process kvstore (``ratio``) and to the socket kvstore
    (``ratio_socket``). Each network is fresh, so the same pre-built txs serve every
    run. ``profile_dir``: py-spy of validator 0's medledger app during each load
    (``<load>.txt``, collapsed stacks)."""
    orgs = [keys.new_identity(f"org-{i}", "org") for i in range(4)]
    med = medledger_workload(orgs, n_txs)
    size = round(med.mean_tx_bytes)
    kv = kvstore_workload(orgs, 4 * n_txs, tx_bytes or size)
    out: dict[str, Any] = {"tx_bytes": size, "kvstore_tx_bytes": tx_bytes or size,
                           "duration_s": duration, "load_avg_before": os.getloadavg(),
                           "loads": {}}
    for name in loads:
        load = LOADS[name]
        runs: dict[str, Any] = {"load": load.__dict__, "load_avg_before": os.getloadavg()}
        for app in apps:
            if log:
                log(f"  {name} load ({load.batch} tx per request, {4 * load.senders_per_node} "
                    f"requests in flight): {app}")
            runs[app] = network(base / f"{name}-{app}", app, duration, load,
                                workload=med if app == "medledger" else kv,
                                extra_config=extra_config,
                                profile=profile_dir / f"{name}.txt" if profile_dir else None)
        runs["load_avg_after"] = os.getloadavg()
        if "medledger" in runs:
            med_rate = runs["medledger"]["tx_per_s"]
            if "kvstore" in runs:
                runs["ratio"] = med_rate / max(1e-9, runs["kvstore"]["tx_per_s"])
            if "kvstore-socket" in runs:
                runs["ratio_socket"] = med_rate / max(1e-9, runs["kvstore-socket"]["tx_per_s"])
        out["loads"][name] = runs
    out["load_avg_after"] = os.getloadavg()
    return out


def summary(res: dict[str, Any]) -> str:
    """One line per load and app: rate, latency, txs per block, CPU; then the ratios."""
    lines = [f"tx {res['tx_bytes']} B, {res['duration_s']:.0f} s per run, load average "
             f"{res['load_avg_before'][0]:.1f} -> {res['load_avg_after'][0]:.1f}"]
    for name, runs in res["loads"].items():
        lines.append(f"load {name}: {runs['load']}")
        for app in APPS:
            if app in runs:
                r = runs[app]
                cpu = r["cpu_s_in_window"]
                lines.append(
                    f"  {app:15s} {r['tx_per_s']:7.0f} tx/s  p50 {r['p50_ms']:6.0f} ms  "
                    f"p99 {r['p99_ms']:6.0f} ms  {r['txs_per_nonempty_block']:5.0f} tx/block  "
                    f"request p50 {r['broadcast_request_p50_ms']:5.0f} ms  cpu apps "
                    f"{cpu['apps']:5.1f} s cometbft {cpu['cometbft']:5.1f} s loadgen "
                    f"{cpu['load_generator']:4.1f} s")
        ratios = [f"{k} {runs[k]:.2f}" for k in ("ratio", "ratio_socket") if k in runs]
        lines.append(f"  medledger / kvstore: {', '.join(ratios)}")
    return "\n".join(lines)


def main() -> None:
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser(description="kvstore (in-process and socket) vs medledger "
                                 "on a 4-validator network")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--tx-bytes", type=int, default=None)
    ap.add_argument("--txs", type=int, default=30_000)
    ap.add_argument("--apps", default=",".join(APPS), help=f"subset of {','.join(APPS)}")
    ap.add_argument("--load", default="issue,clients",
                    help=f"load shapes to run: {','.join(LOADS)}, or custom "
                         "BATCH:SENDERS_PER_NODE[:MAX_IN_FLIGHT]")
    ap.add_argument("--async-broadcast", action="store_true",
                    help="broadcast_tx_async (do not wait for CheckTx)")
    ap.add_argument("--config", default="{}", help="JSON: config.toml keys, block_max_bytes, "
                    "timeout_commit")
    ap.add_argument("--profile", type=Path, default=None,
                    help="directory: py-spy of validator 0's medledger app per load")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    extra = json.loads(args.config)
    global BROADCAST
    if args.async_broadcast:
        BROADCAST = "broadcast_tx_async"
    names = []
    for spec in args.load.split(","):
        if spec not in LOADS:
            LOADS[spec] = Load(*map(int, spec.split(":")))
        names.append(spec)
    apps = tuple(args.apps.split(","))
    with tempfile.TemporaryDirectory(prefix="medledger-net-bench-") as tmp:
        res = ceilings(Path(tmp), args.seconds, args.tx_bytes, args.txs, extra,
                       tuple(names), apps, log=lambda m: print(m, file=sys.stderr, flush=True),
                       profile_dir=args.profile)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(res, indent=2, default=str))
    print(summary(res))


if __name__ == "__main__":
    main()
