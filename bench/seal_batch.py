"""``python -m bench.seal_batch [FILE] [--whole]``: sealing cost per record, key wrapping
per record (a sealed box per record and reader) against batch wrapping (one ephemeral
X25519 key per batch and reader, ``crypto.envelope.BatchWrapper``), in one process.

The resources are a real Synthea patient's (default: the largest of the generated
population, see scripts/synthea_generate.py), sealed in chunks of 256 to two readers
(the organisation and the patient) as ``node.bundles.seal_many`` does on the worker
pool. Both ways are timed alternately, several rounds, and the median CPU time per
record is reported, so a loaded machine moves both alike: the ratio is the figure to
trust. Reported: the whole ``seal_record`` (compression, AES-256-GCM, wrapping, the
blob), the key wrapping alone, and unwrapping as a reader does (one key per record).
``--whole`` also seals every resource of the file both ways (CPU seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from nacl.public import PrivateKey

from bench.bundle_plan import _default_file
from medledger.crypto import envelope
from medledger.crypto.canonical import b64d, loads
from medledger.node.bundles import SEAL_CHUNK, seal_many
from medledger.node.records import seal_record

CHAIN = "bench-chain"
Item = tuple[dict[str, Any], str | None, int, dict[str, bytes]]


def _items(path: Path, readers: dict[str, bytes]) -> list[Item]:
    bundle = orjson.loads(path.read_bytes())
    return [(e["resource"], "p1", 1, readers) for e in bundle["entry"]]


def _per_record_boxes(items: list[Item]) -> list[tuple[dict[str, Any], bytes]]:
    """``seal_many`` as it was: a sealed box per record and reader."""
    return [seal_record(CHAIN, r, p, v, readers) for r, p, v, readers in items]


def _cpu_us_per_record(fn: Callable[[], Any], n: int) -> float:
    started = time.process_time()
    fn()
    return (time.process_time() - started) / n * 1e6


def _wrap_boxes(keys: list[bytes], publics: list[bytes]) -> None:
    for key in keys:
        for pub in publics:
            envelope.wrap_key(key, pub)


def _wrap_batch(keys: list[bytes], publics: list[bytes]) -> None:
    with envelope.BatchWrapper() as wrapper:
        for key in keys:
            for pub in publics:
                wrapper.wrap(key, pub)


def _unwrap(wrapped: list[bytes], private: bytes) -> None:
    envelope._batch_box.cache_clear()  # a reader meets each batch's key once
    for w in wrapped:
        envelope.unwrap_key(w, private)


def _rounds(chunk: list[Item], privates: dict[str, bytes], rounds: int
            ) -> dict[str, tuple[float, float]]:
    n = len(chunk)
    readers = chunk[0][3]
    publics = [readers[rid] for rid in sorted(readers)]
    reader = min(readers)  # the one that unwraps
    keys = [os.urandom(envelope.KEY_SIZE) for _ in range(n)]
    boxes = [envelope.wrap_key(k, readers[reader]) for k in keys]
    with envelope.BatchWrapper() as wrapper:
        batch = [wrapper.wrap(k, readers[reader]) for k in keys]
    private = privates[reader]
    tasks: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "seal_record (whole)": (lambda: _per_record_boxes(chunk),
                                lambda: seal_many(CHAIN, chunk)),
        "key wrapping, 2 readers": (lambda: _wrap_boxes(keys, publics),
                                    lambda: _wrap_batch(keys, publics)),
        "unwrap, 1 reader": (lambda: _unwrap(boxes, private), lambda: _unwrap(batch, private)),
    }
    samples: dict[str, tuple[list[float], list[float]]] = {t: ([], []) for t in tasks}
    for _ in range(rounds):
        for name, (before, after) in tasks.items():
            samples[name][0].append(_cpu_us_per_record(before, n))
            samples[name][1].append(_cpu_us_per_record(after, n))
    return {name: (statistics.median(b), statistics.median(a))
            for name, (b, a) in samples.items()}


def _check(sealed: list[tuple[dict[str, Any], bytes]], size: int) -> None:
    for _, blob in sealed[:3]:
        assert {len(b64d(k)) for k in loads(blob)["keys"].values()} == {size}


def _whole(items: list[Item]) -> tuple[float, float]:
    chunks = [items[i:i + SEAL_CHUNK] for i in range(0, len(items), SEAL_CHUNK)]
    started = time.process_time()
    for chunk in chunks:
        _per_record_boxes(chunk)
    before = time.process_time() - started
    started = time.process_time()
    for chunk in chunks:
        seal_many(CHAIN, chunk)
    return before, time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", type=Path)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--whole", action="store_true", help="seal every resource too")
    args = parser.parse_args()
    path = args.file or _default_file()
    keys = {rid: PrivateKey.generate() for rid in ("org-a", "p1")}
    privates = {rid: bytes(k) for rid, k in keys.items()}
    items = _items(path, {rid: bytes(k.public_key) for rid, k in keys.items()})
    chunk = items[len(items) // 2:len(items) // 2 + SEAL_CHUNK]  # mid-history: typical mix
    _check(_per_record_boxes(chunk), envelope.SEALED_KEY_SIZE)
    _check(seal_many(CHAIN, chunk), envelope.BATCH_KEY_SIZE)
    load = os.getloadavg()[0]
    print(f"{path.name}: {len(items)} resources; a chunk of {len(chunk)} "
          f"({sum(len(orjson.dumps(r)) for r, *_ in chunk) / len(chunk):.0f} B of JSON on "
          f"average), 2 readers, median of {args.rounds} rounds, CPU µs per record "
          f"(load average {load:.1f})")
    print(f"{'':28} {'sealed boxes':>13} {'batch wrap':>11} {'ratio':>6}")
    for name, (before, after) in _rounds(chunk, privates, args.rounds).items():
        print(f"{name:28} {before:13.1f} {after:11.1f} {before / after:6.2f}")
    if args.whole:
        before, after = _whole(items)
        print(f"whole file, {len(items)} resources in chunks of {SEAL_CHUNK}: "
              f"{before:.2f} s CPU with sealed boxes, {after:.2f} s batch-wrapped "
              f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
