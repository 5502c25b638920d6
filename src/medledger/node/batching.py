"""Calls of a pure function made in one turn of the event loop, run as one pool job.

A write's FHIR validation runs on the node's worker pool so the event loop keeps
serving. A pool job's round trip (pickling, the pool's feeder and result threads,
waking the loop) costs the node's process about as much as the work it sends away, and
concurrent clients' writes arrive together: so the calls made in one turn of the loop go
as one job per worker (``Batched``), and each caller gets its own result or exception
(``call_each``: a failing call does not fail the others).
"""

from __future__ import annotations

import asyncio
import functools
import pickle
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from medledger.errors import MedledgerError

__all__ = ["Batched", "call_each"]

MAX_BATCH = 64  # calls per turn; the rest wait for the next turn


def call_each(fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[tuple[bool, Any]]:
    """``fn(*args)`` for each ``args``: ``(True, result)`` or ``(False, exception)``. Runs
    in a pool worker, so every exception sent back must survive a pickle round trip (one
    that does not would break the pool for every later job): an unexpected one carries
    the worker's traceback (as a note), and one that cannot travel, or cannot be set on a
    future, is replaced by a ``RuntimeError`` naming it."""
    out: list[tuple[bool, Any]] = []
    for args in calls:
        try:
            out.append((True, fn(*args)))
        except Exception as exc:
            out.append((False, _portable(exc)))
    return out


def _portable(exc: Exception) -> Exception:
    unreportable = RuntimeError(f"{type(exc).__name__} (unreportable): "
                                f"{traceback.format_exception_only(exc)[-1].strip()[:500]}")
    if isinstance(exc, StopIteration | StopAsyncIteration):  # a future refuses these
        return unreportable
    try:
        if not isinstance(exc, MedledgerError):  # a bug: say where it happened
            exc.add_note("in the worker:\n" + traceback.format_exc())
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return unreportable
    return exc


class Batched:
    """``await batched(*args)`` is ``fn(*args)`` run by ``run(call_each, fn, calls)`` (the
    node's pool) together with the other calls made in the same turn of the loop, split
    over ``workers()`` jobs. ``run`` may also call inline (no pool)."""

    def __init__(self, fn: Callable[..., Any],
                 run: Callable[..., Awaitable[list[tuple[bool, Any]]]],
                 workers: Callable[[], int]) -> None:
        self.fn = fn
        self.run = run
        self.workers = workers
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []

    async def __call__(self, *args: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((args, fut))
        if len(self._waiting) == 1:
            asyncio.get_running_loop().call_soon(self._send)
        return await fut

    def _send(self) -> None:
        batch = self._waiting[:MAX_BATCH]
        del self._waiting[:MAX_BATCH]
        if self._waiting:
            asyncio.get_running_loop().call_soon(self._send)
        per_job = -(-len(batch) // max(1, self.workers()))  # every worker gets some
        for i in range(0, len(batch), per_job):
            part = batch[i:i + per_job]
            try:
                job = asyncio.ensure_future(self.run(call_each, self.fn,
                                                     [a for a, _ in part]))
            except Exception as exc:  # e.g. a stopped pool refusing at once
                _fail(part, exc)
                continue
            job.add_done_callback(functools.partial(_answer, part))


def _answer(part: list[tuple[tuple[Any, ...], asyncio.Future[Any]]],
            job: asyncio.Future[list[tuple[bool, Any]]]) -> None:
    """Each caller of a finished job gets its own result or exception."""
    if job.cancelled():  # the pool is stopping
        _fail(part, asyncio.CancelledError())
        return
    failure = job.exception()
    if failure is not None:  # the pool broke
        _fail(part, failure)
        return
    results = job.result()
    if len(results) != len(part):
        _fail(part, RuntimeError(f"{len(results)} answers to {len(part)} calls"))
        return
    for (_, fut), (ok, value) in zip(part, results, strict=True):
        if fut.done():  # its request went away
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)  # ``call_each`` made it one a future takes


def _fail(part: list[tuple[tuple[Any, ...], asyncio.Future[Any]]],
          exc: BaseException) -> None:
    for _, fut in part:
        if not fut.done():
            fut.set_exception(exc)
