"""The node-local sealed-blob store (ADR 4): what the ledger commits to but never holds.

``<home>/blobs.db`` keeps, by SHA-256:

- record version blobs — ``canonical({"ct", "iv", "keys"})``: AES-256-GCM ciphertext and
  the data key wrapped to each reader — and re-wrapped keys (``record.rewrap``);
- ``missing`` — hashes the ledger references that this node has not received yet
  (the replication fetcher works through them);
- ``pending`` — blobs this node sealed for its own writes that no committed tx
  references yet; a write the ledger never committed (refused, a crash) leaves one
  behind, which ``stale_pending`` finds for deletion;
- ``shares`` — payloads of the share links *this* node issued: the JWE, the passcode
  verifier (an HMAC under a node key, never a guessable hash) and sealed free text.

Nothing readable is stored here. ``secure_delete`` overwrites deleted content in the
file, and ``delete`` checkpoints the WAL, so erased ciphertext leaves the disk too.
``BlobStore(":memory:")`` is the in-memory twin used by tests.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medledger.errors import IntegrityError, StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (hash BLOB PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS missing (
    hash BLOB PRIMARY KEY, ref TEXT NOT NULL, source TEXT NOT NULL, height INTEGER NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS missing_next ON missing (next_try);
CREATE TABLE IF NOT EXISTS pending (hash BLOB PRIMARY KEY, ref TEXT NOT NULL,
                                    added REAL NOT NULL);
CREATE INDEX IF NOT EXISTS pending_added ON pending (added);
CREATE TABLE IF NOT EXISTS shares (
    id TEXT PRIMARY KEY, jwe BLOB NOT NULL, verifier BLOB, sealed_meta BLOB NOT NULL,
    created REAL NOT NULL);
"""


_CHUNK = 500  # host parameters per query (SQLite allows 32,766 since 3.32)


def blob_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA secure_delete=ON")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open blob store {self.path}: {exc}") from exc
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _write(self, *statements: tuple[str, Iterable[tuple[Any, ...]]]) -> None:
        """Run ``(sql, rows)`` statements in one transaction."""
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                for sql, rows in statements:
                    self.db.executemany(sql, rows)
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                self.db.execute("ROLLBACK")
                raise StorageError(f"blob store write failed: {exc}") from exc

    # ------------------------------------------------------------ blobs
    def put(self, items: Iterable[tuple[str, bytes]],
            pending: str | Mapping[str, str] | None = None) -> None:
        """Store blobs under their hex SHA-256, checking each (a wrong hash is refused).
        ``pending`` (a ref such as "Observation/o1/2", or one per hash) marks blobs sealed
        here for writes not yet committed."""
        rows = []
        for h, data in items:
            if blob_hash(data) != h:
                raise IntegrityError(f"blob {h[:16]} does not hash to its name")
            rows.append((bytes.fromhex(h), data))
        statements: list[tuple[str, Iterable[tuple[Any, ...]]]] = [
            ("INSERT OR IGNORE INTO blobs VALUES (?, ?)", rows),
            ("DELETE FROM missing WHERE hash = ?", [(r[0],) for r in rows])]
        if pending is not None:
            now = time.time()
            statements.append(("INSERT OR REPLACE INTO pending VALUES (?, ?, ?)",
                               [(r[0], pending if isinstance(pending, str)
                                 else pending[bytes(r[0]).hex()], now) for r in rows]))
        self._write(*statements)  # one transaction: a write's blob is one commit

    def settle(self, hashes: Iterable[str]) -> None:
        """These blobs are referenced by committed txs now."""
        keys = [bytes.fromhex(h) for h in hashes]
        chunks = [keys[i:i + _CHUNK] for i in range(0, len(keys), _CHUNK)]
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                for chunk in chunks:  # a query per chunk, not per blob (an import has 35,000)
                    self.db.execute("DELETE FROM pending WHERE hash IN "
                                    f"({','.join('?' * len(chunk))})", chunk)
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                self.db.execute("ROLLBACK")
                raise StorageError(f"blob store write failed: {exc}") from exc

    def stale_pending(self, before: float) -> list[tuple[str, str]]:
        """(hash, ref) of blobs sealed here before ``before`` that no commit referenced."""
        with self.lock:
            rows = self.db.execute("SELECT hash, ref FROM pending WHERE added < ?",
                                   (before,)).fetchall()
        return [(bytes(h).hex(), ref) for h, ref in rows]

    def get(self, h: str) -> bytes | None:
        with self.lock:
            row = self.db.execute("SELECT data FROM blobs WHERE hash = ?",
                                  (bytes.fromhex(h),)).fetchone()
        return None if row is None else bytes(row[0])

    def get_many(self, hashes: Iterable[str]) -> dict[str, bytes]:
        out = {}
        for h in hashes:
            data = self.get(h)
            if data is not None:
                out[h] = data
        return out

    def have(self, hashes: Iterable[str]) -> set[str]:
        """Which of ``hashes`` are held (a query per ``_CHUNK`` hashes)."""
        keys = list(dict.fromkeys(bytes.fromhex(h) for h in hashes))
        held: set[str] = set()
        with self.lock:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                held.update(bytes(h).hex() for (h,) in self.db.execute(
                    f"SELECT hash FROM blobs WHERE hash IN ({','.join('?' * len(chunk))})",
                    chunk))
        return held

    def delete(self, hashes: Iterable[str]) -> int:
        """Delete blobs (erasure) and push the deletion through the WAL into the file."""
        keys = [(bytes.fromhex(h),) for h in hashes]
        if not keys:
            return 0
        with self.lock:
            deleted = len(self.have(bytes(k[0]).hex() for k in keys))
            self._write(("DELETE FROM blobs WHERE hash = ?", keys),
                        ("DELETE FROM missing WHERE hash = ?", keys),
                        ("DELETE FROM pending WHERE hash = ?", keys))
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def hashes(self) -> Iterable[tuple[str, bytes]]:
        """Every (hash, data) held, in pages (verify re-hashes them)."""
        last = b""
        while True:
            with self.lock:
                rows = self.db.execute("SELECT hash, data FROM blobs WHERE hash > ? "
                                       "ORDER BY hash LIMIT 512", (last,)).fetchall()
            if not rows:
                return
            for h, data in rows:
                yield bytes(h).hex(), bytes(data)
            last = rows[-1][0]

    def count(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT count(*) FROM blobs").fetchone()[0])

    # ------------------------------------------------------------ replication queue
    def want(self, items: Iterable[tuple[str, str, str, int]]) -> None:
        """Note blobs the ledger references that this node lacks: (hash, ref, source org,
        height)."""
        rows = [(bytes.fromhex(h), ref, src, height) for h, ref, src, height in items]
        self._write(("INSERT OR IGNORE INTO missing (hash, ref, source, height) "
                     "VALUES (?, ?, ?, ?)", rows))

    def wanted(self, now: float, limit: int = 256) -> list[tuple[str, str, str]]:
        """(hash, ref, source org) due for a fetch attempt."""
        with self.lock:
            rows = self.db.execute("SELECT hash, ref, source FROM missing WHERE next_try <= ? "
                                   "ORDER BY height LIMIT ?", (now, limit)).fetchall()
        return [(bytes(h).hex(), ref, src) for h, ref, src in rows]

    def retry_later(self, hashes: Iterable[str], now: float) -> None:
        self._write(("UPDATE missing SET tries = tries + 1, next_try = ? + min(60, 0.5 * "
                     "(1 << min(tries, 7))) WHERE hash = ?",
                     [(now, bytes.fromhex(h)) for h in hashes]))

    def forget_wanted(self, hashes: Iterable[str]) -> None:
        self._write(("DELETE FROM missing WHERE hash = ?",
                     [(bytes.fromhex(h),) for h in hashes]))

    def missing(self, limit: int = 1000) -> list[tuple[str, str, str, int]]:
        """(hash, ref, source, tries) of what this node still lacks."""
        with self.lock:
            rows = self.db.execute("SELECT hash, ref, source, tries FROM missing ORDER BY height "
                                   "LIMIT ?", (limit,)).fetchall()
        return [(bytes(h).hex(), ref, src, tries) for h, ref, src, tries in rows]

    def missing_count(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT count(*) FROM missing").fetchone()[0])

    # ------------------------------------------------------------ share payloads
    def put_share(self, share_id: str, jwe: bytes, verifier: bytes | None,
                  sealed_meta: bytes, created: float) -> None:
        self._write(("INSERT INTO shares VALUES (?, ?, ?, ?, ?)",
                     [(share_id, jwe, verifier, sealed_meta, created)]))

    def share(self, share_id: str) -> tuple[bytes, bytes | None, bytes] | None:
        """(JWE, passcode verifier, sealed label/recipient) of a link this node issued."""
        with self.lock:
            row = self.db.execute("SELECT jwe, verifier, sealed_meta FROM shares WHERE id = ?",
                                  (share_id,)).fetchone()
        return None if row is None else (bytes(row[0]), None if row[1] is None
                                         else bytes(row[1]), bytes(row[2]))

    def share_meta(self, share_ids: Iterable[str]) -> dict[str, bytes]:
        out = {}
        with self.lock:
            for sid in share_ids:
                row = self.db.execute("SELECT sealed_meta FROM shares WHERE id = ?",
                                      (sid,)).fetchone()
                if row is not None:
                    out[sid] = bytes(row[0])
        return out

    def share_ids(self) -> list[tuple[str, float]]:
        """(id, kept at) of the links whose payload this node still holds."""
        with self.lock:
            rows = self.db.execute("SELECT id, created FROM shares WHERE length(jwe) > 0"
                                   ).fetchall()
        return [(r[0], float(r[1])) for r in rows]

    def forget_share(self, share_id: str) -> None:
        """A share whose tx the ledger refused: nothing of it stays."""
        self._write(("DELETE FROM shares WHERE id = ?", [(share_id,)]))

    def drop_shares(self, share_ids: Iterable[str]) -> None:
        """Delete the payloads (JWE, passcode verifier) of revoked or expired links; the
        sealed label stays so the patient still recognises the link in their list."""
        with self.lock:
            self._write(("UPDATE shares SET jwe = x'', verifier = NULL WHERE id = ?",
                         [(s,) for s in share_ids]))
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
