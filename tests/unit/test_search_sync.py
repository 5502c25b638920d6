"""The index follows the ledger: committed blocks are indexed by the worker thread,
searches can wait for a height, catch-up re-indexes what changed while stopped,
erased records leave the index."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from medledger.core.state import MemoryState
from medledger.crypto.canonical import canonical
from medledger.search.extract import extract
from medledger.search.index import SearchIndex
from medledger.search.sync import IndexSync


class Ledger(MemoryState):
    height = 0


def _obs(oid: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "subject": {"reference": "Patient/p"},
            "code": {"coding": [{"code": code}]}}


def _meta(oid: str, v: int) -> dict[str, Any]:
    return {"type": "Observation", "id": oid, "v": v, "patient": "p", "category": "laboratory",
            "labels": [], "time_ns": v}


def _codes(index: SearchIndex) -> set[tuple[str, str]]:
    pid = index.pid("Observation", "code")
    return {(i, c) for i, c in index.query(
        "SELECT res.id, t.code FROM t JOIN res ON res.rid = t.rid WHERE t.pid = ?", (pid,))}


def test_blocks_are_indexed_and_catch_up_repairs(tmp_path: Path) -> None:
    ledger = Ledger()
    plain: dict[tuple[str, int], dict[str, Any]] = {}

    def commit(height: int, changes: dict[str, tuple[int, str] | None]) -> Any:
        writes: dict[str, bytes | None] = {}
        for oid, change in changes.items():
            if change is None:
                writes[f"rec/Observation/{oid}"] = None
                continue
            v, code = change
            plain[(oid, v)] = _obs(oid, code)
            writes[f"rec/Observation/{oid}"] = canonical(_meta(oid, v))
        ledger.apply(writes)
        ledger.height = height
        return SimpleNamespace(header={"height": height}, writes=writes)

    key = os.urandom(32)
    index = SearchIndex(tmp_path / "index.db", key)
    sync = IndexSync(index, ledger, lambda m: plain[(m["id"], m["v"])])
    sync.start()
    sync.on_commit(commit(1, {"o1": (1, "A"), "o2": (1, "B")}), ())
    sync.on_commit(commit(2, {"o1": (2, "C")}), ())
    assert sync.wait_for(2, 10)
    assert _codes(index) == {("o1", "C"), ("o2", "B")}
    sync.on_commit(commit(3, {"o2": None}), ())  # state entry gone: gone from the index
    assert sync.wait_for(3, 10)
    assert _codes(index) == {("o1", "C")}
    erased = {**_meta("o1", 2), "erased": {"at": 1, "by": "p", "basis": "x", "tx": "t"}}
    ledger.apply({"rec/Observation/o1": canonical(erased)})  # record.erase marks the head
    ledger.height = 4
    sync.on_commit(SimpleNamespace(header={"height": 4}, writes={
        "rec/Observation/o1": canonical(erased)}), ())
    assert sync.wait_for(4, 10)
    assert _codes(index) == set()
    sync.stop()
    commit(5, {"o3": (1, "D"), "o1": (3, "E")})  # committed while the indexer was down
    sync2 = IndexSync(index, ledger, lambda m: plain[(m["id"], m["v"])])
    assert sync2.catch_up() == 2
    assert index.height == 5 and _codes(index) == {("o1", "E"), ("o3", "D")}
    assert sync2.rebuild() == 2 and _codes(index) == {("o1", "E"), ("o3", "D")}
    index.close()


def test_height_waits_for_content_not_replicated_yet(tmp_path: Path) -> None:
    """A record whose content has not reached this node (ADR 4) is retried, and the index
    height does not pass it until it is indexed: searches wait instead of missing it."""
    from medledger.errors import Unavailable

    ledger = Ledger()
    arrived: set[str] = set()

    def decrypt(meta: dict[str, Any]) -> dict[str, Any]:
        if meta["id"] not in arrived:
            raise Unavailable("the content has not been replicated to this node yet")
        return _obs(meta["id"], "Z")

    index = SearchIndex(tmp_path / "index.db", os.urandom(32))
    sync = IndexSync(index, ledger, decrypt)
    sync.start()
    writes: dict[str, bytes | None] = {"rec/Observation/o9": canonical(_meta("o9", 1))}
    ledger.apply(writes)
    ledger.height = 1
    sync.on_commit(SimpleNamespace(header={"height": 1}, writes=writes), ())
    assert not sync.wait_for(1, 1.5)  # held back: o9's content is missing
    arrived.add("o9")  # the replicator fetched it
    assert sync.wait_for(1, 10)
    assert _codes(index) == {("o9", "Z")}
    sync.stop()
    index.close()


def test_records_wait_for_their_blobs_without_decryption_attempts(tmp_path: Path) -> None:
    """With the blob store's ``have``, a head whose blob has not arrived is not decrypted
    (a member receives a large import's heads before its blobs); it waits, holding the
    height, and a newer version of the same record replaces the waiting one."""
    ledger = Ledger()
    held: set[str] = set()
    attempts: list[tuple[str, int]] = []
    codes = {("o1", 1): "A", ("o2", 1): "B", ("o2", 2): "C"}

    def decrypt(meta: dict[str, Any]) -> dict[str, Any]:
        attempts.append((meta["id"], meta["v"]))
        assert meta["blob"] in held, "decrypted before its blob arrived"
        return _obs(meta["id"], codes[(meta["id"], meta["v"])])

    def commit(height: int, versions: list[tuple[str, int]]) -> None:
        writes: dict[str, bytes | None] = {
            f"rec/Observation/{oid}": canonical({**_meta(oid, v), "blob": f"{oid}v{v}"})
            for oid, v in versions}
        ledger.apply(writes)
        ledger.height = height
        sync.on_commit(SimpleNamespace(header={"height": height}, writes=writes), ())

    index = SearchIndex(tmp_path / "index.db", os.urandom(32))
    sync = IndexSync(index, ledger, decrypt, lambda hashes: held & set(hashes))
    sync.start()
    held.add("o1v1")
    commit(1, [("o1", 1), ("o2", 1)])
    assert not sync.wait_for(1, 1.5)  # o2's blob is missing: the height waits
    assert _codes(index) == {("o1", "A")}
    commit(2, [("o2", 2)])  # a newer version while v1 still waits
    held.add("o2v2")
    assert sync.wait_for(2, 10)
    assert _codes(index) == {("o1", "A"), ("o2", "C")}
    assert ("o2", 1) not in attempts and sync.failed == {}
    sync.stop()
    index.close()


def test_catch_up_recomputes_blocking_keys_of_another_version(tmp_path: Path) -> None:
    """An index whose Patients hold blocking keys of an older key set (as kept by a node
    from before a change of ``matching.KEYS_VERSION``) has them recomputed on start, and
    only once; other records are left alone."""
    from medledger.search import matching
    ledger = Ledger()
    people = {f"p{i}": {"resourceType": "Patient", "id": f"p{i}", "birthDate": "1961-07-04",
                        "name": [{"family": f"Quetzal{i}", "given": ["Ana"]}]}
              for i in range(2)}
    plain = {(pid, 1): r for pid, r in people.items()} | {("o1", 1): _obs("o1", "A")}
    writes = {f"rec/Patient/{pid}": canonical({**_meta(pid, 1), "type": "Patient",
                                                "patient": pid}) for pid in people}
    writes["rec/Observation/o1"] = canonical(_meta("o1", 1))
    ledger.apply(writes)
    ledger.height = 1
    index = SearchIndex(tmp_path / "index.db", os.urandom(32), lambda r: {f"old:{r['id']}"})
    sync = IndexSync(index, ledger, lambda m: plain[(m["id"], m["v"])])
    assert sync.catch_up() == 3
    index.set_meta_value("blocking", "1")  # the keys above are of version 1
    index.blocking_keys = matching.blocking_keys
    assert matching.keys_stale(index)
    heights: list[int] = []
    apply = index.apply_extracted

    def watched(entries: Any, *args: Any, **kw: Any) -> int:
        entries = list(entries)
        if entries:
            heights.append(index.height)  # what a waiting $match sees meanwhile
        return apply(entries, *args, **kw)

    index.apply_extracted = watched  # type: ignore[method-assign]
    assert sync.catch_up() == 2  # the two Patients, not the Observation
    assert heights == [0] and index.height == 1  # held back until re-keyed
    keys = {k for (k,) in index.query("SELECT key FROM blk")}
    assert "fd:quetzal0|1961-07-04" in keys and "sy:Q324|1961|a" in keys
    assert not any(k.startswith("old:") for k in keys)
    assert not matching.keys_stale(index) and sync.catch_up() == 0
    assert {i for (i,) in index.query(
        "SELECT res.id FROM blk JOIN res ON res.rid = blk.rid WHERE blk.key = ?",
        ("fg:quetzal1|A500|07-04",))} == {"p1"}
    index.close()


def test_a_writers_hint_replaces_decryption_for_that_blob_only(tmp_path: Path) -> None:
    """A version this node sealed is indexed from the values the sealer extracted, keyed
    by its blob hash: no decryption. A head with another blob (someone else's version)
    is decrypted as ever; a forgotten hint (refused write) is never used."""
    ledger = Ledger()
    decrypted: list[str] = []
    plain = {"o2": _obs("o2", "B"), "o3": _obs("o3", "C")}

    def decrypt(meta: dict[str, Any]) -> dict[str, Any]:
        decrypted.append(meta["id"])
        return plain[meta["id"]]

    index = SearchIndex(tmp_path / "index.db", os.urandom(32))
    sync = IndexSync(index, ledger, decrypt)
    metas = [{**_meta(oid, 1), "blob": f"h-{oid}"} for oid in ("o1", "o2", "o3")]
    sync.expect("h-o1", extract(_obs("o1", "A")), None)
    sync.expect("h-o2-other", extract(_obs("o2", "WRONG")), None)  # not the committed blob
    sync.expect("h-o3", extract(_obs("o3", "WRONG")), None)
    sync.forget(["h-o3"])  # the ledger refused that write
    ledger.apply({f"rec/Observation/{m['id']}": canonical(m) for m in metas})
    sync.apply(metas, 1)
    assert decrypted == ["o2", "o3"]
    assert _codes(index) == {("o1", "A"), ("o2", "B"), ("o3", "C")}
    assert set(sync.expected) == {"h-o2-other"}  # o1's hint was used once, then dropped
    sync.max_expected = 2  # hints of writes that never commit are bounded: oldest go
    for n in range(3):
        sync.expect(f"h-extra{n}", None, _obs(f"x{n}", "Z"))
    assert list(sync.expected) == ["h-extra1", "h-extra2"]
    index.close()
