"""An incremental multiset hash of the ledger state (AdHash over SHAKE-256).

The state digest commits to every ``(key, value)`` entry of the state without an
order, so it can be updated per block from the block's writes alone — remove the
old entry's element, add the new one's — and recomputed at start-up from a plain
scan of the state table, in any order, in parallel chunks.

Construction (Bellare-Micciancio AdHash): each entry maps to a 4096-bit element
``SHAKE-256(canonical(key) ‖ value)``; the accumulator is the sum of the elements
mod 2^4096. Finding two different sets with the same sum is a generalised-birthday
problem whose best known attack (Wagner) costs about 2^(2*sqrt(4096)) = 2^128 work.
The header carries ``SHA-256`` of the 512-byte accumulator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from medledger.crypto.canonical import canonical

ELEMENT_BYTES = 512
_MODULUS = 1 << (8 * ELEMENT_BYTES)
EMPTY = bytes(ELEMENT_BYTES)


def element(key: str, value: bytes) -> int:
    """The 4096-bit element of one state entry."""
    # the key's JSON string is self-delimiting, so key and value cannot be re-split
    data = canonical(key) + value
    return int.from_bytes(hashlib.shake_256(data).digest(ELEMENT_BYTES), "little")


def to_int(acc: bytes) -> int:
    return int.from_bytes(acc or EMPTY, "little")


def to_bytes(acc: int) -> bytes:
    return (acc % _MODULUS).to_bytes(ELEMENT_BYTES, "little")


def delta(removed: Iterable[tuple[str, bytes]], added: Iterable[tuple[str, bytes]]) -> int:
    """The elements of ``added`` minus those of ``removed`` (not reduced: deltas of
    disjoint parts of one change add up to the delta of the whole)."""
    total = 0
    for key, value in added:
        total += element(key, value)
    for key, value in removed:
        total -= element(key, value)
    return total


def update(acc: bytes, removed: Iterable[tuple[str, bytes]],
           added: Iterable[tuple[str, bytes]]) -> bytes:
    """``acc`` minus the elements of ``removed`` plus those of ``added``."""
    return to_bytes(to_int(acc) + delta(removed, added))


def of_items(items: Iterable[tuple[str, bytes]]) -> bytes:
    """The accumulator of a whole state (recomputation at start-up or in verify)."""
    total = 0
    for key, value in items:
        total += element(key, value)
    return to_bytes(total)


def combine(parts: Iterable[bytes]) -> bytes:
    """The accumulator of the union of disjoint parts (parallel recomputation)."""
    return to_bytes(sum(to_int(p) for p in parts))


def digest(acc: bytes) -> str:
    """What block headers carry: hex SHA-256 of the accumulator."""
    return hashlib.sha256(acc or EMPTY).hexdigest()
