"""Idempotent writes: a client-chosen key makes a retried write return the first outcome.

A client sends ``Idempotency-Key: <key>`` (or ``X-Request-Id``) with a write. The API
middleware puts the key (and the caller's credentials, which scope it) in a context
variable for the request; ``Node.submit`` then

- derives the tx's nonce from the key: ``HMAC-SHA256(signing seed, scope | key | n)``
  (``n`` counts the txs one request submits), so two attempts of one write can never
  both commit — the ledger accepts a (signer, nonce) once;
- journals the signed tx under (signer, nonce) in the node's database *before* it is
  broadcast; a retry finds the journal entry and resubmits those exact bytes (never a
  second, differently sealed tx) or, once they are committed, answers with their result;
- derives the ids of records the request creates from the key (``next_record_id``), so
  the retried create names the same record; a 503 names the record id and version the
  write would create (``would_create``).

The journal lives in the node's SQLite file (table ``idempotency``), next to the
ledger; entries older than ``RETENTION_S`` are dropped.

A **transaction or batch Bundle** (``POST /fhir``) is one request of many txs (a staged
import's begin, parts and commit, each sealed afresh): it is made idempotent as a whole
instead (:class:`BundleJournal`). Its server-assigned ids come from the key
(:class:`KeyedIds`), a retry of the same body answers with the first response once that
is journaled, the same key with another body is refused (409), and a retry while the
first attempt still runs is refused (409) rather than run twice. A retry after a crash
mid-import runs again: the staged import was aborted, and ids, identical content
(no new version) and conditional creates make the second run write what the first would
have.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from typing import Any

from medledger.errors import Conflict, InvalidInput

__all__ = ["HEADERS", "BundleJournal", "Journal", "KeyedIds", "RequestKey", "current",
           "derive_nonce", "next_record_id", "set_current", "submit_once", "would_create"]

HEADERS = (b"idempotency-key", b"x-request-id")
MAX_KEY_CHARS = 200
RETENTION_S = 7 * 24 * 3600

_SCHEMA = """CREATE TABLE IF NOT EXISTS idempotency (
    signer TEXT NOT NULL, nonce TEXT NOT NULL, tx_hash BLOB NOT NULL, raw BLOB NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (signer, nonce)) WITHOUT ROWID"""
_BUNDLE_SCHEMA = """CREATE TABLE IF NOT EXISTS idempotent_bundles (
    scope TEXT NOT NULL, key TEXT NOT NULL, body_hash BLOB NOT NULL, response BLOB,
    created REAL NOT NULL, PRIMARY KEY (scope, key)) WITHOUT ROWID"""


@dataclass
class RequestKey:
    """The idempotency key of the request being served, and how many txs it submitted."""

    key: str
    scope: str = ""  # the authenticated actor the key belongs to ("" if anonymous)
    submitted: int = 0  # txs this request has submitted so far
    ids: int = 0  # record ids this request has drawn so far


_current: contextvars.ContextVar[RequestKey | None] = contextvars.ContextVar(
    "medledger_idempotency_key", default=None)


def current() -> RequestKey | None:
    return _current.get()


def set_current(key: RequestKey | None) -> contextvars.Token[RequestKey | None]:
    return _current.set(key)


def reset_current(token: contextvars.Token[RequestKey | None]) -> None:
    _current.reset(token)


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise InvalidInput(f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable characters")
    return key


def _mac(seed: bytes, *parts: str) -> bytes:
    return hmac.new(seed, "\x00".join(("medledger-idempotency", *parts)).encode(),
                    hashlib.sha256).digest()


def derive_nonce(seed: bytes, scope: str, key: str, n: int) -> str:
    """The nonce of the ``n``-th tx a request with ``key`` submits (32 lowercase hex)."""
    return _mac(seed, "nonce", scope, key, str(n))[:16].hex()


class Journal:
    """Signed txs by (signer, nonce), written before they are broadcast."""

    def __init__(self, store: Any) -> None:
        self.store = store
        with store.lock:
            store.db.execute(_SCHEMA)

    def get(self, signer: str, nonce: str) -> tuple[bytes, bytes] | None:
        """``(tx hash, raw tx)`` journaled for this signer and nonce, if any."""
        with self.store.lock:
            row = self.store.db.execute(
                "SELECT tx_hash, raw FROM idempotency WHERE signer = ? AND nonce = ?",
                (signer, nonce)).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    def remember(self, signer: str, nonce: str, tx_hash: bytes, raw: bytes,
                 now: float | None = None) -> tuple[bytes, bytes]:
        """Journal ``raw`` unless an entry exists; returns the entry that is kept."""
        now = time.time() if now is None else now
        with self.store.lock:
            self.store.db.execute("DELETE FROM idempotency WHERE created < ?",
                                  (now - RETENTION_S,))
            self.store.db.execute("INSERT OR IGNORE INTO idempotency VALUES (?, ?, ?, ?, ?)",
                                  (signer, nonce, tx_hash, raw, now))
        kept = self.get(signer, nonce)
        assert kept is not None
        return kept


class BundleJournal:
    """Transaction/batch Bundles by (caller, key): the SHA-256 of the body and, once it
    is answered, its response (kept only when it holds no resource and no
    OperationOutcome — statuses, locations, versions and times, what the ledger's
    metadata shows anyway: no PHI is written here)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.running: set[tuple[str, str]] = set()  # (scope, key) being processed now
        with store.lock:
            store.db.execute(_BUNDLE_SCHEMA)

    def begin(self, req: RequestKey, body_hash: bytes, now: float | None = None
              ) -> bytes | None:
        """The first response to this key, if journaled; else mark the key running.
        Raises Conflict (409) for the same key with another body, or while it runs."""
        now = time.time() if now is None else now
        ident = (req.scope, req.key)
        with self.store.lock:
            self.store.db.execute("DELETE FROM idempotent_bundles WHERE created < ?",
                                  (now - RETENTION_S,))
            row = self.store.db.execute(
                "SELECT body_hash, response FROM idempotent_bundles WHERE scope = ? AND key = ?",
                ident).fetchone()
            if row is not None and bytes(row[0]) != body_hash:
                raise Conflict(f"Idempotency-Key {req.key!r} was used with another Bundle; "
                               "use a new key for a different request")
            if ident in self.running:
                raise Conflict(f"a Bundle with Idempotency-Key {req.key!r} is still being "
                               "processed; retry when it has answered")
            if row is not None and row[1] is not None:
                return bytes(row[1])
            self.store.db.execute("INSERT OR REPLACE INTO idempotent_bundles VALUES "
                                  "(?, ?, ?, NULL, ?)", (*ident, body_hash, now))
            self.running.add(ident)
        return None

    def finish(self, req: RequestKey, response: bytes | None, refused: bool = False) -> None:
        """The attempt is over: journal its response (None: a retry runs it again). A
        ``refused`` Bundle (a 4xx: nothing of it was committed) frees its key."""
        with self.store.lock:
            self.running.discard((req.scope, req.key))
            if refused:
                self.store.db.execute("DELETE FROM idempotent_bundles WHERE scope = ? AND "
                                      "key = ?", (req.scope, req.key))
            elif response is not None:
                self.store.db.execute("UPDATE idempotent_bundles SET response = ? WHERE "
                                      "scope = ? AND key = ?", (response, req.scope, req.key))


class KeyedIds:
    """Ids for the resources a Bundle creates without one (``POST`` with no
    ``urn:uuid:`` fullUrl), derived from the request's key in entry order, so a retried
    Bundle creates the same records (picklable: planning runs on the worker pool)."""

    def __init__(self, scope: str, key: str) -> None:
        self.scope, self.key, self.drawn = scope, key, 0

    def __call__(self) -> str:
        n, self.drawn = self.drawn, self.drawn + 1
        digest = hashlib.sha256("\x00".join(("medledger-bundle-id", self.scope, self.key,
                                             str(n))).encode()).digest()
        return str(uuid.UUID(bytes=digest[:16], version=4))


def next_record_id() -> str:
    """The id for a record this request creates: derived from the idempotency key (stable
    across retries) when the request has one, else a random UUID."""
    req = current()
    if req is None:
        return str(uuid.uuid4())
    n, req.ids = req.ids, req.ids + 1
    digest = hashlib.sha256("\x00".join(("medledger-record-id", req.scope or "", req.key,
                                         str(n))).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def would_create(kind: str, body: dict[str, Any]) -> str:
    """What a write would create, in words a 503 can carry (record ids and versions)."""
    puts = [body] if kind == "record.put" else [
        op["body"] for op in body.get("ops", []) if op.get("kind") == "record.put"
    ] if kind == "batch" else []
    refs = [f"{b.get('type')}/{b.get('id')} version {b.get('version')}" for b in puts[:5]]
    if not refs:
        return f"it would apply a {kind} tx"
    more = f" and {len(puts) - 5} more" if len(puts) > 5 else ""
    first = puts[0]
    return (f"it would create {', '.join(refs)}{more} (check with GET /fhir/{first.get('type')}"
            f"/{first.get('id')}/_history/{first.get('version')})")


async def submit_once(node: Any, req: RequestKey, identity: Any, kind: str,
                      body: dict[str, Any]) -> Any:
    """``Node.submit`` for a request with an idempotency key (see the module docstring)."""
    from medledger.core.tx import make_tx
    from medledger.errors import Unavailable

    nonce = derive_nonce(identity.sign_seed, req.scope, req.key, req.submitted)
    req.submitted += 1
    entry = node.journal.get(identity.id, nonce)
    if entry is None:
        tx = make_tx(identity.id, identity.signer(), node.chain, kind, body, nonce)
        entry = node.journal.remember(identity.id, nonce, tx.hash, tx.raw)
    tx_hash, raw = entry
    try:
        return await node.submit_raw(raw)
    except Unavailable as err:
        err.message = (f"{err.message}. {would_create(kind, body)}. Retry with the same "
                       f"Idempotency-Key ({req.key}): the write is never applied twice, and a "
                       "retry answers with its outcome")
        raise


def committed_outcome(store: Any, tx_hash: bytes) -> Any:
    """The first outcome of a tx already in a block: its ``Committed`` result, or the
    error it was refused with; ``None`` if it is not committed here."""
    from medledger.consensus.solo import Committed
    from medledger.node.service import error_for

    found = store.tx(tx_hash)
    if found is None:
        return None
    height, _, _, code, log = found
    if code != 0:
        raise error_for(code, log)
    return Committed(code, log, b"", height, tx_hash)
