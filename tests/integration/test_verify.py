"""``medledger verify`` (a subprocess) on a real node's home, then on tampered copies: every
alteration of stored bytes is found and named by block and tx; a node refuses to serve it."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from helpers import NodeHandle, free_port, load_patient, run_cli, running_node

from medledger.core.tx import make_tx
from medledger.crypto.canonical import canonical, sha256
from medledger.fhir.synthetic import synthetic_observation

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stopped_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_node(tmp_path_factory.mktemp("verify") / "home") as node:
        load_patient(node, 1, n_encounters=2)
        pid = node.patients[0]
        with node.client("nurse-joy") as c:
            c.get(f"/fhir/Observation?patient={pid}")
            obs = synthetic_observation(pid, 5)
            c.request("PUT", f"/fhir/Observation/{obs['id']}", obs)  # a single record.put
        node.stop()  # graceful: remaining audit events are anchored
        assert node.proc is not None and node.proc.returncode in (0, -15), node.log()
        _block_of_consents(node, pid, 24)  # a block with several txs
        yield node.home


def _block_of_consents(node: NodeHandle, pid: str, n: int) -> None:
    """Append one block of ``n`` patient-signed consents to the stopped node's ledger,
    through the same application code the node runs (deterministic, unlike racing
    concurrent HTTP submissions into one block)."""
    from medledger.consensus.solo import SoloProducer
    from medledger.node.ledger_app import LedgerApp
    from medledger.storage.sqlite import SqliteStore

    patient = node.user_identity(pid)
    store = SqliteStore(node.home / "ledger.db")
    try:
        app = LedgerApp(store)
        raws = [make_tx(pid, patient.signer(), app.chain, "consent.put",
                        {"id": f"c{i}", "patient": pid, "decision": "permit",
                         "orgs": ["org-x"]}, os.urandom(16).hex()).raw for i in range(n)]
        producer = SoloProducer(app)
        producer.last_time_ns = app.last_time_ns
        _, results = producer.produce(raws)
        assert all(r.code == 0 for r in results), [r.log for r in results if r.code]
    finally:
        store.close()


@pytest.fixture()
def copy(stopped_home: Path, tmp_path: Path) -> Path:
    target = tmp_path / "home"
    shutil.copytree(stopped_home, target)
    return target


def _db(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(home / "ledger.db", isolation_level=None)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _record_tx(db: sqlite3.Connection) -> tuple[int, int, bytes]:
    """(height, idx, raw) of a single record.put tx."""
    for h, i, raw in db.execute("SELECT height, idx, raw FROM txs WHERE code = 0 "
                                "ORDER BY height, idx"):
        if orjson.loads(raw)["kind"] == "record.put":
            return h, i, bytes(raw)
    raise AssertionError("no record.put tx")


def _multi_tx_block(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT height FROM txs GROUP BY height HAVING count(*) >= 2 "
                     "ORDER BY height LIMIT 1").fetchone()
    assert row, "expected a block with several txs"
    return int(row[0])


def _verify_fails(home: Path, *needles: str) -> str:
    res = run_cli("verify", "--home", str(home))
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    for n in needles:
        assert n in out, f"{n!r} not in {out!r}"
    assert "Traceback" not in out
    return out


def test_verify_passes(stopped_home: Path) -> None:
    res = run_cli("verify", "--home", str(stopped_home))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout and "blocks" in res.stdout and "audit events" in res.stdout
    assert "verifying" in res.stderr and "block" in res.stderr  # the progress bar
    db = _db(stopped_home)
    assert db.execute("SELECT count(*) FROM audit").fetchone()[0] > 0
    assert db.execute("SELECT count(*) FROM audit_local WHERE anchored_height IS NULL"
                      ).fetchone()[0] == 0, "a graceful stop anchors every event"
    assert not list(stopped_home.glob(".verify-scratch-*")), "the replay's scratch file stays"


def test_flipped_tx_byte(copy: Path) -> None:
    db = _db(copy)
    h, i, raw = _record_tx(db)
    db.execute("UPDATE txs SET raw = ? WHERE height = ? AND idx = ?", (_flip(raw, 100), h, i))
    db.close()
    _verify_fails(copy, f"block {h} tx {i}", "hash mismatch")


def test_flipped_header_byte(copy: Path) -> None:
    db = _db(copy)
    h = db.execute("SELECT max(height) FROM blocks").fetchone()[0] // 2
    header = bytes(db.execute("SELECT header FROM blocks WHERE height = ?", (h,)).fetchone()[0])
    pos = header.index(b'"app_hash":"') + 14
    db.execute("UPDATE blocks SET header = ? WHERE height = ?", (_flip(header, pos), h))
    db.close()
    _verify_fails(copy, f"block {h}", "header")


def test_deleted_tx(copy: Path) -> None:
    db = _db(copy)
    h = _multi_tx_block(db)
    db.execute("DELETE FROM txs WHERE height = ? AND idx = 0", (h,))
    db.close()
    _verify_fails(copy, f"block {h}", "tx 0", "missing")


def test_deleted_last_tx(copy: Path) -> None:
    db = _db(copy)
    h = _multi_tx_block(db)
    last = db.execute("SELECT max(idx) FROM txs WHERE height = ?", (h,)).fetchone()[0]
    db.execute("DELETE FROM txs WHERE height = ? AND idx = ?", (h, last))
    db.close()
    _verify_fails(copy, f"block {h}", f"tx {last}")


def test_reordered_txs(copy: Path) -> None:
    db = _db(copy)
    h = _multi_tx_block(db)
    db.execute("UPDATE txs SET idx = -1 WHERE height = ? AND idx = 0", (h,))
    db.execute("UPDATE txs SET idx = 0 WHERE height = ? AND idx = 1", (h,))
    db.execute("UPDATE txs SET idx = 1 WHERE height = ? AND idx = -1", (h,))
    db.close()
    _verify_fails(copy, f"block {h}", "tx 0")


def test_changed_state_value(copy: Path) -> None:
    db = _db(copy)
    key, value = db.execute("SELECT key, value FROM state WHERE key LIKE 'consent/%' LIMIT 1"
                            ).fetchone()
    doc = orjson.loads(value)
    doc["decision"] = "deny" if doc["decision"] == "permit" else "permit"
    db.execute("UPDATE state SET value = ? WHERE key = ?", (canonical(doc), key))
    db.close()
    _verify_fails(copy, key)


def test_added_and_removed_state_keys(copy: Path) -> None:
    # the replayed state (on disk, compared in key order) catches keys that appear or vanish
    db = _db(copy)
    db.execute("INSERT INTO state VALUES ('care/ghost/org-x', X'31')")
    db.close()
    _verify_fails(copy, "'care/ghost/org-x'")
    assert not list(copy.glob(".verify-scratch-*")), "a failed verify leaves no scratch file"
    db = _db(copy)
    db.execute("DELETE FROM state WHERE key = 'care/ghost/org-x'")
    key = db.execute("SELECT key FROM state WHERE key LIKE 'rec/%' LIMIT 1").fetchone()[0]
    db.execute("DELETE FROM state WHERE key = ?", (key,))
    db.close()
    _verify_fails(copy, repr(key))


def _tamper_commitment(raw: bytes) -> bytes:
    """Change what a record.put commits to (its sealed blob's hash), keeping the tx
    well-formed: only hashes and signatures can tell."""
    doc = orjson.loads(raw)
    body = doc["body"]["ops"][-1]["body"] if doc["kind"] == "batch" else doc["body"]
    body["blob"] = sha256(b"another blob").hex()
    return canonical(doc)


def test_changed_blob_commitment(copy: Path) -> None:
    db = _db(copy)
    h, i, raw = _record_tx(db)
    db.execute("UPDATE txs SET raw = ? WHERE height = ? AND idx = ?",
               (_tamper_commitment(raw), h, i))
    db.close()
    _verify_fails(copy, f"block {h} tx {i}", "hash mismatch")


def test_changed_blob_commitment_with_rehash(copy: Path) -> None:
    """An attacker who also fixes the stored hash is caught by the signature."""
    db = _db(copy)
    h, i, raw = _record_tx(db)
    bad = _tamper_commitment(raw)
    db.execute("UPDATE txs SET raw = ?, hash = ? WHERE height = ? AND idx = ?",
               (bad, sha256(bad), h, i))
    db.close()
    _verify_fails(copy, f"block {h} tx {i}", "signature")


def test_flipped_sealed_blob_byte(copy: Path) -> None:
    """Ciphertext lives in the node's blob store (ADR 4): a changed byte there is named."""
    blobs = sqlite3.connect(copy / "blobs.db", isolation_level=None)
    h, data = blobs.execute("SELECT hash, data FROM blobs ORDER BY length(data) DESC LIMIT 1"
                            ).fetchone()
    blobs.execute("UPDATE blobs SET data = ? WHERE hash = ?", (_flip(bytes(data), 40), h))
    blobs.close()
    meta = next(orjson.loads(v) for _, v in _db(copy).execute(
        "SELECT key, value FROM state WHERE key LIKE 'ver/%'") if orjson.loads(v)["blob"]
        == bytes(h).hex())
    _verify_fails(copy, f"{meta['type']}/{meta['id']} v{meta['v']}", "sealed blob bytes")


def test_verify_reports_blobs_not_yet_replicated(copy: Path) -> None:
    blobs = sqlite3.connect(copy / "blobs.db", isolation_level=None)
    blobs.execute("DELETE FROM blobs WHERE rowid IN (SELECT rowid FROM blobs LIMIT 2)")
    blobs.close()
    res = run_cli("verify", "--home", str(copy))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 record versions have not been replicated to this node yet" in res.stdout


def test_node_refuses_to_serve_tampered_home(copy: Path) -> None:
    db = _db(copy)
    h, i, raw = _record_tx(db)
    db.execute("UPDATE txs SET raw = ? WHERE height = ? AND idx = ?", (_flip(raw, 100), h, i))
    db.close()
    data = orjson.loads((copy / "config.json").read_bytes())
    data["port"] = free_port()
    (copy / "config.json").write_bytes(orjson.dumps(data))
    node = NodeHandle(copy, data["port"])
    try:
        node.start()
        health = httpx.get(node.url + "/healthz")
        assert health.status_code == 503 and f"block {h}" in health.json()["reason"]
        token_free = httpx.get(node.url + "/ledger/status").json()
        assert token_free["serving"] is False
    finally:
        node.kill9()


_ = shutil
