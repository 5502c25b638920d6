"""The ledger application: the core state machine over a store, behind the driver contract.

Implements ``consensus.app.LedgerApplication`` for both drivers. Keeps the block
being finalized in memory until ``commit`` persists it, and four caches that keep
work from being done twice:

- ``verified``: hashes of txs whose signatures are known good (CheckTx verified them),
  so FinalizeBlock and rechecks do not verify them again;
- ``state``: a read-through cache of committed state (organisations, actors, nonces,
  record heads), kept true by ``commit``, which is the only writer of state;
- the mempool's admitted txs (signer, nonce), so a recheck after each block is one
  nonce lookup instead of a decode (``commit`` forgets the admitted txs of a signer
  whose entry the block changed: those are judged afresh);
- ``decoded``: the txs CheckTx decoded (bounded in bytes), so FinalizeBlock does not
  decode them again; a tx leaves it when committed or refused.

CheckTx runs the mempool's admission rule (``core.mempool``), not the full state
transition; ``precheck`` runs the full transition for a node's own submissions, so
its users still get policy refusals before their tx reaches the network.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from medledger.consensus.app import AppInfo, BlockOutcome, QueryResult, TxResult
from medledger.core import machine, mempool
from medledger.core import state as st
from medledger.core.machine import BlockApplied, BlockInput
from medledger.core.tx import MAX_TX_BYTES, Tx
from medledger.crypto.canonical import canonical, loads, sha256
from medledger.errors import IntegrityError, InvalidInput, MedledgerError, StorageError
from medledger.storage.sqlite import SqliteStore

log = logging.getLogger(__name__)


class VerifiedCache:
    """Hashes of txs whose signatures are known good (bounded, oldest evicted), by signer,
    so a signer whose entry changes (key rotated, deactivated) can be forgotten whole."""

    def __init__(self, size: int = 200_000) -> None:
        self.size = size
        self._d: OrderedDict[bytes, str] = OrderedDict()
        self._by_signer: dict[str, set[bytes]] = {}

    def add(self, h: bytes, signer: str = "") -> None:
        if h in self._d:
            return
        self._d[h] = signer
        self._by_signer.setdefault(signer, set()).add(h)
        if len(self._d) > self.size:
            old, who = self._d.popitem(last=False)
            self._discard(old, who)

    def _discard(self, h: bytes, signer: str) -> None:
        hashes = self._by_signer.get(signer)
        if hashes is not None:
            hashes.discard(h)
            if not hashes:
                del self._by_signer[signer]

    def forget_signers(self, signers: Iterable[str]) -> None:
        for signer in signers:
            for h in self._by_signer.pop(signer, set()):
                self._d.pop(h, None)

    def __contains__(self, h: object) -> bool:
        return h in self._d

    def __len__(self) -> int:
        return len(self._d)


class DecodedTxs:
    """Decoded txs by tx hash, oldest evicted beyond ``max_bytes`` (a decoded tx is
    counted as ``OBJECT_FACTOR`` times its raw size: the parsed body's objects)."""

    OBJECT_FACTOR = 4

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[bytes, Tx] = OrderedDict()

    def _size(self, tx: Tx) -> int:
        return len(tx.raw) * self.OBJECT_FACTOR

    def add(self, tx: Tx) -> None:
        if tx.hash in self._d or self._size(tx) > self.max_bytes:
            return
        self._d[tx.hash] = tx
        self.bytes += self._size(tx)
        while self.bytes > self.max_bytes:
            _, old = self._d.popitem(last=False)
            self.bytes -= self._size(old)

    def get(self, h: bytes) -> Tx | None:
        return self._d.get(h)

    def discard(self, h: bytes) -> None:
        tx = self._d.pop(h, None)
        if tx is not None:
            self.bytes -= self._size(tx)

    def __contains__(self, h: object) -> bool:
        return h in self._d

    def __len__(self) -> int:
        return len(self._d)


_MISSING = object()


class BoundedCache:
    """A key -> value (or ``None``: known absent) map kept under ``max_bytes`` (keys and
    values counted, plus a per-entry overhead); the oldest entries go first."""

    ENTRY_OVERHEAD = 100  # dict slot, the key's and the value's object headers

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[str, bytes | None] = OrderedDict()

    def _size(self, key: str, value: bytes | None) -> int:
        return len(key) + (len(value) if value else 0) + self.ENTRY_OVERHEAD

    def lookup(self, key: str) -> object:
        """The cached value (``None`` = known absent), or ``_MISSING``."""
        return self._d.get(key, _MISSING)

    def put(self, key: str, value: bytes | None) -> None:
        old = self._d.pop(key, _MISSING)
        if old is not _MISSING:
            self.bytes -= self._size(key, old)  # type: ignore[arg-type]
        self._d[key] = value
        self.bytes += self._size(key, value)
        while self.bytes > self.max_bytes and self._d:
            k, v = self._d.popitem(last=False)
            self.bytes -= self._size(k, v)

    def invalidate(self, keys: Iterable[str]) -> None:
        """Forget ``keys`` (they were written): the next read fetches them again.

        Written values are not kept: orjson's output over-allocates (~4 KiB per value,
        whatever its length), so caching them would cost far more than ``max_bytes``."""
        for key in keys:
            old = self._d.pop(key, _MISSING)
            if old is not _MISSING:
                self.bytes -= self._size(key, old)  # type: ignore[arg-type]

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)


class StateCache:
    """Committed state, read through to the store and kept under ``max_bytes``.

    Misses are cached too (a nonce not yet used is looked up by CheckTx, then by
    FinalizeBlock). ``apply`` must see every committed write (it forgets the keys
    written): ``LedgerApp.commit`` is the only writer of the state table.

    ``get`` may be called from any thread (the node's request handlers read principals
    and record heads through it): a value read from the store is cached only if no
    commit was applied while it was being read, so a value from before a commit never
    outlives it. ``get_many``, ``scan`` and ``apply`` are the event loop's.
    """

    def __init__(self, store: SqliteStore, max_bytes: int = 64 * 1024 * 1024,
                 max_scans: int = 20_000) -> None:
        self.store = store
        self.cache = BoundedCache(max_bytes)
        # prefix scans (e.g. a patient's consents, read by every write about them);
        # only small results are kept, and a prefix is forgotten when a key under it
        # is written
        self.max_scans = max_scans
        self._scans: OrderedDict[str, list[tuple[str, bytes]]] = OrderedDict()
        self._lock = threading.Lock()  # a cache fill against a commit's invalidation
        self._generation = 0  # commits applied (and clears)

    def get(self, key: str) -> bytes | None:
        hit = self.cache.lookup(key)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        generation = self._generation
        value = self.store.get(key)
        with self._lock:
            if generation == self._generation:
                self.cache.put(key, value)
        return value

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """Like ``get`` for each key; the misses in one query, and not cached (the
        caller is about to write these keys: ``block_digests``' old values, the
        heads a batch's or staged import's operations read ahead)."""
        out: dict[str, bytes | None] = {}
        missing = []
        for key in keys:
            hit = self.cache.lookup(key)
            if hit is _MISSING:
                missing.append(key)
            else:
                out[key] = hit  # type: ignore[assignment]
        if missing:
            out.update(self.store.get_many(missing))
        return out

    _SCAN_MAX_ROWS = 16

    def scan(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        rows = self._scans.get(prefix)
        if rows is None:
            rows = list(self.store.scan(prefix))
            if not prefix.endswith("/") or len(rows) > self._SCAN_MAX_ROWS:
                return iter(rows)
            self._scans[prefix] = rows
            if len(self._scans) > self.max_scans:
                self._scans.popitem(last=False)
        return iter(rows)

    def apply(self, writes: dict[str, bytes | None]) -> None:
        with self._lock:
            self._generation += 1
            self.cache.invalidate(writes)
        if self._scans:
            for key in writes:  # every "a/", "a/b/", ... prefix of a written key
                end = key.find("/")
                while end != -1:
                    self._scans.pop(key[:end + 1], None)
                    end = key.find("/", end + 1)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self.cache.clear()
        self._scans.clear()


class LedgerApp:
    def __init__(self, store: SqliteStore, chain: str | None = None, *,
                 max_tx_bytes: int = MAX_TX_BYTES) -> None:
        self.store = store
        stored_chain = store.meta("chain")
        self.chain = stored_chain.decode() if stored_chain else (chain or "")
        self.max_tx_bytes = max_tx_bytes
        self.pending: tuple[BlockApplied, tuple[bytes, ...]] | None = None
        self.verified = VerifiedCache()
        self.state = StateCache(store)
        self._admitted: OrderedDict[bytes, mempool.Admitted] = OrderedDict()
        self.decoded = DecodedTxs()
        self.on_commit: list[Callable[[BlockApplied, tuple[bytes, ...]], None]] = []
        self.digest_map: machine.DigestMap | None = None  # the node's workers, when running
        self._load_head()

    def _load_head(self) -> None:
        self.height = self.store.height
        self.app_hash = self.store.app_hash
        self.header_hash = self.store.last_header_hash
        self.state_acc = self.store.state_acc
        self.last_time_ns = 0
        if self.height:
            head = self.store.block(self.height)
            self.last_time_ns = head["time_ns"] if head else 0

    # ------------------------------------------------------------ contract
    def info(self) -> AppInfo:
        return AppInfo(self.height, self.app_hash)

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
        self.state.clear()
        self._load_head()
        return app_hash

    def check_tx(self, tx: bytes, recheck: bool = False) -> TxResult:
        """The mempool's admission rule (``core.mempool``); a recheck of a tx admitted
        here only asks whether its nonce is still unused (``commit`` forgets admitted
        txs whose signer's entry a block changed, so their signer stands)."""
        if recheck:
            h = sha256(tx)
            admitted = self._admitted.get(h)
            if admitted is not None:
                try:
                    mempool.still_admissible(self.state, admitted, signer_unchanged=True)
                except MedledgerError as err:
                    self._forget(h)
                    return TxResult(err.code, str(err))
                return TxResult(0)
        h = sha256(tx)
        try:
            decoded = self._decode(h, tx)
            admitted = mempool.admit_tx(self.state, decoded, self.chain, self.verified)
        except MedledgerError as err:
            self._forget(h)
            return TxResult(err.code, str(err))
        self.verified.add(admitted.tx_hash, admitted.signer)
        self._admitted[admitted.tx_hash] = admitted
        if len(self._admitted) > self.verified.size:
            self._admitted.popitem(last=False)
        self.decoded.add(decoded)
        return TxResult(0)

    def _decode(self, h: bytes, tx: bytes) -> Tx:
        """``tx`` decoded: as this node decoded it before (``precheck``), or now."""
        known = self.decoded.get(h)
        if known is not None and known.raw == tx:
            return known
        return mempool.decode(tx, self.max_tx_bytes)

    def _forget(self, h: bytes) -> None:
        self._admitted.pop(h, None)
        self.decoded.discard(h)

    def precheck(self, tx: bytes) -> TxResult:
        """The full state transition against committed state, writes discarded: would
        this tx apply now? For a node's own submissions, before they are broadcast."""
        try:  # decoded and verified once, remembered for CheckTx and the block
            decoded = self._decode(sha256(tx), tx)
            admitted = mempool.admit_tx(self.state, decoded, self.chain, self.verified)
        except MedledgerError as err:
            return TxResult(err.code, str(err))
        self.verified.add(admitted.tx_hash, admitted.signer)
        result = machine.check_tx(self.state, tx, self.chain, self.height + 1,
                                  self.last_time_ns, self.verified, decoded)
        if result.code == 0:
            self.decoded.add(decoded)
        return TxResult(result.code, result.log)

    def finalize_block(self, height: int, time_ns: int, txs: list[bytes], proposer: bytes,
                       block_hash: bytes) -> BlockOutcome:
        if height != self.height + 1:  # CometBFT never skips or repeats a height
            raise IntegrityError(f"block {height} does not follow this ledger's height "
                                 f"{self.height}: refused")
        block = BlockInput(self.chain, height, time_ns, tuple(txs), self.app_hash,
                           self.header_hash, self.state_acc)
        applied = machine.apply_block(self.state, block, self.verified, self.decoded.get,
                                      self.digest_map)
        self.pending = (applied, tuple(txs))
        results = tuple(TxResult(r.code, r.log, r.data.encode()) for r in applied.results)
        return BlockOutcome(results, applied.app_hash, applied.validator_updates)

    def commit(self) -> int:
        if self.pending is None:
            return 0
        applied, txs = self.pending
        self.store.commit_block(applied, txs)
        self.pending = None
        self.state.apply(applied.writes)
        # a signer whose entry changed (key rotated, deactivated) is judged afresh
        changed = {key.split("/", 1)[1] for key in applied.writes
                   if key.startswith(("actor/", "org/"))}
        if changed:
            self.verified.forget_signers(changed)
            for h in [h for h, a in self._admitted.items() if a.signer in changed]:
                self._forget(h)
        self.height = int(applied.header["height"])
        self.app_hash, self.header_hash = applied.app_hash, applied.header_hash
        self.state_acc = applied.state_acc
        self.last_time_ns = applied.header["time_ns"]
        for h in applied.tx_hashes:
            self._forget(h)
        for listener in list(self.on_commit):
            try:
                listener(applied, txs)
            except Exception:  # a listener bug must never break consensus
                log.exception("commit listener failed")
        return 0

    def query(self, path: str, data: bytes, height: int) -> QueryResult:
        h = self.height
        if path == "/state":
            value = self.store.get(data.decode("utf-8", "replace"))
            return QueryResult(0 if value is not None else 8, value or b"", "", h)
        if path.startswith("/p2p/filter/id/"):  # CometBFT asks before adding a peer
            node = path.removeprefix("/p2p/filter/id/")
            if st.peer_admitted(self.state, node):
                return QueryResult(0, b"", "", h)
            return QueryResult(3, b"", f"node {node} is not an active member's node", h)
        if path.startswith("/p2p/filter/addr/"):  # admission is by node id, not address
            return QueryResult(0, b"", "", h)
        if path == "/status":
            return QueryResult(0, canonical({"height": h, "app_hash": self.app_hash.hex(),
                                             "chain": self.chain}), "", h)
        return QueryResult(2, b"", f"unknown query path {path}", h)

