"""Login throttling with back-off (``node.auth.LoginGuard``) on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from medledger.errors import TooManyRequests
from medledger.node.auth import LoginGuard


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _fail(guard: LoginGuard, who: str = "nurse", client: str = "10.0.0.1") -> None:
    guard.admit(who, client)  # charged as a failure until ``succeeded``


def test_free_failures_then_doubling_back_off() -> None:
    clock = Clock()
    guard = LoginGuard(clock, free_per_id=3, free_per_client=100)
    for _ in range(3):
        _fail(guard)
    _fail(guard)  # the 4th is admitted but locks the id for 1 s
    waits = []
    for _ in range(4):
        with pytest.raises(TooManyRequests) as err:
            guard.admit("nurse", "10.0.0.1")
        waits.append(err.value.retry_after_s)
        clock.now += err.value.retry_after_s
        _fail(guard)  # admitted after the wait, fails again: the lock-out doubles
    assert waits == [1, 2, 4, 8]


def test_back_off_is_capped_and_forgotten_after_the_window() -> None:
    clock = Clock()
    guard = LoginGuard(clock, free_per_id=0, free_per_client=100, max_backoff_s=5,
                       window_s=60)
    for _ in range(10):
        clock.now += 10
        _fail(guard)
    with pytest.raises(TooManyRequests) as err:
        guard.admit("nurse", "10.0.0.1")
    assert err.value.retry_after_s == 5
    clock.now += 61
    _fail(guard)  # a fresh start: free_per_id=0, so this one locks for 1 s only
    with pytest.raises(TooManyRequests) as err:
        guard.admit("nurse", "10.0.0.1")
    assert err.value.retry_after_s == 1


def test_throttled_attempt_is_refused_even_with_the_right_password() -> None:
    """The check happens before any hashing: a lock-out is not a password oracle."""
    clock = Clock()
    guard = LoginGuard(clock, free_per_id=1, free_per_client=100)
    _fail(guard)
    _fail(guard)
    with pytest.raises(TooManyRequests):
        guard.admit("nurse", "10.0.0.1")


def test_success_refunds_the_id_but_not_the_address() -> None:
    clock = Clock()
    guard = LoginGuard(clock, free_per_id=2, free_per_client=4)
    for victim in ("a", "b", "c", "d"):
        _fail(guard, victim)
    guard.admit("mine", "10.0.0.1")
    guard.succeeded("mine", "10.0.0.1")  # a good login does not launder the guesses
    _fail(guard, "e")  # the 5th failure from this address locks it
    with pytest.raises(TooManyRequests):
        guard.admit("f", "10.0.0.1")
    guard.admit("f", "10.0.0.2")  # another client is not affected


def test_per_id_lock_applies_from_every_address() -> None:
    clock = Clock()
    guard = LoginGuard(clock, free_per_id=2, free_per_client=100)
    for i in range(3):
        _fail(guard, "nurse", f"10.0.0.{i}")
    with pytest.raises(TooManyRequests):
        guard.admit("nurse", "10.9.9.9")


def test_hashing_runs_off_the_loop_and_is_bounded() -> None:
    guard = LoginGuard(Clock(), workers=1, max_waiting=2)

    async def scenario() -> list[object]:
        import threading
        release = threading.Event()

        def slow() -> str:
            release.wait(5)
            return threading.current_thread().name

        tasks = [asyncio.ensure_future(guard.hash_off_loop(slow)) for _ in range(3)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = asyncio.run(scenario())
    guard.close()
    assert [str(o).startswith("login") for o in out[:2]] == [True, True]
    assert "too many logins" in str(out[2])


def test_hashing_keeps_to_half_a_core_when_logins_queue() -> None:
    # the pacing itself is tested in test_pacing.py; here: the guard's share reaches it
    assert LoginGuard(Clock())._slots.rest_factor == 1.0
    assert LoginGuard(Clock(), max_cpu_share=0.25)._slots.rest_factor == 3.0
