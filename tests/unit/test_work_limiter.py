"""api.common.WorkLimiter: costly calls one at a time, a bounded queue (503 beyond it),
and a share of the node's time: the slot rests after each call."""

from __future__ import annotations

import asyncio
import threading
import time

from medledger.api.common import WorkLimiter
from medledger.errors import Unavailable


def test_back_to_back_calls_keep_to_their_share_and_answer_without_resting() -> None:
    limiter = WorkLimiter(1, max_waiting=8, max_share=0.25)  # rest 3x each call's time
    starts: list[float] = []
    ends: list[float] = []
    answered: list[float] = []

    def search() -> str:
        starts.append(time.monotonic())
        time.sleep(0.05)
        ends.append(time.monotonic())
        return threading.current_thread().name

    async def client() -> None:
        assert (await limiter.run(search)).startswith("work")  # on the worker thread
        answered.append(time.monotonic())

    async def scenario() -> None:
        await asyncio.gather(*(client() for _ in range(3)))

    asyncio.run(scenario())
    limiter.close()
    assert starts[1] - ends[0] >= 0.14 and starts[2] - ends[1] >= 0.14
    assert answered[0] < starts[1]  # the first answer did not wait for the rest


def test_a_full_queue_is_a_503() -> None:
    limiter = WorkLimiter(1, max_waiting=1)
    release = threading.Event()

    async def scenario() -> list[object]:
        calls = [asyncio.ensure_future(limiter.run(release.wait, 5)) for _ in range(3)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*calls, return_exceptions=True)

    out = asyncio.run(scenario())
    limiter.close()
    assert out[:2] == [True, True]
    assert isinstance(out[2], Unavailable) and "busy" in str(out[2])


def test_a_lone_client_is_never_slowed() -> None:
    limiter = WorkLimiter(1, max_share=0.01)  # would rest 99x each call's time
    starts: list[float] = []

    def search() -> None:
        starts.append(time.monotonic())
        time.sleep(0.05)

    async def one_after_another() -> None:
        for _ in range(3):
            await limiter.run(search)

    asyncio.run(one_after_another())
    limiter.close()
    assert starts[2] - starts[0] < 3.0  # resting would take at least 9.9 s
