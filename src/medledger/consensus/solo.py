"""The embedded block producer: orders submitted txs into blocks in-process.

No extra services: txs are checked (like a mempool), queued, and cut into a
block as soon as the producer is free, up to ``max_block_txs`` per block, so
load is batched into one SQLite transaction per block. Block time is the wall
clock, kept strictly increasing, and handed to the application like CometBFT's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from medledger.consensus.app import LedgerApplication, TxResult
from medledger.crypto.canonical import sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Committed:
    code: int
    log: str
    data: bytes
    height: int
    tx_hash: bytes


class SoloProducer:
    def __init__(self, app: LedgerApplication, *, max_block_txs: int = 2000,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.app = app
        self.max_block_txs = max_block_txs
        self.clock = clock
        self.queue: asyncio.Queue[tuple[bytes, asyncio.Future[Committed]]] = asyncio.Queue()
        self.last_time_ns = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, raw: bytes) -> Committed:
        """Check, queue, and wait until the tx is committed in a block."""
        precheck = getattr(self.app, "precheck", None)  # the full check, if the app has one
        checked: TxResult = precheck(raw) if precheck else self.app.check_tx(raw, False)
        if checked.code != 0:
            return Committed(checked.code, checked.log, b"", 0, sha256(raw))
        fut: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        await self.queue.put((raw, fut))
        return await fut

    def produce(self, txs: list[bytes]) -> tuple[int, list[TxResult]]:
        """Finalize and commit one block of ``txs`` (synchronously)."""
        height = self.app.info().last_block_height + 1
        now = max(self.clock(), self.last_time_ns + 1)
        self.last_time_ns = now
        outcome = self.app.finalize_block(height, now, txs, b"", b"")
        self.app.commit()
        return height, list(outcome.tx_results)

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            while len(batch) < self.max_block_txs and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                height, results = self.produce([raw for raw, _ in batch])
            except Exception as exc:  # storage failure: fail the waiters, keep running
                log.exception("block production failed")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (raw, fut), r in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(Committed(r.code, r.log, r.data, height, sha256(raw)))
            await asyncio.sleep(0)
