"""SQLite storage: one file per node, WAL mode, one SQLite transaction per block.

Consensus data (blocks, txs, state, anchored audit events) is written only by
``commit_block``. The node-local audit log (``audit_local``) is written before a
read's response leaves the node and later anchored on the ledger; each of its rows
chains the previous row's hash. With the node's seal key set (``set_seal_key``), the
chain's head and the newest committed block are sealed in ``meta`` with an HMAC the
start check verifies (``node/startcheck.py``).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from medledger.core.machine import AuditRow, BlockApplied
from medledger.crypto import localseal
from medledger.crypto.canonical import canonical, loads
from medledger.errors import StorageError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY, header BLOB NOT NULL, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS txs (
    height INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL, raw BLOB NOT NULL,
    code INTEGER NOT NULL, log TEXT NOT NULL, data TEXT, PRIMARY KEY (height, idx))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS txs_hash ON txs (hash);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    height INTEGER NOT NULL, leaf INTEGER NOT NULL, event_id TEXT NOT NULL, patient TEXT,
    recorded TEXT NOT NULL, event BLOB NOT NULL, PRIMARY KEY (height, leaf));
CREATE INDEX IF NOT EXISTS audit_patient ON audit (patient, recorded);
CREATE INDEX IF NOT EXISTS audit_event ON audit (event_id);
CREATE TABLE IF NOT EXISTS audit_local (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE NOT NULL, event BLOB NOT NULL,
    anchored_height INTEGER, patient TEXT, hash BLOB);
CREATE INDEX IF NOT EXISTS audit_local_pending ON audit_local (anchored_height, patient);
CREATE TABLE IF NOT EXISTS used_assertions (jti TEXT PRIMARY KEY, exp REAL NOT NULL);
"""


class Store(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def scan(self, prefix: str) -> Iterator[tuple[str, bytes]]: ...
    def meta(self, key: str) -> bytes | None: ...
    def commit_block(self, applied: BlockApplied, txs: tuple[bytes, ...]) -> None: ...


def _upper(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"


# columns added after the first release (stores made before get them, empty)
_ADDED_COLUMNS = (("txs", "data", "TEXT"), ("audit_local", "hash", "BLOB"))
HEAD_SEAL = "head_seal"  # meta: {"height", "hash", "mac"} of the newest committed block
AUDIT_SEAL = "audit_local_seal"  # meta: {"checkpoint": [seq, hash], "head": [seq, hash], "mac"}


class SqliteStore:
    def __init__(self, path: Path | str, *, synchronous: str = "NORMAL",
                 readonly: bool = False) -> None:
        self.path = str(path)
        try:
            if readonly:  # the start check's worker processes
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                          check_same_thread=False, isolation_level=None)
            else:
                self.db = sqlite3.connect(self.path, check_same_thread=False,
                                          isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute(f"PRAGMA synchronous={synchronous}")
                self.db.executescript(SCHEMA)
                self._add_columns()
            self.db.execute("PRAGMA cache_size=-65536")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open ledger database {self.path}: {exc}") from exc
        self.lock = threading.RLock()
        self.seal_key: bytes | None = None
        self._checkpointer: _Checkpointer | None = None

    def _add_columns(self) -> None:
        for table, column, kind in _ADDED_COLUMNS:
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def set_seal_key(self, key: bytes) -> None:
        """The key (derived from the org key) that seals the chain head and the local audit
        log from now on; without it those seals are not updated."""
        self.seal_key = key

    def checkpoint_in_background(self, interval_s: float = 1.0) -> None:
        """Move the WAL's checkpoints (the only writes SQLite syncs to disk in WAL mode
        with ``synchronous=NORMAL``) off the connection that serves requests: every commit
        past 1,000 WAL pages used to run one, with its fsyncs, while holding this store's
        lock. A thread with its own connection checkpoints passively instead (it never
        waits for or blocks a reader or the writer)."""
        if self._checkpointer is None:
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = _Checkpointer(self.path, interval_s)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        with self.lock:
            self.db.close()

    # ------------------------------------------------------------ state reader
    def get(self, key: str) -> bytes | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    _MANY_CHUNK = 500  # host parameters per query (SQLite allows 32,766 since 3.32)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """``{key: get(key)}`` in one query per ``_MANY_CHUNK`` keys."""
        wanted = list(dict.fromkeys(keys))
        out: dict[str, bytes | None] = dict.fromkeys(wanted)
        with self.lock:
            for i in range(0, len(wanted), self._MANY_CHUNK):
                chunk = wanted[i:i + self._MANY_CHUNK]
                marks = ",".join("?" * len(chunk))
                for k, v in self.db.execute(
                        f"SELECT key, value FROM state WHERE key IN ({marks})", chunk):
                    out[k] = bytes(v)
        return out

    def scan(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        with self.lock:
            rows = self.db.execute(
                "SELECT key, value FROM state WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, _upper(prefix))).fetchall()
        for k, v in rows:
            yield k, bytes(v)

    def scan_paged(self, prefix: str, page: int = 4096) -> Iterator[tuple[str, bytes]]:
        """Like ``scan``, fetched in pages (bounded memory for whole-ledger walks)."""
        last, upper = prefix, _upper(prefix)
        first = True
        while True:
            with self.lock:
                rows = self.db.execute(
                    f"SELECT key, value FROM state WHERE key {'>=' if first else '>'} ? AND "
                    "key < ? ORDER BY key LIMIT ?", (last, upper, page)).fetchall()
            if not rows:
                return
            for k, v in rows:
                yield k, bytes(v)
            last, first = rows[-1][0], False

    def state_items(self) -> Iterator[tuple[str, bytes]]:
        """Every state entry in key order, fetched in pages (bounded memory)."""
        last = ""
        while True:
            with self.lock:
                rows = self.db.execute("SELECT key, value FROM state WHERE key > ? ORDER BY key "
                                       "LIMIT 4096", (last,)).fetchall()
            if not rows:
                return
            for k, v in rows:
                yield k, bytes(v)
            last = rows[-1][0]

    def state_items_between(self, lo: str, hi: str | None) -> Iterator[tuple[str, bytes]]:
        """State entries with ``lo <= key < hi`` (``hi`` None: to the end), in key order."""
        cur = self.db.cursor()
        if hi is None:
            rows = cur.execute("SELECT key, value FROM state WHERE key >= ?", (lo,))
        else:
            rows = cur.execute("SELECT key, value FROM state WHERE key >= ? AND key < ?",
                               (lo, hi))
        for k, v in rows:
            yield k, bytes(v)

    def state_split_keys(self, parts: int) -> list[str]:
        """Keys cutting the state into about ``parts`` equal ranges (for parallel scans)."""
        with self.lock:
            n = int(self.db.execute("SELECT count(*) FROM state").fetchone()[0])
            step = max(1, n // max(1, parts))
            return [str(r[0]) for r in (self.db.execute(
                "SELECT key FROM state ORDER BY key LIMIT 1 OFFSET ?", (i * step,)).fetchone()
                for i in range(1, parts)) if r is not None]

    # ------------------------------------------------------------ meta
    def meta(self, key: str) -> bytes | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, items: dict[str, bytes]) -> None:
        with self.lock:
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", items.items())

    @property
    def height(self) -> int:
        raw = self.meta("height")
        return int(raw) if raw else 0

    @property
    def app_hash(self) -> bytes:
        return self.meta("app_hash") or b""

    @property
    def last_header_hash(self) -> bytes:
        return self.meta("header_hash") or b"\x00" * 32

    @property
    def state_acc(self) -> bytes:
        """The state digest accumulator after the last committed block (crypto.multiset)."""
        return self.meta("state_acc") or b""

    # ------------------------------------------------------------ writes
    def init_genesis(self, chain: str, app_state: dict[str, Any],
                     writes: dict[str, bytes | None], app_hash: bytes,
                     state_acc: bytes = b"") -> None:
        with self.lock, self._txn():
            self._apply_writes(writes)
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
                ("chain", chain.encode()), ("genesis", canonical(app_state)),
                ("height", b"0"), ("app_hash", app_hash), ("genesis_app_hash", app_hash),
                ("header_hash", b"\x00" * 32), ("state_acc", state_acc)])

    def commit_block(self, applied: BlockApplied, txs: tuple[bytes, ...]) -> None:
        h = applied.header["height"]
        with self.lock, self._txn():
            self.db.execute("INSERT INTO blocks VALUES (?, ?, ?)",
                            (h, canonical(applied.header), applied.header_hash))
            self.db.executemany("INSERT INTO txs VALUES (?, ?, ?, ?, ?, ?, ?)", [
                (h, i, applied.tx_hashes[i], raw, r.code, r.log, r.data)
                for i, (raw, r) in enumerate(zip(txs, applied.results, strict=True))])
            self._apply_writes(applied.writes)
            self._index_audit(h, applied.audit)
            meta = [("height", str(h).encode()), ("app_hash", applied.app_hash),
                    ("header_hash", applied.header_hash), ("state_acc", applied.state_acc)]
            if self.seal_key is not None:
                meta.append((HEAD_SEAL, self._head_seal(h, applied.header_hash)))
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)

    def _head_seal(self, height: int, header_hash: bytes) -> bytes:
        assert self.seal_key is not None
        return canonical({"height": height, "hash": header_hash.hex(),
                          "mac": localseal.mac(self.seal_key, "head", height,
                                               header_hash.hex())})

    def seal_head(self) -> None:
        """Seal the current head (after the start check accepted a chain extended offline)."""
        if self.seal_key is None or not self.height:
            return
        self.set_meta({HEAD_SEAL: self._head_seal(self.height, self.last_header_hash)})

    def _apply_writes(self, writes: dict[str, bytes | None]) -> None:
        # in key order: consecutive rows land on the same B-tree pages (a large import's
        # ~370,000 random-id keys: 3.0 -> 2.3 s)
        items = sorted(writes.items())
        self.db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)",
                            [(k, v) for k, v in items if v is not None])
        self.db.executemany("DELETE FROM state WHERE key = ?",
                            [(k,) for k, v in items if v is None])

    def _index_audit(self, height: int, rows: Iterable[AuditRow]) -> None:
        rows = list(rows)
        # keyed by position, not event id: a (byzantine) duplicate id must not drop a leaf
        self.db.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)", [
            (height, r.leaf_index, r.event_id, r.patient, r.recorded, r.event) for r in rows])
        self.db.executemany("UPDATE audit_local SET anchored_height = ? WHERE event_id = ? "
                            "AND event = ?", [(height, r.event_id, r.event) for r in rows])

    class _Txn:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            if exc_type is None:
                self.db.execute("COMMIT")
            else:
                self.db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"ledger database write failed: {exc}") from exc

    def _txn(self) -> SqliteStore._Txn:
        return SqliteStore._Txn(self.db)

    # ------------------------------------------------------------ blocks and txs
    def block(self, height: int) -> dict[str, Any] | None:
        with self.lock:
            row = self.db.execute("SELECT header FROM blocks WHERE height = ?",
                                  (height,)).fetchone()
        return None if row is None else loads(row[0])

    def blocks(self, start: int = 1) -> Iterator[tuple[int, bytes, bytes]]:
        """(height, header bytes, stored hash) from ``start`` up, in order."""
        cur = self.db.cursor()
        h = start
        while True:
            with self.lock:
                rows = cur.execute("SELECT height, header, hash FROM blocks WHERE height >= ? "
                                   "ORDER BY height LIMIT 512", (h,)).fetchall()
            if not rows:
                return
            for height, header, hsh in rows:
                yield height, bytes(header), bytes(hsh)
            h = rows[-1][0] + 1

    def ledger_rows(self, lo: int, hi: int) -> Iterator[tuple[str, tuple[Any, ...]]]:
        """Blocks ``lo..hi`` with their txs and anchored audit rows, as ``(kind, row)`` in
        height order (for the start check): ``("block", (height, header, hash))``, then
        that block's ``("tx", (height, idx, hash, raw, code, data))`` and ``("audit",
        (height, leaf, event_id, patient, recorded, event))`` rows; a row left over
        (no block of its height) comes last."""
        tx_cur = self.db.execute("SELECT height, idx, hash, raw, code, data FROM txs WHERE "
                                 "height BETWEEN ? AND ? ORDER BY height, idx", (lo, hi))
        au_cur = self.db.cursor().execute(
            "SELECT height, leaf, event_id, patient, recorded, event FROM audit WHERE "
            "height BETWEEN ? AND ? ORDER BY height, leaf", (lo, hi))
        blocks = self.db.cursor().execute("SELECT height, header, hash FROM blocks WHERE "
                                          "height BETWEEN ? AND ? ORDER BY height", (lo, hi))
        tx, au = tx_cur.fetchone(), au_cur.fetchone()
        for block in blocks:
            height = block[0]
            yield "block", block
            while tx is not None and tx[0] <= height:
                yield "tx", tx
                tx = tx_cur.fetchone()
            while au is not None and au[0] <= height:
                yield "audit", au
                au = au_cur.fetchone()
        if tx is not None:
            yield "tx", tx
        if au is not None:
            yield "audit", au

    def max_block_height(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT coalesce(max(height), 0) FROM blocks"
                                       ).fetchone()[0])

    def block_hash(self, height: int) -> bytes | None:
        with self.lock:
            row = self.db.execute("SELECT hash FROM blocks WHERE height = ?", (height,)
                                  ).fetchone()
        return None if row is None else bytes(row[0])

    def block_txs(self, height: int) -> list[tuple[int, bytes, bytes, int, str]]:
        """(idx, hash, raw, code, log) of a block's txs, in stored order."""
        with self.lock:
            rows = self.db.execute("SELECT idx, hash, raw, code, log FROM txs WHERE height = ? "
                                   "ORDER BY idx", (height,)).fetchall()
        return [(i, bytes(hh), bytes(r), c, lg) for i, hh, r, c, lg in rows]

    def tx(self, tx_hash: bytes) -> tuple[int, int, bytes, int, str] | None:
        """(height, idx, raw, code, log) of the first inclusion of ``tx_hash``."""
        with self.lock:
            row = self.db.execute("SELECT height, idx, raw, code, log FROM txs WHERE hash = ? "
                                  "ORDER BY height, idx LIMIT 1", (tx_hash,)).fetchone()
        return None if row is None else (row[0], row[1], bytes(row[2]), row[3], row[4])

    def count(self, table: str) -> int:
        assert table in ("blocks", "txs", "state", "audit", "audit_local")
        with self.lock:
            return int(self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    # ------------------------------------------------------------ auth
    def use_assertion(self, jti: str, exp: float, now: float) -> bool:
        """Record a client assertion's jti; False if it was used before (a replay).

        Node-local and durable, so a restart does not reopen the replay window."""
        with self.lock, self._txn():
            self.db.execute("DELETE FROM used_assertions WHERE exp < ?", (now - 60,))
            cur = self.db.execute("INSERT OR IGNORE INTO used_assertions VALUES (?, ?)",
                                  (jti, exp))
            return cur.rowcount == 1

    # ------------------------------------------------------------ audit
    def append_local_audit(self, events: list[tuple[str, str | None, bytes]]) -> None:
        """Durably record (event id, patient, event) before the response that caused them.

        Each row's hash chains the previous row's; the new head is sealed (HMAC) in the
        same transaction, so a deleted or edited row is found by the start check."""
        with self.lock, self._txn():
            ids = [e[0] for e in events]
            known = {r[0] for r in self.db.execute(
                f"SELECT event_id FROM audit_local WHERE event_id IN ({','.join('?' * len(ids))})",
                ids)} if ids else set()
            last = self.db.execute("SELECT seq, hash FROM audit_local ORDER BY seq DESC "
                                   "LIMIT 1").fetchone()
            seq, link = (0, localseal.GENESIS_LINK) if last is None else (
                int(last[0]), bytes(last[1] or localseal.GENESIS_LINK))
            rows = []
            for event_id, patient, event in events:
                if event_id in known:
                    continue
                known.add(event_id)
                seq += 1
                link = localseal.chain_link(link, seq, event)
                rows.append((seq, event_id, patient, event, link))
            self.db.executemany("INSERT INTO audit_local (seq, event_id, patient, event, hash) "
                                "VALUES (?, ?, ?, ?, ?)", rows)
            if rows and self.seal_key is not None:
                seal = self.audit_seal()
                checkpoint = seal["checkpoint"] if seal else [0, localseal.GENESIS_LINK.hex()]
                self._write_audit_seal(checkpoint, [seq, link.hex()])

    def audit_seal(self) -> dict[str, Any] | None:
        raw = self.meta(AUDIT_SEAL)
        return None if raw is None else dict(loads(raw))

    def _write_audit_seal(self, checkpoint: list[Any], head: list[Any]) -> None:
        assert self.seal_key is not None
        tag = localseal.mac(self.seal_key, "audit_local", checkpoint, head)
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        (AUDIT_SEAL, canonical({"checkpoint": checkpoint, "head": head,
                                                "mac": tag})))

    def advance_audit_checkpoint(self, checkpoint: list[Any], head: list[Any]) -> None:
        """Move the verified checkpoint forward (rows before it are anchored on the ledger)."""
        if self.seal_key is None:
            return
        with self.lock, self._txn():
            current = self.audit_seal()
            if current is not None and current["head"] != head:
                return  # rows were appended meanwhile: keep the seal they wrote
            self._write_audit_seal(checkpoint, head)

    def local_audit_rows(self, after_seq: int) -> Iterator[tuple[int, str, str | None, bytes,
                                                                 int | None, bytes | None]]:
        """(seq, event_id, patient, event, anchored_height, hash) after ``after_seq``."""
        cur = self.db.cursor().execute(
            "SELECT seq, event_id, patient, event, anchored_height, hash FROM audit_local "
            "WHERE seq > ? ORDER BY seq", (after_seq,))
        for seq, eid, patient, event, height, link in cur:
            yield seq, eid, patient, bytes(event), height, None if link is None else bytes(link)

    def unanchored_before(self, seq: int) -> int:
        with self.lock:
            return int(self.db.execute("SELECT count(*) FROM audit_local WHERE seq <= ? AND "
                                       "anchored_height IS NULL", (seq,)).fetchone()[0])

    def anchored_event_matches(self, height: int, event_id: str, event: bytes) -> bool:
        with self.lock:
            return self.db.execute("SELECT 1 FROM audit WHERE event_id = ? AND height = ? AND "
                                   "event = ? LIMIT 1", (event_id, height, event)
                                   ).fetchone() is not None

    def pending_local_audit(self, limit: int = 1000) -> list[bytes]:
        with self.lock:
            rows = self.db.execute("SELECT event FROM audit_local WHERE anchored_height IS NULL "
                                   "ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [bytes(r[0]) for r in rows]

    def audit_for_patient(self, patient: str, since: str = "", limit: int = 100
                          ) -> list[tuple[bytes, int | None]]:
        """Newest first: anchored events plus this node's not-yet-anchored ones.

        Returns (event bytes, anchored height or None).
        """
        with self.lock:
            anchored = self.db.execute(
                "SELECT event, height, recorded, event_id FROM audit WHERE patient = ? AND "
                "recorded >= ? ORDER BY recorded DESC LIMIT ?",
                (patient, since, limit)).fetchall()  # walks the (patient, recorded) index
            pending = self.db.execute(
                "SELECT event FROM audit_local WHERE anchored_height IS NULL AND patient = ?",
                (patient,)).fetchall()
        seen: set[str] = set()  # an event anchored twice (a retried anchor) shows once
        out: list[tuple[bytes, int | None, str]] = []
        for e, h, r, eid in reversed(anchored):  # oldest first: keep the first anchoring
            if eid not in seen:
                seen.add(eid)
                out.append((bytes(e), h, r))
        for (e,) in pending:
            ev = loads(e)
            if ev["recorded"] >= since:
                out.append((bytes(e), None, ev["recorded"]))
        out.sort(key=lambda t: t[2], reverse=True)
        return [(e, h) for e, h, _ in out[:limit]]

    def audit_event(self, event_id: str) -> tuple[int, int, bytes] | None:
        with self.lock:
            row = self.db.execute("SELECT height, leaf, event FROM audit WHERE event_id = ? "
                                  "ORDER BY height, leaf LIMIT 1", (event_id,)).fetchone()
        return None if row is None else (row[0], row[1], bytes(row[2]))

    def audit_leaves(self, height: int) -> list[bytes]:
        with self.lock:
            rows = self.db.execute("SELECT event FROM audit WHERE height = ? ORDER BY leaf",
                                   (height,)).fetchall()
        return [bytes(r[0]) for r in rows]


class _Checkpointer:
    """``PRAGMA wal_checkpoint(PASSIVE)`` every ``interval_s`` on a connection of its own."""

    def __init__(self, path: str, interval_s: float) -> None:
        self.path = path
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # busy or locked: the next round retries
                    log.debug("WAL checkpoint skipped: %s", exc)
        finally:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
