"""The node-local search index: ``<home>/index.db``, encrypted at rest (SQLCipher).

One row per record head in ``res`` (type, id, version, patient, category, labels,
last update), and one table per parameter type holding that record's extracted
values, in the HAPI FHIR style: ``s`` strings, ``t`` tokens, ``tt`` token text,
``d`` dates, ``n`` numbers, ``q`` quantities, ``r`` references, ``u`` uris, ``c``
composites, and ``blk`` patient-matching blocking keys. Every value table is keyed
``(pid, value…, rid)`` — ``pid`` names (resource type, parameter) — so a condition
reads only the rows that match it, and has a ``(rid, pid)`` index for deletion and
correlated checks.

The file and its WAL are SQLCipher 4 pages (AES-256, HMAC-SHA512 per page); the
raw key is derived from the organisation's X25519 private key with HKDF-SHA256
(info ``medledger search index v1``): no passphrase, no key on disk. See ADR 6.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import sqlcipher3

from medledger.crypto.kdf import derive_key
from medledger.errors import StorageError
from medledger.search.extract import Extracted, extract

KEY_INFO = "medledger search index v1"
SCHEMA_VERSION = "2"  # 2: the Patient family + birth date rows (``COMBO``)
# A registration desk's first query, ``Patient?family=&birthdate=``, read as one range
# of one index: an ``s`` row per (family name, birth day) of each Patient, keyed
# ``<day start in ms>|<normalised family>``. Each condition alone matches ever more
# patients as the index grows (a birth day holds ~30 of a million); together, a few.
# It only drives a query; the family and birth date conditions are still checked.
COMBO = "family+birthdate"
DAY_MS = 86_400_000


def combo_key(day_ms: int | str, family_norm: str) -> str:
    return f"{int(day_ms)}|{family_norm}"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS types (tid INTEGER PRIMARY KEY, type TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS params (pid INTEGER PRIMARY KEY, type TEXT NOT NULL,
    code TEXT NOT NULL, UNIQUE (type, code));
CREATE TABLE IF NOT EXISTS res (rid INTEGER PRIMARY KEY, tid INTEGER NOT NULL,
    id TEXT NOT NULL, v INTEGER NOT NULL, patient TEXT, category TEXT NOT NULL,
    labels TEXT NOT NULL, updated INTEGER NOT NULL, UNIQUE (tid, id));
CREATE INDEX IF NOT EXISTS res_type ON res (tid);
CREATE INDEX IF NOT EXISTS res_patient ON res (patient, tid, rid);
CREATE INDEX IF NOT EXISTS res_updated ON res (tid, updated, rid);
CREATE TABLE IF NOT EXISTS s (pid INTEGER, norm TEXT, rid INTEGER, exact TEXT,
    PRIMARY KEY (pid, norm, rid, exact)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS s_rid ON s (rid, pid);
CREATE TABLE IF NOT EXISTS t (pid INTEGER, code TEXT, rid INTEGER, sys TEXT,
    PRIMARY KEY (pid, code, rid, sys)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS t_sys ON t (pid, sys, rid);
CREATE INDEX IF NOT EXISTS t_rid ON t (rid, pid);
CREATE TABLE IF NOT EXISTS tt (pid INTEGER, norm TEXT, rid INTEGER,
    PRIMARY KEY (pid, norm, rid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tt_rid ON tt (rid, pid);
CREATE TABLE IF NOT EXISTS d (pid INTEGER, lo INTEGER, hi INTEGER, rid INTEGER,
    PRIMARY KEY (pid, lo, hi, rid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS d_hi ON d (pid, hi, lo);
CREATE INDEX IF NOT EXISTS d_rid ON d (rid, pid);
CREATE TABLE IF NOT EXISTS n (pid INTEGER, val REAL, rid INTEGER,
    PRIMARY KEY (pid, val, rid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS n_rid ON n (rid, pid);
CREATE TABLE IF NOT EXISTS q (pid INTEGER, val REAL, rid INTEGER, sys TEXT, code TEXT,
    PRIMARY KEY (pid, val, rid, sys, code)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS q_rid ON q (rid, pid);
CREATE TABLE IF NOT EXISTS r (pid INTEGER, id TEXT, rid INTEGER, type TEXT,
    PRIMARY KEY (pid, id, rid, type)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS r_rid ON r (rid, pid);
CREATE TABLE IF NOT EXISTS u (pid INTEGER, val TEXT, rid INTEGER,
    PRIMARY KEY (pid, val, rid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS u_rid ON u (rid, pid);
CREATE TABLE IF NOT EXISTS c (pid INTEGER, code1 TEXT, b TEXT, rid INTEGER, sys1 TEXT,
    kind TEXT, a TEXT, lo REAL, hi REAL,
    PRIMARY KEY (pid, code1, b, rid, sys1, kind, a, lo, hi)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS c_rid ON c (rid, pid);
CREATE TABLE IF NOT EXISTS blk (key TEXT, rid INTEGER, PRIMARY KEY (key, rid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blk_rid ON blk (rid);
"""

VALUE_TABLES = ("s", "t", "tt", "d", "n", "q", "r", "u", "c")
Progress = Callable[[int, int], None]
KeyFn = Callable[[dict[str, Any]], Iterable[str]]


def index_key(org_private_key: bytes) -> bytes:
    """The SQLCipher raw key of this organisation's index."""
    return derive_key(org_private_key, KEY_INFO)


def connect(path: Path | str, key: bytes) -> Any:
    """A SQLCipher connection keyed with ``key`` (raw, 32 bytes)."""
    try:
        db = sqlcipher3.connect(str(path), check_same_thread=False, isolation_level=None)
        db.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        db.execute("PRAGMA cipher_memory_security = OFF")
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # fails on a wrong key
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA secure_delete=ON")
        db.execute("PRAGMA cache_size=-65536")
        db.execute("PRAGMA temp_store=MEMORY")
    except sqlcipher3.DatabaseError as exc:
        raise StorageError(f"cannot open the search index {path}: {exc} (wrong key, or not "
                           "an index: `medledger index rebuild` recreates it)") from exc
    return db


class SearchIndex:
    """Index rows for record heads. Writes come from one thread (the indexer); reads may
    come from any thread (each call holds the connection's lock)."""

    def __init__(self, path: Path | str, key: bytes, blocking_keys: KeyFn | None = None
                 ) -> None:
        self.path = Path(path)
        self.db = connect(self.path, key)  # the indexer's (writes)
        self.lock = threading.RLock()
        self.blocking_keys = blocking_keys
        with self.lock:
            self.db.executescript(SCHEMA)
            schema = self._meta("schema")
            if schema is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        self._pids: dict[tuple[str, str], int] = {
            (t, c): p for p, t, c in self.db.execute("SELECT pid, type, code FROM params")}
        if schema == "1":
            self._add_combo_rows()
        elif schema not in (None, SCHEMA_VERSION):
            self.db.close()
            raise StorageError(f"the search index {path} has schema {schema}, this node "
                               f"knows {SCHEMA_VERSION}: `medledger index rebuild` recreates it")
        self._tids: dict[str, int] = {
            t: i for i, t in self.db.execute("SELECT tid, type FROM types")}
        self.changed = threading.Condition()
        # searches read through their own connection: WAL readers never wait for the
        # indexer's write transaction
        self.rdb = connect(self.path, key)
        self.rlock = threading.RLock()
        # the height as of this process's last commit: read by status pages without a
        # lock (``height`` waits for a search holding the readers' connection)
        self.last_height = self.height

    def close(self) -> None:
        with self.rlock:
            self.rdb.close()
        with self.lock:
            self.db.close()

    def _add_combo_rows(self) -> None:
        """Schema 1 -> 2: the ``COMBO`` rows, from the family and birth date rows already
        indexed (no record is decrypted again)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                family, birth = self.pid("Patient", "family"), self.pid("Patient", "birthdate")
                if family is not None and birth is not None:
                    self.db.execute(
                        "INSERT OR IGNORE INTO s SELECT ?, CAST(d.lo AS INTEGER) || '|' || "
                        "s.norm, s.rid, '' FROM s JOIN d ON d.rid = s.rid WHERE s.pid = ? "
                        "AND d.pid = ? AND d.hi - d.lo = ?",
                        (self.pid("Patient", COMBO, create=True), family, birth, DAY_MS))
                self.db.execute("UPDATE meta SET v = ? WHERE k = 'schema'", (SCHEMA_VERSION,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def meta_value(self, key: str) -> str | None:
        with self.lock:
            return self._meta(key)

    def set_meta_value(self, key: str, value: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def replace_blocking_keys(self, items: Iterable[tuple[str, Iterable[str]]]) -> int:
        """Set the blocking keys of indexed Patients, given as (id, keys), in one
        transaction; ids not in the index are skipped. Returns how many were set."""
        n = 0
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for pid, keys in items:
                    row = self._rid_of("Patient", pid)
                    if row is None:
                        continue
                    self.db.execute("DELETE FROM blk WHERE rid = ?", (row,))
                    self.db.executemany("INSERT OR IGNORE INTO blk VALUES (?, ?)",
                                        [(k, row) for k in keys])
                    n += 1
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return n

    # ------------------------------------------------------------ ids
    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def height(self) -> int:
        """The ledger height this index reflects (as committed: read by the searchers'
        connection, never waiting for a write in progress)."""
        with self.rlock:
            row = self.rdb.execute("SELECT v FROM meta WHERE k = 'height'").fetchone()
        return int(row[0]) if row else 0

    def pid(self, rtype: str, code: str, create: bool = False) -> int | None:
        key = (rtype, code)
        found = self._pids.get(key)
        if found is None and create:
            with self.lock:
                cur = self.db.execute("INSERT OR IGNORE INTO params (type, code) VALUES (?, ?)",
                                      key)
                found = cur.lastrowid if cur.rowcount else self.db.execute(
                    "SELECT pid FROM params WHERE type = ? AND code = ?", key).fetchone()[0]
            self._pids[key] = int(found)
        return found

    def tid(self, rtype: str, create: bool = False) -> int | None:
        found = self._tids.get(rtype)
        if found is None and create:
            with self.lock:
                self.db.execute("INSERT OR IGNORE INTO types (type) VALUES (?)", (rtype,))
                found = int(self.db.execute("SELECT tid FROM types WHERE type = ?",
                                            (rtype,)).fetchone()[0])
            self._tids[rtype] = found
        return found

    def type_name(self, tid: int) -> str:
        for name, t in self._tids.items():
            if t == tid:
                return name
        raise StorageError(f"search index: unknown type id {tid}")

    # ------------------------------------------------------------ writes
    def apply(self, entries: Iterable[tuple[dict[str, Any], dict[str, Any] | None]],
              height: int | None = None) -> int:
        """Index each (record head meta, decrypted resource) in one transaction; a
        ``None`` resource removes the record (erased). Then record ``height``. Values are
        extracted before the write lock is taken (searches go on meanwhile)."""
        return self.apply_extracted([(m, None if r is None else extract(r), r)
                                     for m, r in entries], height)

    def apply_extracted(self, entries: Iterable[tuple[dict[str, Any], Extracted | None,
                                                      dict[str, Any] | None]],
                        height: int | None = None) -> int:
        """``apply`` with the values already extracted: (meta, values, resource) each,
        values None to remove the record; the resource is read only for a Patient (its
        blocking keys)."""
        n = 0
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                rows: dict[str, list[tuple[Any, ...]]] = {}
                for meta, values, resource in entries:
                    if values is None:
                        self._flush(rows)  # a later version may follow: keep the order
                        self._remove(meta["type"], meta["id"])
                    else:
                        self._index(meta, resource, values, rows)
                    n += 1
                self._flush(rows)
                if height is not None:
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES ('height', ?)",
                                    (str(height),))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            if height is not None:
                self.last_height = height
        with self.changed:
            self.changed.notify_all()
        return n

    def index(self, meta: dict[str, Any], resource: dict[str, Any]) -> None:
        """Index one record version that became its record's head (replaces the old rows)."""
        self.apply([(meta, resource)])

    def remove(self, rtype: str, rid: str) -> None:
        """Drop every row of a record (erasure)."""
        self.apply([({"type": rtype, "id": rid}, None)])

    def set_height(self, height: int) -> None:
        self.apply([], height)

    def _rid_of(self, rtype: str, rid: str) -> int | None:
        tid = self.tid(rtype)
        if tid is None:
            return None
        row = self.db.execute("SELECT rid FROM res WHERE tid = ? AND id = ?",
                              (tid, rid)).fetchone()
        return None if row is None else int(row[0])

    def _clear_values(self, row: int) -> None:
        for table in VALUE_TABLES:
            self.db.execute(f"DELETE FROM {table} WHERE rid = ?", (row,))
        self.db.execute("DELETE FROM blk WHERE rid = ?", (row,))

    def _remove(self, rtype: str, rid: str) -> None:
        row = self._rid_of(rtype, rid)
        if row is not None:
            self._clear_values(row)
            self.db.execute("DELETE FROM res WHERE rid = ?", (row,))

    def _flush(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """Write the value rows gathered so far: one statement per table per batch."""
        for table, items in rows.items():
            if items:
                marks = ", ".join("?" * len(items[0]))
                self.db.executemany(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", items)
        rows.clear()

    def _index(self, meta: dict[str, Any], resource: dict[str, Any] | None, values: Extracted,
               rows: dict[str, list[tuple[Any, ...]]]) -> None:
        rtype = str(meta["type"])
        tid = self.tid(rtype, create=True)
        row = self._rid_of(rtype, str(meta["id"]))
        fields = (int(meta["v"]), meta.get("patient"), str(meta.get("category", "")),
                  ",".join(meta.get("labels") or ()), int(meta["time_ns"]) // 1_000_000)
        if row is None:  # a record keeps its row id across versions: stable paging
            row = int(self.db.execute(
                "INSERT INTO res (tid, id, v, patient, category, labels, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (tid, str(meta["id"]), *fields)).lastrowid)
        else:
            self._flush(rows)  # rows of the old version first, then clear them
            self._clear_values(row)
            self.db.execute("UPDATE res SET v = ?, patient = ?, category = ?, labels = ?, "
                            "updated = ? WHERE rid = ?", (*fields, row))
        self._gather(rtype, row, values, rows)
        if self.blocking_keys is not None and rtype == "Patient":
            if resource is None:
                raise ValueError(f"Patient/{meta['id']}: indexed without its resource")
            rows.setdefault("blk", []).extend((k, row) for k in self.blocking_keys(resource))

    def _gather(self, rtype: str, row: int, v: Extracted,
                rows: dict[str, list[tuple[Any, ...]]]) -> None:
        def p(code: str) -> int:
            found = self.pid(rtype, code, create=True)
            assert found is not None
            return found

        def add(table: str, items: list[tuple[Any, ...]]) -> None:
            if items:
                rows.setdefault(table, []).extend(items)

        add("s", [(p(c), norm, row, exact) for c, norm, exact in v.strings])
        add("t", [(p(c), code, row, system) for c, system, code in v.tokens])
        add("tt", [(p(c), text, row) for c, text in v.texts])
        add("d", [(p(c), lo, hi, row) for c, lo, hi in v.dates])
        add("n", [(p(c), val, row) for c, val in v.numbers])
        add("q", [(p(c), val, row, system, code) for c, val, system, code in v.quantities])
        add("r", [(p(c), i, row, t) for c, t, i in v.refs])
        add("u", [(p(c), val, row) for c, val in v.uris])
        add("c", [(p(c), c1, b, row, s1, kind, a, lo, hi)
                  for c, s1, c1, kind, a, b, lo, hi in v.composites])
        if rtype == "Patient":
            days = [lo for c, lo, hi in v.dates if c == "birthdate" and hi - lo == DAY_MS]
            families = [norm for c, norm, _ in v.strings if c == "family"] if days else []
            add("s", [(p(COMBO), combo_key(day, norm), row, "")
                      for day in days for norm in families])

    def reset(self) -> None:
        """Forget everything (before a rebuild)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            for table in (*VALUE_TABLES, "blk", "res"):
                self.db.execute(f"DELETE FROM {table}")
            self.db.execute("DELETE FROM meta WHERE k = 'height'")
            self.db.execute("COMMIT")
            self.last_height = 0

    def checkpoint(self) -> None:
        """Move the WAL into the main file and truncate it (after erasures, rebuilds)."""
        with self.lock:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ------------------------------------------------------------ reads
    def query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self.rlock:
            return list(self.rdb.execute(sql, tuple(args)).fetchall())

    def scan(self, sql: str, args: Iterable[Any], stop: Callable[[tuple[Any, ...]], bool],
             batch: int = 16) -> bool:
        """Feed the rows of ``sql`` to ``stop`` until it returns True (then True: the
        rest is never read) or the rows run out (False)."""
        with self.rlock:
            cur = self.rdb.execute(sql, tuple(args))
            try:
                while rows := cur.fetchmany(batch):
                    if any(stop(tuple(row)) for row in rows):
                        return True
                return False
            finally:
                cur.close()

    def heads(self) -> Iterator[tuple[str, str, int]]:
        """(type, id, version) of every indexed record."""
        names = {t: n for n, t in self._tids.items()}
        for tid, rid, v in self.query("SELECT tid, id, v FROM res"):
            yield names[tid], rid, v

    def wait_for(self, height: int, timeout_s: float) -> bool:
        """Block until the index reaches ``height`` (True) or ``timeout_s`` passes."""
        with self.changed:
            return self.changed.wait_for(lambda: self.height >= height, timeout_s)

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total
