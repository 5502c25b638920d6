"""node.runtime: the worker pool's map for a large block's digests, and its fallback."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from medledger.core import machine
from medledger.crypto.canonical import canonical
from medledger.node.runtime import _digest_map


def _slices() -> tuple[list[list[tuple[str, bytes | None]]], list[list[tuple[str, bytes]]]]:
    items = [(f"rec/Observation/o{i:04d}", None if i % 5 == 0 else canonical({"i": i}))
             for i in range(300)]
    slices = [items[:100], items[100:200], items[200:]]
    removed = [[(k, canonical({"old": k})) for k, _ in part[:3]] for part in slices]
    return slices, removed


def test_the_pool_hashes_the_slices_as_the_loop_would() -> None:
    slices, removed = _slices()
    expected = [machine.digest_part(s, r) for s, r in zip(slices, removed, strict=True)]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        assert _digest_map(pool, lambda: True)(machine.digest_part, slices, removed) == expected


def test_a_pool_that_is_gone_leaves_the_work_to_the_loop() -> None:
    slices, removed = _slices()
    expected = [machine.digest_part(s, r) for s, r in zip(slices, removed, strict=True)]
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    pool.shutdown()
    assert _digest_map(pool, lambda: True)(machine.digest_part, slices, removed) == expected


def test_a_busy_pool_is_not_waited_for() -> None:
    """With other work queued on the pool the loop hashes the slices itself: a pool
    that would fail them shows it never got them."""
    slices, removed = _slices()
    expected = [machine.digest_part(s, r) for s, r in zip(slices, removed, strict=True)]

    class Refusing(ProcessPoolExecutor):
        def map(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the pool was used while busy")

    pool = Refusing(1, mp_context=get_context("spawn"))
    try:
        assert _digest_map(pool, lambda: False)(machine.digest_part, slices, removed) == \
            expected
    finally:
        pool.shutdown()
