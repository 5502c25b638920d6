"""Real CometBFT v0.38 processes driving our asyncio ABCI server.

A toy deterministic key=value application (app hash = sha256 of the sorted state)
stands in for the ledger: one node commits txs and reports the right app hash; four
validators agree on heights and hashes, survive a kill -9 of one node (CometBFT and its
application), and the restarted node (empty in-memory app -> Info height 0) replays
from genesis through the handshake and catches up to the same app hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from medledger.consensus.app import AppInfo, BlockOutcome, QueryResult, TxResult
from medledger.consensus.cometbft import (
    CometbftNotFound,
    CometRpc,
    NodeLayout,
    binary_path,
    kill_node,
    make_testnet,
    start_node,
    stop_node,
)

try:
    from medledger.consensus.abci import AbciServer
except ImportError as exc:  # protos not generated
    pytest.skip(f"ABCI protos missing: {exc}", allow_module_level=True)

try:
    binary_path()
except CometbftNotFound as exc:
    pytest.skip(str(exc), allow_module_level=True)

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

APP_STATE = {"orgs": [{"id": "org-a", "name": "Hospital A"}, {"id": "org-b", "name": "Clinic B"}]}


class ToyKV:
    """Deterministic key=value store implementing ``LedgerApplication`` in memory."""

    def __init__(self) -> None:
        self.committed: dict[bytes, bytes] = {}
        self.height = 0
        self.app_hash = b""
        self.pending: dict[bytes, bytes] | None = None
        self.pending_height = 0
        self.pending_hash = b""
        self.hash_at: dict[int, bytes] = {}
        self.chain_id = ""
        self.genesis: Any = None
        self.finalized_heights: list[int] = []
        self.block_times: list[int] = []

    @staticmethod
    def state_hash(state: dict[bytes, bytes]) -> bytes:
        h = hashlib.sha256()
        for k, v in sorted(state.items()):
            h.update(len(k).to_bytes(4, "big") + k + len(v).to_bytes(4, "big") + v)
        return h.digest()

    @staticmethod
    def parse(tx: bytes) -> tuple[bytes, bytes] | None:
        key, sep, value = tx.partition(b"=")
        return (key, value) if sep and key else None

    def info(self) -> AppInfo:
        return AppInfo(last_block_height=self.height, last_block_app_hash=self.app_hash)

    def init_chain(self, chain_id: str, app_state_bytes: bytes, time_ns: int) -> bytes:
        self.chain_id = chain_id
        self.genesis = json.loads(app_state_bytes)
        canonical = json.dumps(self.genesis, sort_keys=True, separators=(",", ":")).encode()
        self.committed = {b"__genesis__": canonical}
        self.app_hash = self.state_hash(self.committed)
        self.hash_at[0] = self.app_hash
        return self.app_hash

    def check_tx(self, tx: bytes, recheck: bool) -> TxResult:
        if self.parse(tx) is None:
            return TxResult(code=2, log="expected key=value")
        return TxResult(code=0)

    def finalize_block(
        self, height: int, time_ns: int, txs: list[bytes], proposer: bytes, block_hash: bytes
    ) -> BlockOutcome:
        state = dict(self.committed)
        results = []
        for tx in txs:
            kv = self.parse(tx)
            if kv is None:
                results.append(TxResult(code=2, log="expected key=value"))
                continue
            state[kv[0]] = kv[1]
            results.append(
                TxResult(code=0, data=kv[0], events=(("kv", (("key", kv[0].decode()),)),))
            )
        self.pending, self.pending_height = state, height
        self.pending_hash = self.state_hash(state)
        self.finalized_heights.append(height)
        self.block_times.append(time_ns)
        return BlockOutcome(tx_results=tuple(results), app_hash=self.pending_hash)

    def commit(self) -> int:
        assert self.pending is not None
        self.committed, self.height, self.app_hash = (
            self.pending,
            self.pending_height,
            self.pending_hash,
        )
        self.hash_at[self.height] = self.app_hash
        self.pending = None
        return 0

    def query(self, path: str, data: bytes, height: int) -> QueryResult:
        if path != "/key":
            return QueryResult(code=1, log=f"unknown path {path}")
        if data not in self.committed:
            return QueryResult(code=8, log="not found", height=self.height)
        return QueryResult(code=0, value=self.committed[data], height=self.height)


# --------------------------------------------------------------------------- harness


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every CometBFT process a test starts; all are killed at teardown, whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        kill_node(proc)


class Node:
    """One validator: toy app + ABCI server + cometbft process + RPC client."""

    def __init__(self, layout: NodeLayout, procs: list[subprocess.Popen[bytes]]) -> None:
        self.layout = layout
        self._procs = procs
        self.app = ToyKV()
        self.server: AbciServer | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.rpc = CometRpc(layout.rpc_url)

    async def start(self, fresh_app: bool = False) -> None:
        if fresh_app:
            self.app = ToyKV()
        self.server = AbciServer.at(self.app, self.layout.proxy_app)
        await self.server.start()
        self.proc = start_node(self.layout)
        self._procs.append(self.proc)

    async def crash(self) -> None:
        """kill -9 CometBFT and drop the application (in-memory state lost)."""
        assert self.proc is not None and self.server is not None
        kill_node(self.proc)
        await self.server.stop()

    async def stop(self) -> None:
        if self.proc is not None:
            await asyncio.to_thread(stop_node, self.proc, 10.0)
        if self.server is not None:
            await self.server.stop()
        await self.rpc.aclose()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.layout.log_path.read_text().splitlines()[-n:])
        except OSError:
            return "(no log)"


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except Exception:  # noqa: BLE001 - RPC not up yet etc.
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_committed(rpc: CometRpc, tx_hashes: list[str], timeout: float = 20.0) -> int:
    """Wait until every tx is committed; return the highest block height among them."""
    heights: dict[str, int] = {}

    async def all_found() -> bool:
        for h in tx_hashes:
            if h not in heights:
                found = await rpc.tx(h)
                if found is None:
                    return False
                assert found.code == 0, found
                heights[h] = found.height
        return True

    await eventually(all_found, timeout, f"{len(tx_hashes)} txs to commit")
    return max(heights.values())


def run(coro: Awaitable[None]) -> None:
    async def wrapper() -> None:
        await coro

    asyncio.run(wrapper())


# --------------------------------------------------------------------------- tests


def test_single_node_commits_txs_and_reports_app_hash(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    async def main() -> None:
        [layout] = make_testnet(tmp_path, 1, "medledger-solo-test", APP_STATE, log_level="info")
        node = Node(layout, procs)
        try:
            await node.start()
            await node.rpc.wait_for_height(1, timeout=20)
            assert node.app.chain_id == "medledger-solo-test"
            assert node.app.genesis == APP_STATE

            hashes = []
            for i in range(5):
                code, log, tx_hash = await node.rpc.broadcast_tx_sync(
                    b"patient%d=record%d" % (i, i)
                )
                assert code == 0, log
                hashes.append(tx_hash)
            code, log, _ = await node.rpc.broadcast_tx_sync(b"not-a-kv-pair")
            assert (code, log) == (2, "expected key=value")

            top = await wait_committed(node.rpc, hashes)
            await node.rpc.wait_for_height(top + 1, timeout=10)
            # The header of block h+1 carries the app hash after block h.
            assert await node.rpc.block_app_hash(top + 1) == node.app.hash_at[top].hex().upper()
            status = await node.rpc.status()
            assert not status.catching_up
            assert status.app_hash_hex == node.app.hash_at[status.height - 1].hex().upper()

            found = await node.rpc.tx(hashes[2])
            assert (
                found is not None and found.tx == b"patient2=record2" and found.data == b"patient2"
            )
            code, value, _, at = await node.rpc.abci_query("/key", b"patient3")
            assert (code, value) == (0, b"record3") and at >= top
            code, _, log, _ = await node.rpc.abci_query("/key", b"nobody")
            assert (code, log) == (8, "not found")
            # block time is strictly increasing and comes from the block, never the clock
            assert node.app.block_times == sorted(node.app.block_times)
            assert node.server is not None and node.server.fatal_error is None
        except BaseException:
            print("---- cometbft log ----\n" + node.log_tail(60))
            raise
        finally:
            await node.stop()

    run(main())


class ExplodingKV(ToyKV):
    """Raises in finalize_block at height ``at`` - a node-fatal application bug."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def finalize_block(
        self, height: int, time_ns: int, txs: list[bytes], proposer: bytes, block_hash: bytes
    ) -> BlockOutcome:
        if height == self.at:
            raise RuntimeError("bug in the state machine")
        return super().finalize_block(height, time_ns, txs, proposer, block_hash)


def test_fatal_app_error_halts_cometbft(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """finalize_block raising must stop the node, never let it sign a wrong app hash."""

    async def main() -> None:
        [layout] = make_testnet(tmp_path, 1, "medledger-fatal-test", APP_STATE)
        node = Node(layout, procs)
        node.app = ExplodingKV(at=3)
        try:
            await node.start()

            async def exited() -> bool:
                return node.proc is not None and node.proc.poll() is not None

            await eventually(exited, 30, "cometbft to halt after the fatal app error")
            assert node.server is not None and node.server.fatal_error is not None
            assert "bug in the state machine" in str(node.server.fatal_error)
            assert node.app.height == 2
        except BaseException:
            print("---- cometbft log ----\n" + node.log_tail(40))
            raise
        finally:
            await node.stop()

    run(main())


def test_four_validators_agree_survive_crash_and_replay(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    async def main() -> None:
        layouts = make_testnet(tmp_path, 4, "medledger-net-test", APP_STATE)
        nodes = [Node(lay, procs) for lay in layouts]
        try:
            t0 = time.monotonic()
            for node in nodes:  # all ABCI servers first, then the CometBFT processes
                node.server = AbciServer.at(node.app, node.layout.proxy_app)
                await node.server.start()
            for node in nodes:
                node.proc = start_node(node.layout)
                procs.append(node.proc)
            await asyncio.gather(*(n.rpc.wait_for_height(2, timeout=30) for n in nodes))
            print(f"4 nodes at height 2 after {time.monotonic() - t0:.1f}s")

            # txs submitted to every node end up in the same blocks everywhere
            hashes = []
            for i in range(12):
                code, log, tx_hash = await nodes[i % 4].rpc.broadcast_tx_sync(b"k%d=v%d" % (i, i))
                assert code == 0, log
                hashes.append(tx_hash)
            top = await wait_committed(nodes[0].rpc, hashes)
            await asyncio.gather(*(n.rpc.wait_for_height(top + 1, timeout=15) for n in nodes))
            header_hashes = {await n.rpc.block_app_hash(top + 1) for n in nodes}
            assert header_hashes == {nodes[0].app.hash_at[top].hex().upper()}
            assert all(n.app.hash_at[top] == nodes[0].app.hash_at[top] for n in nodes)
            assert all(n.app.committed.get(b"k11") == b"v11" for n in nodes)
            print(f"12 txs agreed at height {top} after {time.monotonic() - t0:.1f}s")

            # kill -9 node 3 (CometBFT and its app): 3 of 4 validators keep the chain going
            victim = nodes[3]
            await victim.crash()
            crashed_at = victim.app.height
            more: list[str] = []
            i = 12
            # keep the 3 survivors busy until node3 has missed well over a handful of blocks
            while (await nodes[0].rpc.status()).height < crashed_at + 8:
                code, log, tx_hash = await nodes[i % 3].rpc.broadcast_tx_sync(b"k%d=v%d" % (i, i))
                assert code == 0, log
                more.append(tx_hash)
                i += 1
                await asyncio.sleep(0.15)
            last_key = b"k%d" % (i - 1)
            top2 = await wait_committed(nodes[0].rpc, more, timeout=30)
            await asyncio.gather(*(n.rpc.wait_for_height(top2 + 1, timeout=20) for n in nodes[:3]))
            assert top2 > crashed_at
            print(
                f"chain continued to {top2} without node3 (crashed at {crashed_at}) "
                f"after {time.monotonic() - t0:.1f}s"
            )

            # restart with an EMPTY app: Info says height 0, so CometBFT runs InitChain and
            # replays its stored blocks, then block-syncs the rest from its peers.
            await victim.start(fresh_app=True)
            target = (await nodes[0].rpc.status()).height

            async def caught_up() -> bool:
                st = await victim.rpc.status()
                return st.height >= target and not st.catching_up and victim.app.height >= top2

            await eventually(caught_up, 45, f"node3 to catch up to height {target}")
            assert victim.app.finalized_heights[0] == 1  # replayed from genesis
            assert victim.app.chain_id == "medledger-net-test"
            for h in range(0, top2 + 1):
                assert victim.app.hash_at[h] == nodes[0].app.hash_at[h], f"height {h}"
            assert victim.app.committed.get(last_key) == b"v%d" % (i - 1)
            common = min(n.app.height for n in nodes)
            assert len({n.app.hash_at[common] for n in nodes}) == 1
            assert {await n.rpc.block_app_hash(common) for n in nodes} == {
                nodes[0].app.hash_at[common - 1].hex().upper()
            }
            print(
                f"node3 caught up at height {victim.app.height} after {time.monotonic() - t0:.1f}s"
            )
            for node in nodes:
                assert node.server is not None and node.server.fatal_error is None
        except BaseException:
            for node in nodes:
                print(f"---- {node.layout.moniker} log ----\n" + node.log_tail(25))
            raise
        finally:
            await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)

    run(main())
