"""node.audit.Auditor in deferred mode (the HTTP API's): events recorded by a request are
committed by the audit writer thread before ``flush`` returns, in one transaction for
everything buffered meanwhile; a failed commit loses nothing and answers nobody. And the
store's WAL checkpoints, which run on a thread of their own in a serving node."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from medledger.node.audit import Auditor, iso_now
from medledger.storage.sqlite import SqliteStore


def _auditor(tmp_path: Path) -> tuple[Auditor, SqliteStore]:
    store = SqliteStore(tmp_path / "ledger.db")
    auditor = Auditor(store, "org-a", org_secret=b"s" * 32)
    auditor.deferred = True
    return auditor, store


def _event(auditor: Auditor, n: int) -> dict[str, Any]:
    return auditor.event("read", agent=f"dr-{n}", agent_org="org-a", agent_role="physician",
                         patient=f"p-{n % 3}", entity=[f"Observation/o{n}"],
                         reason="break-glass note" if n % 2 else "")


def _committed(path: Path) -> set[str]:
    """The event ids another connection sees (what a crash would leave)."""
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT event_id FROM audit_local")}


def test_each_request_finds_its_events_durable_when_flush_returns(tmp_path: Path) -> None:
    auditor, store = _auditor(tmp_path)
    commits: list[int] = []
    real = store.append_local_audit

    def counted(rows: list[tuple[str, str | None, bytes]]) -> None:
        commits.append(len(rows))
        real(rows)

    store.append_local_audit = counted  # type: ignore[method-assign]

    async def request(n: int) -> None:
        ev = _event(auditor, n)
        await asyncio.to_thread(auditor.record, ev)  # as searches do, from a worker thread
        await auditor.flush()
        assert ev["id"] in _committed(tmp_path / "ledger.db")

    async def main() -> None:
        await asyncio.gather(*(request(n) for n in range(60)))

    asyncio.run(main())
    auditor.close()
    assert sum(commits) == 60 and len(_committed(tmp_path / "ledger.db")) == 60
    assert len(commits) < 60  # requests of one moment share a commit


def test_a_failed_commit_refuses_its_waiters_and_the_next_one_retries(
        tmp_path: Path) -> None:
    auditor, store = _auditor(tmp_path)
    real = store.append_local_audit
    failures = [OSError("disk full")]

    def flaky(rows: list[tuple[str, str | None, bytes]]) -> None:
        if failures:
            raise failures.pop()
        real(rows)

    store.append_local_audit = flaky  # type: ignore[method-assign]
    first, second = _event(auditor, 1), _event(auditor, 2)

    async def main() -> None:
        auditor.record(first)
        with pytest.raises(OSError, match="disk full"):
            await auditor.flush()
        assert _committed(tmp_path / "ledger.db") == set()
        auditor.record(second)
        await auditor.flush()  # commits the first event again, with the second

    asyncio.run(main())
    auditor.close()
    assert _committed(tmp_path / "ledger.db") == {first["id"], second["id"]}


def test_flush_with_nothing_recorded_returns_at_once(tmp_path: Path) -> None:
    auditor, _ = _auditor(tmp_path)
    asyncio.run(auditor.flush())
    assert auditor._writer is None  # no thread started for nothing


def test_wal_checkpoints_run_on_their_own_thread(tmp_path: Path) -> None:
    """With the node's background checkpointer, no commit on the serving connection runs
    a checkpoint (and its fsyncs); the checkpointer moves the WAL into the database."""
    import os
    import time

    store = SqliteStore(tmp_path / "ledger.db")
    store.checkpoint_in_background(interval_s=0.05)
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    before = os.path.getsize(tmp_path / "ledger.db")
    events = [(f"e{i}", "p-1", os.urandom(4000)) for i in range(2000)]  # ~8 MB of WAL
    for i in range(0, len(events), 100):
        store.append_local_audit(events[i:i + 100])
    deadline = time.monotonic() + 20
    while os.path.getsize(tmp_path / "ledger.db") < before + 7_000_000:
        assert time.monotonic() < deadline, "the checkpointer did not move the WAL"
        time.sleep(0.05)
    store.close()
    assert len(_committed(tmp_path / "ledger.db")) == 2000


@given(hs.floats(min_value=0, max_value=4e9, allow_nan=False) | hs.sampled_from(
    [1_700_000_000.9999995, 1_700_000_000.0000005, 1_700_000_000.9999994, 86399.9999996]))
def test_iso_now_formats_as_datetime_does(t: float) -> None:
    """The per-second shortcut gives datetime's own string, rounding included."""
    assert iso_now(lambda: t) == datetime.fromtimestamp(t, UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")
