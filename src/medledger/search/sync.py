"""Keeping the index at the ledger's height: as blocks commit, and on start.

The ledger application calls ``on_commit`` for every committed block (in the
consensus path: it only queues the block's new record heads). A worker thread
decrypts each new head (the node is a reader of every record), extracts its values
and writes them, then records the block's height. Searches call ``wait_for`` with
the ledger height at request time, so a client sees its own writes.

A version this node has just sealed need not be decrypted again: the writer hands the
index what it knew when sealing (``expect``: the values the sealing worker extracted, or
the plaintext), keyed by the sealed blob's hash, so the index trusts it only for the
head whose blob is that one; a write the ledger refused is forgotten (``forget``).

On start, ``catch_up`` compares every record head in the ledger with the index (by
version) and re-indexes what differs, so a node that stopped with a lagging index,
or an index deleted by hand, comes back complete.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from medledger.crypto.canonical import loads
from medledger.errors import Unavailable
from medledger.search import matching
from medledger.search.extract import Extracted, extract
from medledger.search.index import SearchIndex

log = logging.getLogger(__name__)
Decrypt = Callable[[dict[str, Any]], dict[str, Any]]
Progress = Callable[[int, int], None]
HeldBlobs = Callable[[list[str]], set[str]]
# (head meta, values or None to remove the record, the resource when the index needs it)
Entry = tuple[dict[str, Any], Extracted | None, dict[str, Any] | None]
BATCH = 500
RETRY_S = 1.0


def _erased(meta: dict[str, Any]) -> bool:
    return bool(meta.get("erased"))


def _metas(heads: list[tuple[str, bytes | None]]) -> list[dict[str, Any]]:
    """Record heads from their state writes (``rec/{type}/{id}``); a deleted one becomes
    an erased stub, which drops the record from the index."""
    metas = []
    for key, value in heads:
        if value is not None:
            metas.append(loads(value))
        else:
            _, rtype, rid = key.split("/", 2)
            metas.append({"type": rtype, "id": rid, "erased": True})
    return metas


class IndexSync:
    max_expected = 250_000  # writers' hints held (a few KB each): a large import's worth

    def __init__(self, index: SearchIndex, store: Any, decrypt: Decrypt,
                 held_blobs: HeldBlobs | None = None) -> None:
        self.index = index
        self.store = store
        self.decrypt = decrypt
        # which sealed blobs this node holds (one query per few hundred): a version whose
        # blob has not arrived waits without a decryption attempt (on a member, most of
        # a large import's records commit before the replicator has fetched their blobs)
        self.held_blobs = held_blobs
        self.queue: queue.Queue[tuple[int, list[tuple[str, bytes | None]]] | None] = \
            queue.Queue()
        self.thread: threading.Thread | None = None
        # content not replicated to this node yet (ADR 4): retried every second; until it is
        # indexed the index height does not pass it, so searches wait for it (bounded)
        self.failed: dict[tuple[str, str], dict[str, Any]] = {}
        self.held: int | None = None  # the height reached once ``failed`` is empty
        self.error: str | None = None
        # blob hash -> (values, resource) of versions this node sealed, until committed
        self.expected: dict[str, tuple[Extracted | None, dict[str, Any] | None]] = {}
        self.expected_lock = threading.Lock()

    # ------------------------------------------------------------ the writer's hints
    def expect(self, blob: str, values: Extracted | None,
               resource: dict[str, Any] | None) -> None:
        """What the version sealed as ``blob`` indexes as (``values``; or ``resource``,
        extracted here): used instead of decrypting it when it commits. The resource is
        needed with the values only for a Patient (its blocking keys). At most
        ``max_expected`` are held (a write that timed out may never commit): the oldest
        goes, and is decrypted like any other version if it commits after all."""
        with self.expected_lock:  # the loop adds, the index thread takes
            while len(self.expected) >= self.max_expected:
                self.expected.pop(next(iter(self.expected)))
            self.expected[blob] = (values, resource)

    def forget(self, blobs: Iterable[str]) -> None:
        """Drop hints of versions the ledger will never commit."""
        with self.expected_lock:
            for blob in blobs:
                self.expected.pop(blob, None)

    # ------------------------------------------------------------ feeding
    def on_commit(self, applied: Any, txs: Any) -> None:
        """Ledger commit listener: queue the block's record head writes, as they are (the
        worker decodes them: a large import commits ~35,000 heads in one block)."""
        heads = [(k, v) for k, v in applied.writes.items() if k.startswith("rec/")]
        self.queue.put((int(applied.header["height"]), heads))

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="search-index", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout=30)
            self.thread = None

    def wait_for(self, height: int, timeout_s: float) -> bool:
        return self.index.wait_for(height, timeout_s)

    # ------------------------------------------------------------ worker
    def _run(self) -> None:
        try:
            self.catch_up()
        except Exception as exc:  # never kill the node: searches report it
            self.error = f"search index catch-up failed: {exc}"
            log.exception("search index catch-up failed")
        while True:
            try:
                item = self.queue.get(timeout=RETRY_S if self.failed else None)
            except queue.Empty:
                self._retry()
                continue
            if item is None:
                return
            height, heads = item
            while len(heads) < BATCH * 4:  # fold queued blocks into one transaction
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                height, more = nxt
                heads.extend(more)
            try:
                self.apply(_metas(heads), height)
            except Exception as exc:
                self.error = f"search index update failed at height {height}: {exc}"
                log.exception("search index update failed")

    def _retry(self) -> None:
        try:
            self.apply([], self.held)
        except Exception as exc:
            self.error = f"search index update failed: {exc}"
            log.exception("search index update failed")

    def _entry(self, meta: dict[str, Any]) -> Entry | None:
        if _erased(meta):
            return meta, None, None
        with self.expected_lock:
            hint = self.expected.pop(meta.get("blob", ""), None)
        if hint is not None:  # sealed here: its values, or the plaintext to extract them
            values, resource = hint
            if values is None:
                assert resource is not None
                values = extract(resource)
            return meta, values, resource
        try:
            resource = self.decrypt(meta)
        except Unavailable:  # content not replicated here yet: retry, hold height
            self.failed[(meta["type"], meta["id"])] = meta
            return None
        except Exception as err:  # never openable here (e.g. sealed before we joined)
            log.warning("search index: %s/%s cannot be indexed here: %s", meta["type"],
                        meta["id"], err)
            return None
        return meta, extract(resource), resource

    def _arrived(self, retry: list[dict[str, Any]], metas: list[dict[str, Any]]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(earlier failures, new heads) worth a decryption attempt now; the rest stay in
        ``failed`` (keyed by record: a newer version replaces a waiting one)."""
        self.failed = {}
        if self.held_blobs is None:
            return retry, metas
        held = self.held_blobs([m["blob"] for m in [*retry, *metas]
                                if not _erased(m) and "blob" in m])
        ready: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        for out, group in zip(ready, (retry, metas), strict=True):
            for m in group:
                key = (m["type"], m["id"])
                if _erased(m) or "blob" not in m or m["blob"] in held:
                    self.failed.pop(key, None)
                    out.append(m)
                else:
                    self.failed[key] = m
        return ready

    def _still_head(self, meta: dict[str, Any]) -> bool:
        raw = self.store.get(f"rec/{meta['type']}/{meta['id']}")
        return raw is not None and loads(raw).get("v") == meta["v"]

    def apply(self, metas: list[dict[str, Any]], height: int | None) -> int:
        """Index ``metas`` (after the retries of earlier failures); record ``height``
        unless some content is still missing (then it is reached later, on retry)."""
        waiting = len(self.failed)
        retry, metas = self._arrived(list(self.failed.values()), metas)
        retry = [m for m in retry if self._still_head(m)]
        entries = [e for m in [*retry, *metas] if (e := self._entry(m)) is not None]
        if len(self.failed) > waiting:
            log.info("search index: %d records wait for their content (not replicated to "
                     "this node yet)", len(self.failed))
        if height is not None:
            self.held = max(height, self.held or 0)
        reached = self.held if not self.failed else None
        n = self.index.apply_extracted(entries, reached)
        if any(values is None for _, values, _ in entries):
            self.index.checkpoint()  # erased rows leave the WAL too (ADR 4)
        return n

    def catch_up(self, progress: Progress | None = None) -> int:
        """Index every ledger head the index lacks or holds at another version; drop rows
        of records the ledger no longer has; every Patient again when the index holds
        blocking keys of another version (``matching.KEYS_VERSION``). Returns how many
        records changed."""
        height = int(self.store.height)
        rekey = matching.keys_stale(self.index)
        if self.index.height == height and not self.failed and not rekey:
            return 0
        indexed = {(t, i): v for t, i, v in self.index.heads()}
        todo: list[dict[str, Any]] = []
        seen = set()
        for _, raw in self.store.scan("rec/"):
            meta = loads(raw)
            key = (meta["type"], meta["id"])
            seen.add(key)
            if indexed.get(key) != meta["v"] or _erased(meta) or (
                    rekey and meta["type"] == "Patient"):
                todo.append(meta)
        todo.extend({"type": t, "id": i, "erased": True} for t, i in indexed
                    if (t, i) not in seen)
        if rekey and any(m["type"] == "Patient" for m in todo):
            # matching waits for the index height: hold it back until every Patient has
            # its new keys, so no duplicate check runs on a half re-keyed index
            self.index.set_height(0)
        done = 0
        for start in range(0, len(todo), BATCH):
            chunk = todo[start:start + BATCH]
            last = start + BATCH >= len(todo)
            self.apply(chunk, height if last else None)
            done += len(chunk)
            if progress:
                progress(done, len(todo))
        if not todo:
            self.index.set_height(height)
        if rekey:
            matching.mark_keys_current(self.index)
        return len(todo)

    def rebuild(self, progress: Progress | None = None) -> int:
        """Forget the index and index every ledger head again."""
        self.index.reset()
        n = self.catch_up(progress)
        self.index.checkpoint()
        return n
