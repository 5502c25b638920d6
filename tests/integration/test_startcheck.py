"""Issue 9 item 1: a node whose store was tampered with refuses to serve, every data route.

A real node writes a ledger (a patient with PSY records, reads, consents) and stops
gracefully; a few not-yet-anchored local audit events are added through the node's own
code (as after a crash). Each test tampers a copy of that home the way an attacker with
write access to the database would, starts ``medledger node start`` on it and expects a
503 from ``/healthz`` naming the problem. The untampered copy must start and serve.
"""

from __future__ import annotations

import importlib.util
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from helpers import PASSWORD, NodeHandle, free_port, load_patient, running_node

from medledger.crypto.canonical import canonical

pytestmark = pytest.mark.timeout(240)
SEED = 1  # depression: a PSY Condition


@pytest.fixture(scope="module")
def stopped_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_node(tmp_path_factory.mktemp("startcheck") / "home") as node:
        load_patient(node, SEED, n_encounters=2)
        pid = node.patients[0]
        with node.client("nurse-joy") as c:
            c.get(f"/fhir/Observation?patient={pid}")
        with node.login(pid) as h:  # a consent: patient-signed, in state
            resp = h.post("/api/consents", json={"decision": "deny", "orgs": ["org-x"],
                                                 "categories": ["mental-health"]})
            assert resp.status_code == 201, resp.text
        node.stop()
        assert node.proc is not None and node.proc.returncode in (0, -15), node.log()
        _add_unanchored_events(node.home, pid, 3)
        yield node.home


def _add_unanchored_events(home: Path, pid: str, n: int) -> None:
    """Audit events recorded but not anchored (a crash before anchoring), through the
    node's own auditor and store (so the rows are chained and sealed as in production)."""
    from medledger.node.runtime import open_node
    node = open_node(str(home), PASSWORD)
    try:
        for i in range(n):
            node.auditor.record(node.auditor.event(
                "read", agent="nurse-joy", agent_org=node.org.id, agent_role="nurse",
                patient=pid, entity=[f"Observation/x{i}"]))
    finally:
        node.store.close()


@pytest.fixture()
def copy(stopped_home: Path, tmp_path: Path) -> Path:
    target = tmp_path / "home"
    shutil.copytree(stopped_home, target)
    return target


def _db(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(home / "ledger.db", isolation_level=None)


def _start(home: Path) -> NodeHandle:
    data = orjson.loads((home / "config.json").read_bytes())
    data["port"] = free_port()
    (home / "config.json").write_bytes(orjson.dumps(data))
    node = NodeHandle(home, data["port"])
    node.start(timeout=60)
    return node


def _refuses(home: Path, *needles: str) -> str:
    node = _start(home)
    try:
        health = httpx.get(node.url + "/healthz")
        reason = str(health.json().get("reason", ""))
        assert health.status_code == 503, health.text
        for n in needles:
            assert n in reason, f"{n!r} not in {reason!r}"
        login = httpx.post(node.url + "/auth/login", json={"id": "nurse-joy",
                                                           "password": PASSWORD})
        assert login.status_code == 503, login.text
        return reason
    finally:
        node.kill9()


def _state(db: sqlite3.Connection, key: str) -> dict[str, Any]:
    row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    assert row, key
    return dict(orjson.loads(row[0]))


def _set_state(db: sqlite3.Connection, key: str, doc: dict[str, Any]) -> None:
    db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, canonical(doc)))


def test_untampered_home_serves(copy: Path) -> None:
    node = _start(copy)
    try:
        assert httpx.get(node.url + "/healthz").status_code == 200, node.log()
        assert "start check" in node.log() and "blocks" in node.log()
        with node.client(NodeHandle(copy, 0).user_identity("nurse-joy")) as c:
            assert c.get("/auth/me")["actor"] == "nurse-joy"
    finally:
        node.kill9()
    node = _start(copy)  # the checkpoint it advanced and the head it sealed still verify
    try:
        assert httpx.get(node.url + "/healthz").status_code == 200, node.log()
    finally:
        node.kill9()


# ------------------------------------------------------------ state (needs the state digest)

STATE_DIGEST = pytest.mark.xfail(
    importlib.util.find_spec("medledger.crypto.multiset") is None, strict=True,
    reason="needs the state digest in block headers (core change not merged yet)")


@STATE_DIGEST
def test_psy_labels_removed_in_state(copy: Path) -> None:
    db = _db(copy)
    key = next(k for k, v in db.execute("SELECT key, value FROM state WHERE key LIKE "
                                        "'rec/Condition/%'") if b"PSY" in v)
    doc = _state(db, key)
    doc["labels"] = []
    _set_state(db, key, doc)
    db.close()
    _refuses(copy, "state")


@STATE_DIGEST
def test_nurse_promoted_in_state(copy: Path) -> None:
    db = _db(copy)
    key = next(k for (k,) in db.execute("SELECT key FROM state") if k.endswith("/nurse-joy"))
    doc = _state(db, key)
    doc["role"] = "psychiatrist"
    _set_state(db, key, doc)
    db.close()
    _refuses(copy, "state")


@STATE_DIGEST
def test_forged_consent_in_state(copy: Path) -> None:
    db = _db(copy)
    key, value = db.execute("SELECT key, value FROM state WHERE key LIKE 'consent/%'"
                            ).fetchone()
    doc = dict(orjson.loads(value))
    doc.update(id="forged", decision="permit", orgs=["org-evil"], labels=["PSY"])
    _set_state(db, key.rsplit("/", 1)[0] + "/forged", doc)
    db.close()
    _refuses(copy, "state")


# ------------------------------------------------------------ chain, txs, results, audit

def test_flipped_byte_in_block_1(copy: Path) -> None:
    db = _db(copy)
    header = bytes(db.execute("SELECT header FROM blocks WHERE height = 1").fetchone()[0])
    pos = header.index(b'"tx_root":"') + 12
    db.execute("UPDATE blocks SET header = ? WHERE height = 1",
               (header[:pos] + bytes([header[pos] ^ 1]) + header[pos + 1:],))
    db.close()
    _refuses(copy, "block 1", "header")


def test_flipped_tx_byte_in_block_1(copy: Path) -> None:
    db = _db(copy)
    raw = bytes(db.execute("SELECT raw FROM txs WHERE height = 1 AND idx = 0").fetchone()[0])
    db.execute("UPDATE txs SET raw = ? WHERE height = 1 AND idx = 0",
               (raw[:50] + bytes([raw[50] ^ 1]) + raw[51:],))
    db.close()
    _refuses(copy, "block 1 tx 0", "altered")


def test_changed_result_code(copy: Path) -> None:
    db = _db(copy)
    h, i = db.execute("SELECT height, idx FROM txs WHERE code = 0 ORDER BY height LIMIT 1"
                      ).fetchone()
    db.execute("UPDATE txs SET code = 7 WHERE height = ? AND idx = ?", (h, i))
    db.close()
    _refuses(copy, f"block {h}", "results root")


def test_last_block_removed_with_its_txs(copy: Path) -> None:
    db = _db(copy)
    top = db.execute("SELECT max(height) FROM blocks").fetchone()[0]
    prev = db.execute("SELECT header, hash FROM blocks WHERE height = ?", (top - 1,)).fetchone()
    db.execute("DELETE FROM blocks WHERE height = ?", (top,))
    db.execute("DELETE FROM txs WHERE height = ?", (top,))
    db.execute("DELETE FROM audit WHERE height = ?", (top,))
    db.execute("UPDATE meta SET value = ? WHERE key = 'height'", (str(top - 1).encode(),))
    db.execute("UPDATE meta SET value = ? WHERE key = 'header_hash'", (prev[1],))
    db.execute("UPDATE meta SET value = ? WHERE key = 'app_hash'",
               (bytes.fromhex(orjson.loads(prev[0])["app_hash"]),))
    db.close()
    _refuses(copy, f"block {top}", "removed")


def test_deleted_anchored_audit_event(copy: Path) -> None:
    db = _db(copy)
    h, leaf = db.execute("SELECT height, leaf FROM audit ORDER BY height DESC, leaf DESC "
                         "LIMIT 1").fetchone()
    db.execute("DELETE FROM audit WHERE height = ? AND leaf = ?", (h, leaf))
    db.close()
    _refuses(copy, f"block {h}", "audit")


def test_anchored_audit_event_moved_to_another_patient(copy: Path) -> None:
    db = _db(copy)
    db.execute("UPDATE audit SET patient = 'someone-else' WHERE rowid = (SELECT min(rowid) "
               "FROM audit WHERE patient IS NOT NULL)")
    db.close()
    _refuses(copy, "audit event")


# ------------------------------------------------------------ the local, unanchored log

def _pending(db: sqlite3.Connection) -> list[int]:
    return [r[0] for r in db.execute("SELECT seq FROM audit_local WHERE anchored_height IS "
                                     "NULL ORDER BY seq")]


def test_deleted_unanchored_event(copy: Path) -> None:
    db = _db(copy)
    seqs = _pending(db)
    assert len(seqs) == 3
    db.execute("DELETE FROM audit_local WHERE seq = ?", (seqs[1],))
    db.close()
    _refuses(copy, f"local audit event #{seqs[1]}", "deleted")


def test_deleted_newest_unanchored_event(copy: Path) -> None:
    db = _db(copy)
    last = _pending(db)[-1]
    db.execute("DELETE FROM audit_local WHERE seq = ?", (last,))
    db.close()
    _refuses(copy, "newest events were deleted")


def test_edited_unanchored_event(copy: Path) -> None:
    db = _db(copy)
    seq = _pending(db)[0]
    event = dict(orjson.loads(db.execute("SELECT event FROM audit_local WHERE seq = ?",
                                         (seq,)).fetchone()[0]))
    event["agent"] = "nobody"
    db.execute("UPDATE audit_local SET event = ? WHERE seq = ?", (canonical(event), seq))
    db.close()
    _refuses(copy, f"local audit event #{seq}", "altered")


def test_unanchored_event_marked_anchored(copy: Path) -> None:
    db = _db(copy)
    seq = _pending(db)[0]
    db.execute("UPDATE audit_local SET anchored_height = 1 WHERE seq = ?", (seq,))
    db.close()
    _refuses(copy, f"local audit event #{seq}", "anchored")


# ------------------------------------------------------------ what a refusing node answers

def test_refusing_node_refuses_every_data_route(copy: Path) -> None:
    db = _db(copy)
    db.execute("UPDATE txs SET code = 7 WHERE height = 1 AND idx = 0")
    pid = db.execute("SELECT patient FROM audit WHERE patient IS NOT NULL LIMIT 1"
                     ).fetchone()[0]
    db.close()
    node = _start(copy)
    try:
        token_form = {"grant_type": "client_credentials", "client_assertion": "x.y.z",
                      "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:"
                                               "jwt-bearer"}
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/auth/login", {"json": {"id": "nurse-joy", "password": PASSWORD}}),
            ("POST", "/auth/token", {"data": token_form}),
            ("GET", "/auth/me", {}),
            ("GET", "/api/access-log", {}),
            ("GET", "/api/consents", {}),
            ("POST", "/api/shares", {"json": {}}),
            ("GET", "/api/keystore", {}),
            ("GET", f"/fhir/Consent?patient={pid}", {}),
            ("GET", f"/fhir/Patient/{pid}", {}),
            ("GET", f"/fhir/Observation?patient={pid}", {}),
            ("POST", "/fhir/Patient/$match", {"json": {}}),
            ("GET", f"/fhir/AuditEvent?patient={pid}", {}),
            ("GET", f"/ledger/patients/{pid}/sealed", {}),
            ("GET", "/ledger/blocks/1", {}),
            ("GET", "/ledger/orgs", {}),
            ("GET", "/ledger/proof/tx/00", {}),
            ("POST", "/ledger/tx", {"content": b"{}"}),
            ("POST", "/shl/abc", {"json": {"recipient": "x"}}),
        ]
        for method, path, kw in calls:
            resp = httpx.request(method, node.url + path, **kw)
            assert resp.status_code == 503, (path, resp.status_code, resp.text)
            doc = resp.json()
            assert doc["resourceType"] == "OperationOutcome", (path, doc)
            assert "refuses to serve" in doc["issue"][0]["diagnostics"], (path, doc)
        status = httpx.get(node.url + "/ledger/status").json()
        assert status["serving"] is False and "results root" in status["problem"]
        assert httpx.get(node.url + "/").status_code == 200  # the portal shows the message
    finally:
        node.kill9()
