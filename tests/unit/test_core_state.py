"""core.state: the ordered key-value space, overlays and typed readers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st_h

from medledger.core import state as st
from medledger.crypto.canonical import canonical


def base() -> st.MemoryState:
    return st.MemoryState({"a/1": b"1", "a/2": b"2", "a/3": b"3", "b/1": b"x"})


def test_memory_state_scan_is_ordered_and_prefixed() -> None:
    s = st.MemoryState({"a/2": b"2", "b/1": b"x", "a/10": b"10", "a/1": b"1"})
    assert [k for k, _ in s.scan("a/")] == ["a/1", "a/10", "a/2"]
    assert list(s.scan("c/")) == []
    s.apply({"a/2": None, "c/1": b"c", "zz": None})
    assert s.data == {"b/1": b"x", "a/10": b"10", "a/1": b"1", "c/1": b"c"}


def test_overlay_reads_its_writes_and_deletions() -> None:
    s = base()
    o = st.Overlay(s)
    o.put("a/2", None)
    o.put("a/4", b"4")
    o.put("a/1", b"one")
    assert o.get("a/2") is None and o.get("a/4") == b"4" and o.get("a/3") == b"3"
    assert list(o.scan("a/")) == [("a/1", b"one"), ("a/3", b"3"), ("a/4", b"4")]
    assert s.get("a/2") == b"2"  # the base is untouched


def test_nested_overlays_merge_or_drop_whole() -> None:
    outer = st.Overlay(base())
    inner = st.Overlay(outer)
    inner.put("a/9", b"9")
    inner.put("a/1", None)
    assert [k for k, _ in inner.scan("a/")] == ["a/2", "a/3", "a/9"]
    assert outer.get("a/9") is None  # not yet merged
    inner.merge_into(outer)
    assert outer.writes == {"a/9": b"9", "a/1": None}
    dropped = st.Overlay(outer)
    dropped.put("a/5", b"5")
    assert outer.get("a/5") is None  # a dropped overlay leaves no trace


def test_typed_readers() -> None:
    o = st.Overlay(st.MemoryState())
    st.put_json(o, "org/org-a", {"id": "org-a", "status": "active"})
    st.put_json(o, "org/org-p", {"id": "org-p", "status": "proposed"})
    st.put_json(o, "actor/pat-1", {"id": "pat-1", "kind": "patient"})
    for v in (1, 2, 10):
        st.put_json(o, st.version_key("Observation", "o1", v), {"v": v})
    o.put("pat/pat-1/Observation/o1", b"1")
    o.put("pat/pat-1/Condition/c1", b"1")
    o.put("pat/pat-10/Observation/o9", b"1")
    st.put_json(o, "share/s1", {"id": "s1", "patient": "pat-1"})
    st.put_json(o, "share/s2", {"id": "s2", "patient": "pat-2"})
    o.put("pshare/pat-1/s1", b"1")  # the index the machine writes with each share
    o.put("pshare/pat-2/s2", b"1")
    assert o.get("org/org-a") == canonical({"id": "org-a", "status": "active"})
    assert st.principal(o, "org-a") == {"id": "org-a", "status": "active", "kind": "org"}
    assert st.principal(o, "pat-1") == {"id": "pat-1", "kind": "patient"}
    assert st.principal(o, "nobody") is None
    assert [x["id"] for x in st.active_orgs(o)] == ["org-a"]
    assert st.version_key("Observation", "o1", 2) == "ver/Observation/o1/0000000002"
    assert [x["v"] for x in st.record_versions(o, "Observation", "o1")] == [1, 2, 10]
    assert st.patient_records(o, "pat-1") == [("Condition", "c1"), ("Observation", "o1")]
    assert st.patient_records(o, "pat-1", "Observation") == [("Observation", "o1")]
    assert [x["id"] for x in st.shares_of(o, "pat-1")] == ["s1"]
    assert st.get_json(o, "missing") is None


_keys = st_h.lists(st_h.tuples(
    st_h.sampled_from(["a/", "a/x/", "a/x/y/", "b/", "ab/", "a"]),
    st_h.sampled_from(["1", "2", "x", "x/1", ""]),
    st_h.one_of(st_h.none(), st_h.just(b"v"))), max_size=40)


@settings(max_examples=300, deadline=None)
@given(base_writes=_keys, writes=_keys, via_update=st_h.booleans(),
       scan_between=st_h.booleans(),
       prefix=st_h.sampled_from(["", "a", "a/", "a/x/", "a/x/y/", "ab", "ab/", "b/", "c/"]))
def test_overlay_scan_equals_a_full_scan(base_writes: list[tuple[str, str, bytes | None]],
                                         writes: list[tuple[str, str, bytes | None]],
                                         via_update: bool, scan_between: bool,
                                         prefix: str) -> None:
    """The prefix index (built lazily, at the first scan after new keys) answers exactly
    what walking every pending write would."""
    base_state = st.MemoryState({p + k: b"base" for p, k, _ in base_writes})
    overlay = st.Overlay(base_state)
    pending = {p + k: v for p, k, v in writes}
    if via_update:
        overlay.writes.update(pending)
    else:
        for key, value in pending.items():
            overlay.put(key, value)
    if scan_between:  # index now; the merge below adds keys to an indexed overlay
        list(overlay.scan(prefix))
    inner = st.Overlay(overlay)
    inner.put(prefix + "new", b"n")
    inner.merge_into(overlay)
    pending[prefix + "new"] = b"n"
    expected = {k: v for k, v in base_state.scan(prefix)}
    for key, value in pending.items():
        if key.startswith(prefix):
            if value is None:
                expected.pop(key, None)
            else:
                expected[key] = value
    assert list(overlay.scan(prefix)) == sorted(expected.items())


def test_get_many_reads_like_get() -> None:
    s = base()
    assert st.get_many(s, ["a/1", "zz", "b/1"]) == {"a/1": b"1", "zz": None, "b/1": b"x"}
