"""api.common.WorkLimiter: costly calls one at a time on a worker thread, a bounded queue
(503 beyond it), paced slots (their timing: test_pacing.py)."""

from __future__ import annotations

import asyncio
import threading

from medledger.api.common import WorkLimiter
from medledger.errors import Unavailable


def test_calls_run_on_the_worker_thread_in_paced_slots() -> None:
    limiter = WorkLimiter(1, max_share=0.33)
    name = asyncio.run(limiter.run(lambda: threading.current_thread().name))
    limiter.close()
    assert name.startswith("work")  # off the event loop
    assert round(limiter._slots.rest_factor, 2) == 2.03  # a third of the node's time


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
