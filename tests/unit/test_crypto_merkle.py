"""crypto.merkle: RFC 6962 roots and inclusion proofs, driven by vectors/merkle_rfc6962.json.

The vectors are the published certificate-transparency test data (as carried by
transparency-dev/merkle); the tampered cases are mutations that must all fail.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from medledger.crypto import merkle

DOC: dict[str, Any] = orjson.loads(
    (Path(__file__).parent / "vectors" / "merkle_rfc6962.json").read_bytes()
)
LEAVES = [bytes.fromhex(x) for x in DOC["leaves"]]


def _hx(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


def test_vectors_cover_every_prefix_and_tampered_cases() -> None:
    assert [r["size"] for r in DOC["roots"]] == list(range(len(LEAVES) + 1))
    assert len(DOC["inclusion"]) >= 8
    assert len(DOC["tampered"]) >= 100


@pytest.mark.parametrize("index", range(len(LEAVES)))
def test_leaf_hash_vector(index: int) -> None:
    assert merkle.leaf_hash(LEAVES[index]).hex() == DOC["leaf_hashes"][index]


@pytest.mark.parametrize("vector", DOC["roots"], ids=lambda v: f"size{v['size']}")
def test_root_of_each_prefix(vector: dict[str, Any]) -> None:
    size = vector["size"]
    assert merkle.root(LEAVES[:size]).hex() == vector["root"]
    assert merkle.root_of_hashes([merkle.leaf_hash(x) for x in LEAVES[:size]]).hex() \
        == vector["root"]


@pytest.mark.parametrize("vector", DOC["subtrees"],
                         ids=lambda v: f"level{v['level']}-{v['index']}")
def test_complete_subtree_hashes(vector: dict[str, Any]) -> None:
    width = 1 << vector["level"]
    start = vector["index"] * width
    assert merkle.root(LEAVES[start:start + width]).hex() == vector["hash"]


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert merkle.root([]) == hashlib.sha256(b"").digest()


def test_domain_separation() -> None:
    a, b = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    # A leaf whose data looks like an interior node must not collide with that node.
    assert merkle.leaf_hash(a + b) != merkle.node_hash(a, b)
    assert merkle.node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()


@pytest.mark.parametrize("vector", DOC["inclusion"],
                         ids=lambda v: f"index{v['index']}-size{v['size']}")
def test_inclusion_proof_vector(vector: dict[str, Any]) -> None:
    size, index = vector["size"], vector["index"]
    hashes = [merkle.leaf_hash(x) for x in LEAVES[:size]]
    assert [p.hex() for p in merkle.inclusion_proof(hashes, index)] == vector["proof"]
    assert merkle.verify_inclusion(bytes.fromhex(vector["leaf"]), index, size,
                                   _hx(vector["proof"]), bytes.fromhex(vector["root"]))


@pytest.mark.parametrize("vector", DOC["tampered"], ids=lambda v: v["name"])
def test_tampered_inclusion_fails(vector: dict[str, Any]) -> None:
    assert not merkle.verify_inclusion(bytes.fromhex(vector["leaf"]), vector["index"],
                                       vector["size"], _hx(vector["proof"]),
                                       bytes.fromhex(vector["root"]))


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (1, 1), (2, 1), (-1, 4)])
def test_out_of_range_index_never_verifies(index: int, size: int) -> None:
    assert not merkle.verify_inclusion(b"", index, size, [], merkle.root([b""]))


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_inclusion_proof_rejects_out_of_range(index: int) -> None:
    with pytest.raises(IndexError):
        merkle.inclusion_proof([merkle.leaf_hash(b"x")] * 3, index)


def _reference_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 6962 section 2.1 (recursive split at the largest power of two)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return merkle.leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(_reference_root(leaves[:k]), _reference_root(leaves[k:]))


@settings(max_examples=60, deadline=None)
@given(hs.lists(hs.binary(max_size=8), min_size=1, max_size=70))
def test_every_leaf_of_a_random_tree_proves_against_its_root(leaves: list[bytes]) -> None:
    hashes = [merkle.leaf_hash(x) for x in leaves]
    root = merkle.root_of_hashes(hashes)
    assert root == _reference_root(leaves)
    n = len(leaves)
    for i, leaf in enumerate(leaves):
        proof = merkle.inclusion_proof(hashes, i)
        assert merkle.verify_inclusion(leaf, i, n, proof, root)
        assert not merkle.verify_inclusion(leaf, i + n, n, proof, root)
        if proof:
            flipped = bytes([proof[0][0] ^ 1]) + proof[0][1:]
            assert not merkle.verify_inclusion(leaf, i, n, [flipped, *proof[1:]], root)
            assert not merkle.verify_inclusion(leaf, i, n, proof[:-1], root)
            assert not merkle.verify_inclusion(leaf, i, n, [*proof, root], root)
        if leaves[(i + 1) % n] != leaf:
            assert not merkle.verify_inclusion(leaves[(i + 1) % n], i, n, proof, root)
