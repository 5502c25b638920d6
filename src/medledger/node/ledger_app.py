"""The ledger application: the core state machine over a store, behind the driver contract.

Implements ``consensus.app.LedgerApplication`` for both drivers. Keeps the block
being finalized in memory until ``commit`` persists it, and a bounded cache of
tx hashes whose signatures CheckTx already verified, so FinalizeBlock does not
verify them twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from medledger.consensus.app import AppInfo, BlockOutcome, QueryResult, TxResult
from medledger.core import machine
from medledger.core.machine import BlockApplied, BlockInput
from medledger.crypto.canonical import canonical, loads, sha256
from medledger.errors import InvalidInput, StorageError
from medledger.storage.sqlite import SqliteStore

log = logging.getLogger(__name__)


class VerifiedCache:
    """Hashes of txs whose signatures are known good (bounded, oldest evicted)."""

    def __init__(self, size: int = 200_000) -> None:
        self.size = size
        self._d: OrderedDict[bytes, None] = OrderedDict()

    def add(self, h: bytes) -> None:
        self._d[h] = None
        if len(self._d) > self.size:
            self._d.popitem(last=False)

    def __contains__(self, h: object) -> bool:
        return h in self._d


class LedgerApp:
    def __init__(self, store: SqliteStore, chain: str | None = None) -> None:
        self.store = store
        stored_chain = store.meta("chain")
        self.chain = stored_chain.decode() if stored_chain else (chain or "")
        self.pending: tuple[BlockApplied, tuple[bytes, ...]] | None = None
        self.verified = VerifiedCache()
        self.on_commit: list[Callable[[BlockApplied, tuple[bytes, ...]], None]] = []
        self.last_time_ns = 0
        if store.height:
            head = store.block(store.height)
            self.last_time_ns = head["time_ns"] if head else 0

    # ------------------------------------------------------------ contract
    def info(self) -> AppInfo:
        return AppInfo(self.store.height, self.store.app_hash)

    def init_chain(self, chain_id: str, app_state_bytes: bytes, time_ns: int) -> bytes:
        if self.store.meta("chain") is not None:
            if self.store.meta("chain") != chain_id.encode():
                raise StorageError(f"this store belongs to chain {self.chain}, not {chain_id}")
            return self.store.meta("genesis_app_hash") or b""
        app_state = loads(app_state_bytes) if app_state_bytes else {}
        if not isinstance(app_state, dict):
            raise InvalidInput("genesis app_state must be an object")
        writes = machine.genesis_writes(app_state)
        app_hash = machine.genesis_app_hash(chain_id, writes)
        self.store.init_genesis(chain_id, app_state, writes, app_hash,
                                machine.genesis_state_acc(writes))
        self.chain = chain_id
        return app_hash

    def check_tx(self, tx: bytes, recheck: bool = False) -> TxResult:
        h = sha256(tx)
        result = machine.check_tx(self.store, tx, self.chain, self.store.height + 1,
                                  self.last_time_ns, self.verified)
        if result.code == 0:
            self.verified.add(h)
        return TxResult(result.code, result.log)

    def finalize_block(self, height: int, time_ns: int, txs: list[bytes], proposer: bytes,
                       block_hash: bytes) -> BlockOutcome:
        block = BlockInput(self.chain, height, time_ns, tuple(txs), self.store.app_hash,
                           self.store.last_header_hash, self.store.state_acc)
        applied = machine.apply_block(self.store, block, self.verified)
        self.pending = (applied, tuple(txs))
        results = tuple(TxResult(r.code, r.log, r.data.encode()) for r in applied.results)
        return BlockOutcome(results, applied.app_hash, applied.validator_updates)

    def commit(self) -> int:
        if self.pending is None:
            return 0
        applied, txs = self.pending
        self.store.commit_block(applied, txs)
        self.pending = None
        self.last_time_ns = applied.header["time_ns"]
        for listener in list(self.on_commit):
            try:
                listener(applied, txs)
            except Exception:  # a listener bug must never break consensus
                log.exception("commit listener failed")
        return 0

    def query(self, path: str, data: bytes, height: int) -> QueryResult:
        h = self.store.height
        if path == "/state":
            value = self.store.get(data.decode("utf-8", "replace"))
            return QueryResult(0 if value is not None else 8, value or b"", "", h)
        if path == "/status":
            return QueryResult(0, canonical({"height": h, "app_hash": self.store.app_hash.hex(),
                                             "chain": self.chain}), "", h)
        return QueryResult(2, b"", f"unknown query path {path}", h)

