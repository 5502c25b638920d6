"""storage.blobs and node.replica housekeeping: the node-local sealed-blob store (ADR 4).

The blob store is checked against its contract (hash-named, verified on put, deletion
that leaves no bytes behind, a replication queue with back-off, share payloads whose
label outlives the payload), and the replicator's pure bookkeeping runs against an
in-memory ledger state: what a committed block makes it want, delete and settle, and
the garbage it may collect.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from medledger.core import state as st
from medledger.core.machine import BlockApplied
from medledger.crypto.canonical import canonical
from medledger.errors import IntegrityError, StorageError
from medledger.node.replica import GARBAGE_AGE_S, Replicator
from medledger.storage.blobs import BlobStore, blob_hash


def blob(text: str) -> tuple[str, bytes]:
    data = text.encode()
    return blob_hash(data), data


def test_put_checks_the_name_and_get_returns_bytes() -> None:
    store = BlobStore(":memory:")
    h, data = blob("sealed-1")
    store.put([(h, data)])
    assert store.get(h) == data and store.have([h, "00" * 32]) == {h}
    with pytest.raises(IntegrityError):
        store.put([("ab" * 32, data)])
    assert store.count() == 1


def test_have_and_settle_many_at_once() -> None:
    """More hashes than one query takes: every held one is found, every settled one
    leaves the pending list (and only those)."""
    store = BlobStore(":memory:")
    items = [blob(f"sealed-{i}") for i in range(1203)]
    store.put(items, {h: f"Observation/o{i}/1" for i, (h, _) in enumerate(items)})
    absent = [blob_hash(f"never-{i}".encode()) for i in range(700)]
    held = [h for h, _ in items]
    assert store.have([*absent, *held, held[0]]) == set(held)
    store.settle(held[:1100])
    assert {h for h, _ in store.stale_pending(float("inf"))} == set(held[1100:])


def test_put_is_one_transaction() -> None:
    """A put's blob rows, its clearing of the replication queue and its pending marks
    land together or not at all: here the pending insert fails (a trigger refuses it)
    after the blob insert and the queue delete ran, and neither of those may stay."""
    store = BlobStore(":memory:")
    h, data = blob("sealed-atomic")
    store.want([(h, "Observation/o1/1", "org-b", 5)])
    store.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON pending "
                     "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(StorageError, match="refused"):
        store.put([(h, data)], pending="Observation/o1/1")
    assert store.get(h) is None and store.count() == 0
    assert [w[0] for w in store.wanted(float("inf"))] == [h]  # still wanted
    store.db.execute("DROP TRIGGER refuse")
    store.put([(h, data)], pending="Observation/o1/1")  # the store is usable after
    assert store.get(h) == data and store.wanted(float("inf")) == []
    assert [p[0] for p in store.stale_pending(float("inf"))] == [h]


def test_delete_leaves_no_bytes_in_the_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs.db")
    secret = "ciphertext-marker-" + "x" * 4000
    h, data = blob(secret)
    store.put([(h, data)])
    assert store.delete([h]) == 1 and store.get(h) is None
    store.close()
    for f in tmp_path.iterdir():  # secure_delete + WAL checkpoint: the bytes are gone
        assert b"ciphertext-marker" not in f.read_bytes(), f


def test_replication_queue_backs_off_and_clears_on_arrival() -> None:
    store = BlobStore(":memory:")
    h, data = blob("wanted")
    store.want([(h, "Observation/o1/1", "org-b", 5)])
    assert store.wanted(now=0.0) == [(h, "Observation/o1/1", "org-b")]
    store.retry_later([h], now=100.0)
    assert store.wanted(now=100.0) == []  # backing off
    assert store.wanted(now=200.0) != []
    assert store.missing() == [(h, "Observation/o1/1", "org-b", 1)]
    store.put([(h, data)])
    assert store.missing_count() == 0


def test_share_payload_goes_label_stays() -> None:
    store = BlobStore(":memory:")
    store.put_share("s1", b"jwe", b"verifier", b"sealed-label", 10.0)
    assert store.share("s1") == (b"jwe", b"verifier", b"sealed-label")
    assert store.share_ids() == [("s1", 10.0)]
    store.drop_shares(["s1"])
    assert store.share("s1") == (b"", None, b"sealed-label")
    assert store.share_ids() == []
    store.forget_share("s1")
    assert store.share("s1") is None


# ---------------------------------------------------------------- the replicator


def meta(rid: str, v: int, h: str, **extra: Any) -> dict[str, Any]:
    return {"type": "Observation", "id": rid, "v": v, "blob": h, "org": "org-a",
            "patient": "pat-1", "readers": ["org-a", "pat-1"], **extra}


def fake_node() -> Any:
    state = st.MemoryState()
    return SimpleNamespace(store=state, blobs=BlobStore(":memory:"),
                           org=SimpleNamespace(id="org-b"),
                           config=SimpleNamespace(extra={}), on_erase=[])


def applied(writes: dict[str, bytes | None], height: int = 1) -> BlockApplied:
    return BlockApplied({"height": height}, b"", b"", (), (), writes, (), ())


def test_commit_wants_missing_deletes_erased_and_settles_own() -> None:
    node = fake_node()
    rep = Replicator(node)
    own_h, own = blob("own")
    node.blobs.put([(own_h, own)], pending="Observation/o1/1")
    other_h = hashlib.sha256(b"elsewhere").hexdigest()
    gone_h, gone = blob("to erase")
    node.blobs.put([(gone_h, gone)])
    erased = meta("o3", 1, gone_h, erased={"at": 1, "by": "pat-1", "basis": "objection"})
    seen: list[list[dict[str, Any]]] = []
    node.on_erase.append(seen.append)
    rep.on_commit(applied({"ver/Observation/o1/0000000001": canonical(meta("o1", 1, own_h)),
                           "ver/Observation/o2/0000000001": canonical(meta("o2", 1, other_h)),
                           "ver/Observation/o3/0000000001": canonical(erased)}, 7), ())
    assert [h for h, *_ in node.blobs.missing()] == [other_h]  # fetched from a member
    assert node.blobs.get(gone_h) is None and seen == [[erased]]  # shredded, index told
    assert node.blobs.stale_pending(before=1e12) == []  # own write committed: settled


def test_garbage_is_only_what_no_commit_references() -> None:
    node = fake_node()
    rep = Replicator(node)
    kept_h, kept = blob("committed")
    lost_h, lost = blob("refused write")
    key_h, key = blob("a re-wrapped key")
    node.blobs.put([(kept_h, kept)], pending="Observation/o1/1")
    node.blobs.put([(lost_h, lost)], pending="Observation/o2/1")
    node.blobs.put([(key_h, key)], pending="Observation/o1/1/key:org-c")
    node.store.apply({"ver/Observation/o1/0000000001": canonical(meta("o1", 1, kept_h)),
                      "wrap/Observation/o1/0000000001/org-c/org-b": canonical({"key": key_h})})
    import time
    assert rep.collect_garbage(time.time()) == 0  # too young: its tx may still commit
    assert rep.collect_garbage(time.time() + GARBAGE_AGE_S + 1) == 1
    assert node.blobs.get(lost_h) is None
    assert node.blobs.get(kept_h) == kept and node.blobs.get(key_h) == key
