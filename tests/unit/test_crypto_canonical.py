"""crypto.canonical: one value, one byte string; base64url round trips and size errors."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from medledger.crypto.canonical import b64d, b64e, canonical, loads, sha256
from medledger.errors import InvalidInput

JSON = hs.recursive(
    hs.none() | hs.booleans() | hs.integers(-(2**63), 2**63 - 1) | hs.text(max_size=8),
    lambda inner: hs.lists(inner, max_size=4) | hs.dictionaries(hs.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 1, "a": 2}, b'{"a":2,"b":1}'),
        ({"z": {"y": 1, "x": [3, {"d": 0, "c": None}]}, "a": True},
         b'{"a":true,"z":{"x":[3,{"c":null,"d":0}],"y":1}}'),
        ([1, "two", None, False], b'[1,"two",null,false]'),
        ("h\u00e9llo \u2603", "\"h\u00e9llo \u2603\"".encode()),  # UTF-8, not \u escapes
        ({"B": 1, "a": 2, "_": 3}, b'{"B":1,"_":3,"a":2}'),  # code-point order
        ({}, b"{}"),
        ((1, 2), b"[1,2]"),
    ],
)
def test_canonical_bytes(value: Any, expected: bytes) -> None:
    assert canonical(value) == expected


def test_key_order_does_not_change_bytes() -> None:
    a = {"patient": "p1", "kind": "record.put", "body": {"v": 1, "id": "x"}}
    b = {"body": {"id": "x", "v": 1}, "kind": "record.put", "patient": "p1"}
    assert canonical(a) == canonical(b)


@pytest.mark.parametrize(
    "value",
    [b"bytes", {1: "int key"}, {"s": {1, 2}}, object(), Decimal("1.5"), 2**64,
     datetime.datetime(2024, 1, 1), datetime.date(2024, 1, 1)],
    ids=["bytes", "int-key", "set", "object", "decimal", "too-big-int", "datetime", "date"],
)
def test_rejects_non_json(value: Any) -> None:
    with pytest.raises(InvalidInput, match="cannot be canonically encoded"):
        canonical(value)


def test_rejects_dataclass() -> None:
    @dataclasses.dataclass
    class D:
        x: int

    with pytest.raises(InvalidInput):
        canonical(D(1))


@settings(max_examples=100, deadline=None)
@given(JSON)
def test_round_trip_is_stable(value: Any) -> None:
    once = canonical(value)
    assert canonical(loads(once)) == once


@pytest.mark.parametrize("bad", [b"{", b"", b"{'a':1}", b"[1,]", b"\xff", b"NaN"])
def test_loads_rejects_malformed(bad: bytes) -> None:
    with pytest.raises(InvalidInput, match="malformed JSON"):
        loads(bad)


def test_sha256() -> None:
    assert sha256(b"abc") == hashlib.sha256(b"abc").digest()


@settings(max_examples=100, deadline=None)
@given(hs.binary(max_size=70))
def test_b64_round_trip(data: bytes) -> None:
    text = b64e(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64d(text) == data
    assert b64d(text, size=len(data)) == data


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", b""), ("AA", b"\x00"), ("YQ", b"a"), ("YWI", b"ab"), ("YWJj", b"abc"),
     ("-_8", b"\xfb\xff")],
)
def test_b64d_vectors(text: str, expected: bytes) -> None:
    assert b64d(text) == expected
    assert b64e(expected) == text


@pytest.mark.parametrize(
    "text",
    ["A", "!!!!", "YQ==", "a+b/", "ab cd", "YQ\n", "AB", "YR", "YWK"],
    ids=["short", "alphabet", "padding", "std-alphabet", "space", "newline",
         "trailing-bits-1", "trailing-bits-2", "trailing-bits-3"],
)
def test_b64d_rejects_invalid_or_non_canonical(text: str) -> None:
    with pytest.raises(InvalidInput, match="sig"):
        b64d(text, field="sig")


@pytest.mark.parametrize("value", [None, 12, b"YQ", ["YQ"]])
def test_b64d_rejects_non_strings(value: Any) -> None:
    with pytest.raises(InvalidInput, match="must be a base64url string"):
        b64d(value, field="key")


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_b64d_size_error_names_field_and_sizes(size: int) -> None:
    with pytest.raises(InvalidInput, match=rf"sign_pub must be {size} bytes, got 32"):
        b64d(b64e(b"\x01" * 32), field="sign_pub", size=size)


@pytest.mark.parametrize("length", [600, 5_000, 700_000])
def test_canonical_bytes_are_right_sized(length: int) -> None:
    """What medledger keeps (state entries, txs, staged parts) holds its own length, not
    the encoder's working buffer (orjson 3.12+ never trims it: 8 KiB for 600 bytes)."""
    import tracemalloc

    value = {"k": "x" * length}
    tracemalloc.start()
    try:
        kept = [canonical(value) for _ in range(20)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert all(len(b) == length + 8 for b in kept)
    assert held < 20 * (length + 8) * 1.2 + 4096
