"""Re-check a node's whole ledger from genesis, naming the first bad block and tx.

Checks, per block: the stored header hashes to its stored hash and links to the
previous one; every tx's bytes hash to its stored hash, decode, and carry a
valid signature; replaying the block through the core machine reproduces the
stored header (tx, results, writes and audit roots, app hash), the stored
result codes and the anchored audit events. At the end the replayed state must
equal the stored state table, key for key.

Memory stays bounded whatever the ledger's size: the replayed state lives in a scratch
SQLite file next to the ledger (``ScratchState``, deleted afterwards) behind a read
cache bounded in bytes, and both states are compared by walking them in key order, page by page.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medledger.core import machine
from medledger.core import state as st
from medledger.core.machine import BlockInput
from medledger.core.tx import decode_tx
from medledger.crypto import merkle
from medledger.crypto.canonical import b64d, loads, sha256
from medledger.crypto.signing import verify
from medledger.errors import IntegrityError, MedledgerError
from medledger.node.ledger_app import _MISSING, BoundedCache
from medledger.storage.blobs import BlobStore
from medledger.storage.sqlite import SqliteStore


@dataclass(frozen=True)
class VerifyReport:
    blocks: int
    txs: int
    bytes: int
    state_keys: int
    audit_events: int


class ScratchState:
    """The replayed state, on disk: a throw-away SQLite file and a bounded read cache.

    A ``StateReader`` for the machine; ``apply`` writes one block's writes in one
    transaction. Durability is off (the file is deleted when verify ends).
    """

    def __init__(self, directory: Path | str | None = None,
                 cache_bytes: int = 32 * 1024 * 1024) -> None:
        fd, self.path = tempfile.mkstemp(prefix=".verify-scratch-", suffix=".db",
                                         dir=directory)
        os.close(fd)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16384",
                       "temp_store=MEMORY"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL) "
                        "WITHOUT ROWID")
        self._cache = BoundedCache(cache_bytes)

    def get(self, key: str) -> bytes | None:
        hit = self._cache.lookup(key)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        value = None if row is None else bytes(row[0])
        self._cache.put(key, value)
        return value

    def scan(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"
        rows = self.db.execute("SELECT key, value FROM state WHERE key >= ? AND key < ? "
                               "ORDER BY key", (prefix, upper)).fetchall()
        for k, v in rows:
            yield k, bytes(v)

    def apply(self, writes: dict[str, bytes | None]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)",
                            [(k, v) for k, v in writes.items() if v is not None])
        self.db.executemany("DELETE FROM state WHERE key = ?",
                            [(k,) for k, v in writes.items() if v is None])
        self.db.execute("COMMIT")
        self._cache.invalidate(writes)

    def items(self, page: int = 4096) -> Iterator[tuple[str, bytes]]:
        """Every entry in key order, fetched in pages."""
        last = ""
        while True:
            rows = self.db.execute("SELECT key, value FROM state WHERE key > ? ORDER BY key "
                                   "LIMIT ?", (last, page)).fetchall()
            if not rows:
                return
            for k, v in rows:
                yield k, bytes(v)
            last = rows[-1][0]

    def close(self) -> None:
        self.db.close()
        for suffix in ("", "-journal", "-wal", "-shm"):
            try:
                os.unlink(self.path + suffix)
            except FileNotFoundError:
                pass


def verify_store(store: SqliteStore, progress: Callable[[int, int], None] | None = None,
                 from_height: int = 1) -> VerifyReport:
    """Raise ``IntegrityError`` naming block/tx at the first problem; else a report."""
    chain_raw, genesis_raw = store.meta("chain"), store.meta("genesis")
    if chain_raw is None or genesis_raw is None:
        raise IntegrityError("the store has no genesis: nothing to verify")
    replay = ScratchState(Path(store.path).parent if store.path != ":memory:" else None)
    try:
        return _verify(store, replay, chain_raw.decode(), genesis_raw, progress)
    finally:
        replay.close()


def _verify(store: SqliteStore, replay: ScratchState, chain: str, genesis_raw: bytes,
            progress: Callable[[int, int], None] | None) -> VerifyReport:
    writes = machine.genesis_writes(loads(genesis_raw))
    replay.apply(writes)
    app_hash = machine.genesis_app_hash(chain, writes)
    acc = machine.genesis_state_acc(writes)
    if store.meta("genesis_app_hash") not in (None, app_hash):
        raise IntegrityError("genesis app hash does not match the genesis organisations")
    prev_hash = b"\x00" * 32
    top = store.height
    with ThreadPoolExecutor(max_workers=1) as pool:
        n_txs, n_bytes, n_audit, expected_height, app_hash, prev_hash = _replay_blocks(
            store, replay, chain, pool, progress, app_hash, prev_hash, top, acc)
    if expected_height - 1 != top:
        raise IntegrityError(f"store says height {top} but blocks end at {expected_height - 1}")
    if top and (store.app_hash != app_hash or store.last_header_hash != prev_hash):
        raise IntegrityError("the stored app hash / head does not match the replayed chain")
    n_keys = _compare_state(store, replay)
    return VerifyReport(top, n_txs, n_bytes, n_keys, n_audit)


def _replay_blocks(store: SqliteStore, replay: ScratchState, chain: str,
                   pool: ThreadPoolExecutor, progress: Callable[[int, int], None] | None,
                   app_hash: bytes, prev_hash: bytes, top: int, acc: bytes
                   ) -> tuple[int, int, int, int, bytes, bytes]:
    n_txs = n_bytes = n_audit = 0
    expected_height = 1
    for height, header_bytes, stored_hash in store.blocks(1):
        if height != expected_height:
            raise IntegrityError(f"block {expected_height} is missing (next stored is {height})")
        expected_height += 1
        where = f"block {height}"
        if sha256(header_bytes) != stored_hash:
            raise IntegrityError(f"{where}: header bytes do not match the stored block hash")
        header = loads(header_bytes)
        if header.get("height") != height or bytes.fromhex(header["prev"]) != prev_hash:
            raise IntegrityError(f"{where}: header does not link to block {height - 1}")
        txs = store.block_txs(height)
        raws, checked, pending = [], set(), []
        for i, (idx, h, raw, code, _) in enumerate(txs):
            if idx != i:
                raise IntegrityError(f"{where}: tx {i} is missing or out of order")
            if sha256(raw) != h:
                raise IntegrityError(f"{where} tx {i} ({h.hex()[:16]}): stored bytes were "
                                     "altered (hash mismatch)")
            try:
                tx = decode_tx(raw)
            except MedledgerError as err:
                raise IntegrityError(f"{where} tx {i}: cannot be decoded: {err}") from err
            if code == 0:  # accepted txs must be well signed; refused ones are re-judged
                signer = st.principal(replay, tx.signer)
                pending.append((i, h, tx, None if signer is None else
                                b64d(signer["sign_pub"], field="sign_pub")))
                checked.add(h)
            raws.append(raw)
            n_bytes += len(raw)
        # signatures are checked on a worker thread (libsodium releases the GIL) while
        # this thread replays the block; a bad one is reported before the block counts
        sig_check = pool.submit(_bad_signatures, pending)
        if len(raws) != header["n_txs"]:
            gone = (f"tx {len(raws)} is missing" if len(raws) < header["n_txs"]
                    else f"tx {header['n_txs']} was added")
            raise IntegrityError(f"{where}: header says {header['n_txs']} txs, store has "
                                 f"{len(raws)} ({gone})")
        if merkle.root(raws).hex() != header["tx_root"]:
            _raise_bad_signature(where, sig_check.result())  # the sharper diagnosis first
            raise IntegrityError(f"{where}: {_tx_root_problem(raws, header['tx_root'])}")
        applied = machine.apply_block(replay, BlockInput(
            chain, height, header["time_ns"], tuple(raws), app_hash, prev_hash, acc), checked)
        if applied.header != header:
            diff = sorted(k for k in header if applied.header.get(k) != header.get(k))
            raise IntegrityError(f"{where}: replay does not reproduce the stored header "
                                 f"(differs in {', '.join(diff)})")
        for i, (r, stored) in enumerate(zip(applied.results, txs, strict=True)):
            if (r.code, r.log) != (stored[3], stored[4]):
                raise IntegrityError(f"{where} tx {i}: stored result code {stored[3]} but "
                                     f"replay gives {r.code}")
        leaves = store.audit_leaves(height)
        if leaves != [a.event for a in applied.audit]:
            raise IntegrityError(f"{where}: anchored audit events differ from the txs that "
                                 "carry them")
        bad = sig_check.result()
        late = [(i, h, tx) for i, h, tx, pub in pending if pub is None]
        for i, h, tx in late:  # signer registered in this very block
            if not machine.verify_signature(replay_with(replay, applied.writes), tx):
                bad.append((i, h))
        _raise_bad_signature(where, bad)
        replay.apply(applied.writes)
        app_hash, prev_hash, acc = applied.app_hash, applied.header_hash, applied.state_acc
        n_txs += len(raws)
        n_audit += len(leaves)
        if progress:
            progress(height, top)
    return n_txs, n_bytes, n_audit, expected_height, app_hash, prev_hash


def _raise_bad_signature(where: str, bad: list[tuple[int, bytes]]) -> None:
    if bad:
        i, h = min(bad)
        raise IntegrityError(f"{where} tx {i} ({h.hex()[:16]}): signature invalid")


def _bad_signatures(pending: list[tuple[int, bytes, Any, bytes | None]]
                    ) -> list[tuple[int, bytes]]:
    return [(i, h) for i, h, tx, pub in pending
            if pub is not None and not verify(pub, tx.signing_bytes, tx.sig)]


def replay_with(base: st.StateReader, writes: dict[str, bytes | None]) -> st.Overlay:
    overlay = st.Overlay(base)
    overlay.writes.update(writes)
    return overlay


def _compare_state(store: SqliteStore, replay: ScratchState) -> int:
    """Walk the stored state and the replayed state in key order, in step."""
    replayed = replay.items()
    n = 0
    for key, value in store.state_items():
        expected = next(replayed, None)
        if expected is None or expected[0] != key:
            first = key if expected is None else min(key, expected[0])
            raise IntegrityError(f"stored state differs from the replayed state at key "
                                 f"{first!r}")
        if expected[1] != value:
            raise IntegrityError(f"stored state differs from the replayed state at key {key!r}")
        n += 1
    leftover = next(replayed, None)
    if leftover is not None:
        raise IntegrityError(f"stored state differs from the replayed state at key "
                             f"{leftover[0]!r}")
    return n


def _tx_root_problem(raws: list[bytes], tx_root: str, max_search: int = 128) -> str:
    """Name the txs of a block whose stored order no longer matches its header's tx root."""
    if len(raws) <= max_search:
        for i in range(len(raws)):
            for j in range(i + 1, len(raws)):
                swapped = list(raws)
                swapped[i], swapped[j] = swapped[j], swapped[i]
                if merkle.root(swapped).hex() == tx_root:
                    return f"tx {i} and tx {j} were swapped (stored out of order)"
    return ("tx 0.. do not hash to the header's tx root: txs were reordered or replaced "
            "(each is individually well signed)")


@dataclass(frozen=True)
class BlobReport:
    held: int  # sealed blobs this node holds and re-hashed
    missing: list[str]  # "Type/id v<n>" whose content has not reached this node
    erased: int  # versions erased on the ledger (their blobs must be gone)


def verify_blobs(store: SqliteStore, blobs: BlobStore,
                 progress: Callable[[int], None] | None = None) -> BlobReport:
    """Re-hash every sealed blob the ledger references that this node holds (naming the
    record of a changed byte), check that erased versions' blobs are gone, and list the
    blobs this node lacks (ADR 4: reported, not a failure)."""
    held = erased = 0
    missing: list[str] = []
    for n, (_, raw) in enumerate(store.scan_paged("ver/"), 1):
        meta = loads(raw)
        ref = f"{meta['type']}/{meta['id']} v{meta['v']}"
        data = blobs.get(meta["blob"])
        if st.erased(meta):
            erased += 1
            if data is not None:
                raise IntegrityError(f"{ref} was erased on the ledger but its sealed blob is "
                                     "still held here")
        elif data is None:
            missing.append(ref)
        elif sha256(data).hex() != meta["blob"]:
            raise IntegrityError(f"{ref}: sealed blob bytes were altered (hash mismatch)")
        else:
            held += 1
        if progress and n % 1000 == 0:
            progress(n)
    for key, raw in store.scan_paged("wrap/"):
        h = loads(raw)["key"]
        data = blobs.get(h)
        if data is not None and sha256(data).hex() != h:
            raise IntegrityError(f"{key}: re-wrapped key blob was altered (hash mismatch)")
    return BlobReport(held, missing, erased)

