"""RFC 6962 Merkle trees: domain-separated hashing, roots and inclusion proofs.

leaf hash = SHA-256(0x00 || data); node hash = SHA-256(0x01 || left || right);
the root of the empty tree is SHA-256(""). Proof verification follows RFC 9162 §2.1.3.2
and needs nothing but this module, so proofs can be checked offline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly less than ``n`` (n >= 2)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def root_of_hashes(hashes: Sequence[bytes]) -> bytes:
    """Merkle tree hash over already leaf-hashed entries."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    level = list(hashes)
    # Bottom-up construction gives the RFC 6962 shape: pair left to right,
    # carry an odd last node up unchanged.
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def root(leaves: Sequence[bytes]) -> bytes:
    return root_of_hashes([leaf_hash(d) for d in leaves])


def inclusion_proof(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path for leaf ``index`` over leaf hashes ``hashes`` (RFC 6962 PATH)."""
    if not 0 <= index < len(hashes):
        raise IndexError(f"leaf index {index} out of range for tree of size {len(hashes)}")
    return _path(list(hashes), index)


def _path(hashes: list[bytes], m: int) -> list[bytes]:
    n = len(hashes)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return _path(hashes[:k], m) + [root_of_hashes(hashes[k:])]
    return _path(hashes[k:], m - k) + [root_of_hashes(hashes[:k])]


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], expected_root: bytes
) -> bool:
    """True if ``leaf`` (raw data) sits at ``index`` in a tree of ``tree_size``
    whose root is ``expected_root``."""
    if not 0 <= index < tree_size:
        return False
    fn, sn = index, tree_size - 1
    r = leaf_hash(leaf)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root
