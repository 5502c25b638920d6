"""The start check: what a node's access decisions rely on, verified before it serves.

``medledger verify`` replays the whole chain (minutes on a big ledger); a node start
cannot wait for that, yet it must not serve a tampered store. This module checks,
without re-executing a single tx:

* **every block** (not only the newest): header bytes against their stored hash, the
  hash links from genesis to the stored head, chain id and heights;
* **txs**: bytes against their stored hashes and each header's tx root; the stored
  result ``(code, data)`` of each tx against the header's results root (a changed
  ``txs.code`` is found);
* **anchored audit index**: events against each header's audit root and count, and
  its query columns (event id, patient, time) against the event bytes;
* **the head seal**: an HMAC (key derived from the org key, ``crypto.localseal``) of
  the newest block this node committed: removing the last blocks with their txs (and
  rewinding ``meta``) is found;
* **the state**: the state digest committed in the head header, recomputed from the
  state table (``_check_state``: see the marked hook);
* **the local, not yet anchored audit log**: its hash chain from the sealed checkpoint
  to the sealed head (a deleted or edited event is found), and every row said to be
  anchored is in the anchored index at that height.

Large ledgers are checked by a process pool, a range of blocks per task. A failure
sets ``node.integrity_failure``; the API then refuses every data route (``api/app.py``).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

from medledger.core import machine
from medledger.crypto import localseal, merkle
from medledger.crypto.canonical import canonical, loads, sha256
from medledger.errors import IntegrityError, MedledgerError
from medledger.storage.sqlite import HEAD_SEAL, SqliteStore

if TYPE_CHECKING:
    from medledger.node.service import Node

log = logging.getLogger(__name__)
POOL_FROM = 2000  # below this job size, checking inline beats starting worker processes
ZERO = b"\x00" * 32


@dataclass(frozen=True)
class StartReport:
    blocks: int
    txs: int
    tx_bytes: int
    audit_events: int
    state_entries: int | None  # None: the head header commits no state digest to check
    local_audit_events: int
    seconds: float

    def summary(self) -> str:
        state = ("state not committed in headers" if self.state_entries is None
                 else f"{self.state_entries:,} state entries")
        return (f"{self.blocks:,} blocks, {self.txs:,} txs ({self.tx_bytes / 1e6:.1f} MB), "
                f"{self.audit_events:,} anchored audit events, {state}, "
                f"{self.local_audit_events:,} local audit events checked")


def start_check(node: Node, workers: int | None = None) -> StartReport | None:
    """Check ``node``'s store; on failure set ``node.integrity_failure`` and return None."""
    try:
        report = check_store(node.store, node.config.chain, workers)
    except MedledgerError as err:
        node.integrity_failure = f"local ledger failed its start check: {err}"
        log.critical("REFUSING TO SERVE: %s", node.integrity_failure)
        return None
    log.info("start check passed: %s in %.2fs", report.summary(), report.seconds)
    return report


def check_store(store: SqliteStore, chain: str | None = None, workers: int | None = None
                ) -> StartReport:
    """Raise ``IntegrityError`` naming the first problem found; else a report."""
    started = time.perf_counter()
    if store.seal_key is None:
        raise IntegrityError("the start check needs the node's seal key (unlocked org key)")
    stored_chain = store.meta("chain")
    if stored_chain is None:  # a fresh store: genesis is written at first start
        if store.height or store.count("state") or store.count("audit_local"):
            raise IntegrityError("the store has data but no genesis record")
        return StartReport(0, 0, 0, 0, 0, 0, time.perf_counter() - started)
    if chain and stored_chain.decode() != chain:
        raise IntegrityError(f"the store is for chain {stored_chain.decode()!r}, not {chain!r}")
    top = store.height
    n_txs, n_bytes, n_audit, head = _check_ledger(store, stored_chain.decode(), top, workers)
    _check_head_seal(store, top)
    n_state = _check_state(store, head, top, _workers(workers, store.count("state") // 500))
    n_local = _check_local_audit(store, top)
    store.seal_head()  # accepts blocks appended offline on top of the sealed head
    return StartReport(top, n_txs, n_bytes, n_audit, n_state, n_local,
                       time.perf_counter() - started)


# ---------------------------------------------------------------- blocks, txs, audit index

def _check_ledger(store: SqliteStore, chain: str, top: int, workers: int | None
                  ) -> tuple[int, int, int, dict[str, Any] | None]:
    if store.max_block_height() != top:
        raise IntegrityError(f"the store says its head is block {top} but its blocks end at "
                             f"{store.max_block_height()}")
    if top == 0:
        return 0, 0, 0, None
    workers = _workers(workers, store.count("txs") // 10)
    ranges = _split(top, workers)
    if workers <= 1:
        results = [check_range(store.path, chain, lo, hi, store) for lo, hi in ranges]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(check_range, [store.path] * len(ranges),
                                    [chain] * len(ranges), *zip(*ranges, strict=True)))
    prev = ZERO.hex()
    n_txs = n_bytes = n_audit = 0
    for (lo, _), result in zip(ranges, results, strict=True):
        if "error" in result:
            raise IntegrityError(result["error"])
        if result["first_prev"] != prev:
            raise IntegrityError(f"block {lo}: header does not link to block {lo - 1}")
        prev = result["last_hash"]
        n_txs, n_bytes, n_audit = (n_txs + result["txs"], n_bytes + result["bytes"],
                                   n_audit + result["audit"])
    head = results[-1]["last_header"]
    if prev != store.last_header_hash.hex():
        raise IntegrityError("the stored chain head does not match the newest block")
    if head["app_hash"] != store.app_hash.hex():
        raise IntegrityError(f"the stored app hash does not match block {top}'s header")
    return n_txs, n_bytes, n_audit, head


def _workers(asked: int | None, size: int) -> int:
    """Worker processes for a job of ``size`` (txs / 10, or state entries / 500): starting
    one costs ~0.3 s, so small stores are checked inline."""
    if asked is not None:
        return asked
    return 0 if size < POOL_FROM else min(4, os.cpu_count() or 1)


def _split(top: int, workers: int) -> list[tuple[int, int]]:
    size = max(1, top // max(1, workers * 8)) if workers > 1 else top
    return [(lo, min(top, lo + size - 1)) for lo in range(1, top + 1, size)]


def check_range(path: str, chain: str, lo: int, hi: int, store: SqliteStore | None = None
                ) -> dict[str, Any]:
    """Check blocks ``lo..hi`` (a worker process opens the database read-only). Returns
    the range's first ``prev`` link, last hash and header, counts; or ``{"error": ...}``."""
    own = store is None
    db = SqliteStore(path, readonly=True) if store is None else store
    try:
        return _RangeCheck(chain, lo, hi).run(db)
    except MedledgerError as err:
        return {"error": str(err)}
    finally:
        if own:
            db.close()


class _RangeCheck:
    def __init__(self, chain: str, lo: int, hi: int) -> None:
        self.chain, self.lo, self.hi = chain, lo, hi
        self.first_prev: str | None = None
        self.prev: str | None = None
        self.last_header: dict[str, Any] = {}
        self.txs = self.bytes = self.audit = 0

    def run(self, db: SqliteStore) -> dict[str, Any]:
        expected = self.lo
        block: tuple[int, bytes, bytes] | None = None
        txs: list[tuple[Any, ...]] = []
        audit: list[tuple[Any, ...]] = []
        for kind, row in db.ledger_rows(self.lo, self.hi):
            if kind == "block":
                if block is not None:
                    self._block(block, txs, audit)
                if row[0] != expected:
                    raise IntegrityError(f"block {expected} is missing (next stored is "
                                         f"{row[0]})")
                block, txs, audit = (row[0], bytes(row[1]), bytes(row[2])), [], []
                expected += 1
            elif block is None or row[0] != block[0]:
                what = "a tx" if kind == "tx" else "an anchored audit event"
                raise IntegrityError(f"{what} is stored at height {row[0]}, which has no block")
            else:
                (txs if kind == "tx" else audit).append(row)
        if block is not None:
            self._block(block, txs, audit)
        if expected != self.hi + 1:
            raise IntegrityError(f"block {expected} is missing")
        return {"first_prev": self.first_prev, "last_hash": self.prev,
                "last_header": self.last_header, "txs": self.txs, "bytes": self.bytes,
                "audit": self.audit}

    def _block(self, block: tuple[int, bytes, bytes], txs: list[tuple[Any, ...]],
               audit: list[tuple[Any, ...]]) -> None:
        height, header_bytes, stored_hash = block
        where = f"block {height}"
        if sha256(header_bytes) != stored_hash:
            raise IntegrityError(f"{where}: header bytes do not match the stored block hash")
        header = loads(header_bytes)
        if header.get("height") != height or header.get("chain") != self.chain:
            raise IntegrityError(f"{where}: header names another height or chain")
        if self.prev is None:
            self.first_prev = header["prev"]
        elif header["prev"] != self.prev:
            raise IntegrityError(f"{where}: header does not link to block {height - 1}")
        _check_txs(where, header, txs)
        _check_audit(where, header, audit)
        self.prev, self.last_header = stored_hash.hex(), header
        self.txs += len(txs)
        self.bytes += sum(len(t[3]) for t in txs)
        self.audit += len(audit)


def _check_txs(where: str, header: dict[str, Any], txs: list[tuple[Any, ...]]) -> None:
    raws = []
    for i, (_, idx, tx_hash, raw, _, data) in enumerate(txs):
        if idx != i:
            raise IntegrityError(f"{where}: tx {i} is missing or out of order")
        if sha256(raw) != tx_hash:
            raise IntegrityError(f"{where} tx {i}: stored bytes were altered (hash mismatch)")
        if data is None:
            raise IntegrityError(f"{where} tx {i}: its result data is not stored (the store "
                                 "predates result data; re-sync this node)")
        raws.append(bytes(raw))
    if len(raws) != header["n_txs"]:
        raise IntegrityError(f"{where}: header says {header['n_txs']} txs, store has "
                             f"{len(raws)}")
    if merkle.root(raws).hex() != header["tx_root"]:
        raise IntegrityError(f"{where}: txs do not match the header's tx root")
    results = [canonical([code, data]) for _, _, _, _, code, data in txs]
    if merkle.root(results).hex() != header["results_root"]:
        raise IntegrityError(f"{where}: stored tx result codes do not match the header's "
                             "results root (a result was changed)")


def _check_audit(where: str, header: dict[str, Any], audit: list[tuple[Any, ...]]) -> None:
    events = []
    for i, (_, leaf, event_id, patient, recorded, event) in enumerate(audit):
        if leaf != i:
            raise IntegrityError(f"{where}: anchored audit event {i} is missing")
        ev = loads(event)
        if (ev.get("id"), ev.get("patient") if isinstance(ev.get("patient"), str) else None,
                ev.get("recorded")) != (event_id, patient, recorded):
            raise IntegrityError(f"{where}: anchored audit event {i}'s index columns do not "
                                 "match the event")
        events.append(bytes(event))
    if len(events) != header.get("n_audit", 0) or \
            merkle.root(events).hex() != header["audit_root"]:
        raise IntegrityError(f"{where}: anchored audit events do not match the header's "
                             "audit root (an event was deleted, added or changed)")


# ---------------------------------------------------------------- head seal

def _check_head_seal(store: SqliteStore, top: int) -> None:
    raw = store.meta(HEAD_SEAL)
    if raw is None:
        if top:
            raise IntegrityError("the ledger head seal is missing (meta was edited)")
        return
    doc = loads(raw)
    assert store.seal_key is not None
    if not localseal.mac_ok(store.seal_key, str(doc.get("mac")), "head", doc.get("height"),
                            doc.get("hash")):
        raise IntegrityError("the ledger head seal does not verify (meta was edited)")
    sealed = int(doc["height"])
    if sealed > top:
        raise IntegrityError(f"this node committed block {sealed} but its ledger ends at "
                             f"block {top}: blocks were removed")
    stored = store.block_hash(sealed)
    if stored is None or stored.hex() != doc["hash"]:
        raise IntegrityError(f"block {sealed} is not the block this node committed")


# ---------------------------------------------------------------- state

def _check_state(store: SqliteStore, head: dict[str, Any] | None, top: int, workers: int
                 ) -> int | None:
    """The state table against what the chain commits to. Returns the entries checked,
    or None when the head header commits no state digest."""
    if top == 0:
        genesis = loads(store.meta("genesis") or b"{}")
        writes = machine.genesis_writes(genesis)
        items = list(store.state_items())
        if items != sorted((k, v) for k, v in writes.items() if v is not None):
            raise IntegrityError("the state table does not match the genesis state")
        return len(items)
    assert head is not None
    # ---- HOOK: state commitment ---------------------------------------------------------
    # Headers carry ``state_digest``: SHA-256 of an AdHash accumulator (SHAKE-256 per state
    # entry, ``crypto.multiset``, from the core change that introduced it). Headers written
    # before that change have none: the state is then left to `medledger verify`.
    expected = head.get("state_digest")
    if expected is None:
        return None
    multiset = _multiset()
    cuts = store.state_split_keys(workers) if workers > 1 else []
    ranges = list(zip(["", *cuts], [*cuts, None], strict=True))
    if len(ranges) == 1:
        parts = [state_range_acc(store.path, "", None, store)]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(state_range_acc, [store.path] * len(ranges),
                                  *zip(*ranges, strict=True)))
    n = sum(count for _, count in parts)
    actual = str(multiset.digest(multiset.combine(acc for acc, _ in parts)))
    if actual != expected:
        raise IntegrityError(f"the state table does not match the state digest committed in "
                             f"block {top}'s header (state entries were changed, added or "
                             "deleted)")
    return n


def _multiset() -> Any:
    # arrives with the state digest in the headers (crypto.multiset, the core change)
    return importlib.import_module("medledger.crypto.multiset")


def state_range_acc(path: str, lo: str, hi: str | None, store: SqliteStore | None = None
                    ) -> tuple[bytes, int]:
    """The AdHash accumulator and size of the state entries in ``[lo, hi)`` (a worker
    process opens the database read-only)."""
    db = SqliteStore(path, readonly=True) if store is None else store
    n = 0

    def counted() -> Iterator[tuple[str, bytes]]:
        nonlocal n
        for item in db.state_items_between(lo, hi):
            n += 1
            yield item

    try:
        return bytes(_multiset().of_items(counted())), n
    finally:
        if store is None:
            db.close()


# ---------------------------------------------------------------- local audit log

def _check_local_audit(store: SqliteStore, top: int) -> int:
    """The hash chain of not-yet-anchored events, from the sealed checkpoint to the sealed
    head; rows said to be anchored must be in the anchored index at that height."""
    seal = store.audit_seal()
    if seal is None:
        if store.count("audit_local"):
            raise IntegrityError("the local audit log has events but no seal (edited)")
        return 0
    assert store.seal_key is not None
    if not localseal.mac_ok(store.seal_key, str(seal.get("mac")), "audit_local",
                            seal.get("checkpoint"), seal.get("head")):
        raise IntegrityError("the local audit log seal does not verify (edited)")
    cp_seq, cp_hash = int(seal["checkpoint"][0]), str(seal["checkpoint"][1])
    head_seq = int(seal["head"][0])
    if store.unanchored_before(cp_seq):
        raise IntegrityError("local audit events already anchored were marked unanchored")
    link, expect, n = bytes.fromhex(cp_hash), cp_seq + 1, 0
    checkpoint, contiguous = [cp_seq, cp_hash], True
    for seq, event_id, patient, event, anchored, stored in store.local_audit_rows(cp_seq):
        if seq != expect:
            raise IntegrityError(f"local audit event #{expect} is missing (deleted)")
        link = localseal.chain_link(link, seq, event)
        if stored != link:
            raise IntegrityError(f"local audit event #{seq} was altered (hash chain broken)")
        ev = loads(event)
        if ev.get("id") != event_id or ev.get("patient") != patient:
            raise IntegrityError(f"local audit event #{seq}: index columns do not match it")
        if anchored is None:
            contiguous = False
        elif anchored > top or not store.anchored_event_matches(anchored, event_id, event):
            raise IntegrityError(f"local audit event #{seq} is marked anchored in block "
                                 f"{anchored}, which does not hold it")
        elif contiguous:
            checkpoint = [seq, link.hex()]
        expect, n = expect + 1, n + 1
    if expect - 1 != head_seq or link.hex() != seal["head"][1]:
        raise IntegrityError(f"the local audit log ends at event #{expect - 1} but event "
                             f"#{head_seq} was recorded: the newest events were deleted")
    store.advance_audit_checkpoint(checkpoint, seal["head"])
    return n
