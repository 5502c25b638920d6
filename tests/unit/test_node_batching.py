"""node.batching: the calls of one event-loop turn go to the pool as one job per worker,
and each caller gets its own result or exception."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from medledger.errors import InvalidInput, TooManyRequests
from medledger.node.batching import MAX_BATCH, Batched, call_each


def square_or_fail(x: int) -> int:
    if x < 0:
        raise InvalidInput(f"negative: {x}")
    if x == 13:
        raise ValueError("unlucky")
    return x * x


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("cannot cross a process boundary")
        self.lock = __import__("threading").Lock()


def raise_unpicklable(_: int) -> int:
    raise Unpicklable()


def test_call_each_answers_each_call_in_order() -> None:
    out = call_each(square_or_fail, [(2,), (-1,), (13,), (3,)])
    assert [ok for ok, _ in out] == [True, False, False, True]
    assert out[0][1] == 4 and out[3][1] == 9
    assert isinstance(out[1][1], InvalidInput) and "negative: -1" in str(out[1][1])
    unexpected = out[2][1]
    assert isinstance(unexpected, ValueError)
    assert any("square_or_fail" in note for note in unexpected.__notes__)  # its traceback
    pickle.dumps(out)  # the whole answer crosses back from a worker


def test_an_unpicklable_exception_does_not_fail_the_others() -> None:
    out = call_each(raise_unpicklable, [(1,)])
    assert not out[0][0] and isinstance(out[0][1], RuntimeError)
    assert "Unpicklable" in str(out[0][1])
    pickle.dumps(out)


def test_a_throttled_answer_survives_the_trip_back() -> None:
    # TooManyRequests took its retry delay as a required argument: it pickled, but did
    # not unpickle (which would have broken the pool)
    [(ok, value)] = call_each(raise_throttled, [(1,)])
    assert not ok and isinstance(value, TooManyRequests) and value.retry_after_s == 30


def raise_throttled(_: int) -> int:
    raise TooManyRequests("slow down", 30)


class NeedsKeyword(Exception):
    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Frozen(Exception):
    why: str


def raise_needs_keyword(_: int) -> int:
    raise NeedsKeyword("pickles, but does not unpickle", code="x")


def raise_frozen(_: int) -> int:
    raise Frozen("no notes can be added")


def raise_stop(_: int) -> int:
    raise StopIteration


@pytest.mark.parametrize("fn", [raise_needs_keyword, raise_frozen, raise_stop])
def test_an_exception_that_cannot_travel_becomes_a_runtime_error(fn: Any) -> None:
    # one that pickles but cannot be rebuilt would break the pool for every later job
    [(ok, value)] = call_each(fn, [(1,)])
    assert not ok and isinstance(value, RuntimeError)
    pickle.loads(pickle.dumps(value))


def test_a_job_that_cannot_start_fails_its_callers() -> None:
    def refusing(fn: Any, *args: Any) -> Any:
        raise RuntimeError("cannot schedule new futures after shutdown")

    batched = Batched(square_or_fail, refusing, lambda: 1)

    async def main() -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(*(batched(x) for x in (1, 2)),
                                                     return_exceptions=True), 5)

    assert all(isinstance(e, RuntimeError) for e in asyncio.run(main()))


def _inline(jobs: list[int]) -> Any:
    async def run(fn: Any, *args: Any) -> Any:
        jobs.append(len(args[1]))  # calls in this job
        return fn(*args)
    return run


def test_one_turn_is_one_job_per_worker() -> None:
    jobs: list[int] = []
    batched = Batched(square_or_fail, _inline(jobs), lambda: 3)

    async def main() -> list[Any]:
        return await asyncio.gather(*(batched(x) for x in [1, 2, -3, 4, 5, 6, 7]),
                                    return_exceptions=True)

    out = asyncio.run(main())
    assert jobs == [3, 3, 1]
    assert out[:2] == [1, 4] and out[3:] == [16, 25, 36, 49]
    assert isinstance(out[2], InvalidInput)


def test_more_than_a_batch_waits_for_the_next_turn() -> None:
    jobs: list[int] = []
    batched = Batched(square_or_fail, _inline(jobs), lambda: 1)

    async def main() -> list[Any]:
        return await asyncio.gather(*(batched(x) for x in range(20, 25 + MAX_BATCH)))

    assert asyncio.run(main()) == [x * x for x in range(20, 25 + MAX_BATCH)]
    assert jobs == [MAX_BATCH, 5]


def test_a_caller_that_went_away_does_not_stop_the_others() -> None:
    batched = Batched(square_or_fail, _inline([]), lambda: 1)

    async def main() -> list[Any]:
        first = asyncio.ensure_future(batched(2))
        rest = [asyncio.ensure_future(batched(x)) for x in (3, 4)]
        await asyncio.sleep(0)
        first.cancel()
        return await asyncio.gather(*rest)

    assert asyncio.run(main()) == [9, 16]


def test_through_a_real_process_pool() -> None:
    with ProcessPoolExecutor(2) as pool:
        async def run(fn: Any, *args: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

        batched = Batched(square_or_fail, run, lambda: 2)

        async def main() -> list[Any]:
            return await asyncio.gather(*(batched(x) for x in (5, -5, 13, 6)),
                                        return_exceptions=True)

        out = asyncio.run(main())
    assert out[0] == 25 and out[3] == 36
    assert isinstance(out[1], InvalidInput) and "negative: -5" in str(out[1])
    assert isinstance(out[2], ValueError) and "in the worker" in "".join(out[2].__notes__)


def test_a_broken_pool_fails_every_waiting_caller() -> None:
    async def broken(fn: Any, *args: Any) -> Any:
        raise RuntimeError("pool is gone")

    batched = Batched(square_or_fail, broken, lambda: 1)

    async def main() -> list[Any]:
        return await asyncio.gather(*(batched(x) for x in (1, 2)), return_exceptions=True)

    out = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "pool is gone" in str(e) for e in out)


@pytest.mark.parametrize("workers", [0, 1, 8])
def test_any_worker_count(workers: int) -> None:
    batched = Batched(square_or_fail, _inline([]), lambda: workers)

    async def main() -> list[Any]:
        return await asyncio.gather(*(batched(x) for x in (1, 2, 3)))

    assert asyncio.run(main()) == [1, 4, 9]
