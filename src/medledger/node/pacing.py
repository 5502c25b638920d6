"""Paced slots: at most ``n`` holders of a costly resource at once (search work, password
hashing), and a share of the node's time for it when callers queue.

After each use the slot rests for as long as the use took, times ``1 / max_share - 1``,
before the next waiting caller gets it: a flood of such calls keeps at most that share
of the node's time, and the node's other clients (whose reads take no slot) keep the
rest. The slot rests only when someone else waits for it, so a lone caller is never
slowed, and no caller's answer waits for the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["PacedSlots"]


class PacedSlots:
    def __init__(self, slots: int, max_share: float = 1.0) -> None:
        self._sem = asyncio.Semaphore(slots)
        self.rest_factor = max(0.0, 1 / max(0.01, min(1.0, max_share)) - 1)
        self._inside = 0  # callers holding or waiting for a slot

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        self._inside += 1
        loop = asyncio.get_running_loop()
        try:
            await self._sem.acquire()
            started = time.monotonic()
            try:
                yield
            finally:
                rest = (time.monotonic() - started) * self.rest_factor
                loop.call_later(rest if self._inside > 1 else 0.0, self._sem.release)
        finally:
            self._inside -= 1
