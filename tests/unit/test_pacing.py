"""node.pacing.PacedSlots: when callers queue, the slot rests after each use (a share of
the node's time); a lone caller is never slowed; no answer waits for the rest."""

from __future__ import annotations

import asyncio
import time

from medledger.node.pacing import PacedSlots


def _run(slots: PacedSlots, callers: int, parallel: bool) -> tuple[list[float], ...]:
    starts: list[float] = []
    ends: list[float] = []
    answered: list[float] = []

    async def caller() -> None:
        async with slots.hold():
            starts.append(time.monotonic())
            await asyncio.sleep(0.05)  # a use of 50 ms
            ends.append(time.monotonic())
        answered.append(time.monotonic())

    async def scenario() -> None:
        if parallel:
            await asyncio.gather(*(caller() for _ in range(callers)))
        else:
            for _ in range(callers):
                await caller()

    asyncio.run(scenario())
    return starts, ends, answered


def test_queued_callers_keep_to_their_share_and_answer_without_resting() -> None:
    starts, ends, answered = _run(PacedSlots(1, max_share=0.25), 3, parallel=True)
    # at a share of 0.25 the slot rests 3x each use's time before the next caller
    assert starts[1] - ends[0] >= 0.14 and starts[2] - ends[1] >= 0.14
    assert answered[0] < starts[1]  # the first answer did not wait for the rest


def test_a_lone_caller_is_never_slowed() -> None:
    starts, _, _ = _run(PacedSlots(1, max_share=0.01), 3, parallel=False)
    assert starts[2] - starts[0] < 3.0  # resting 99x would take at least 9.9 s


def test_share_bounds() -> None:
    assert PacedSlots(1, 1.0).rest_factor == 0.0
    assert PacedSlots(1, 0.5).rest_factor == 1.0
    assert PacedSlots(1, 0.0).rest_factor == 99.0  # at most 1% share, never a division by 0
