"""Regression tests for issue 8 (close the leaks), items 1-5, each as the attacker tried it.
Item 6 (revocation) is in ``test_revocation.py``.

1. share links opened past passcode, lockout, revocation and expiry through the ledger;
2. the raw ledger readable without credentials (who read whose record, free text);
3. SMART scopes ignored by ``$everything`` and ``$summary``;
4. writes escaping the read policy (overwriting unreadable records, deny consents);
5. oracles: the identical-content PUT, the duplicate-registration 409, withheld notices,
   two login errors.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from helpers import (
    ORG_ID,
    PASSWORD,
    NodeHandle,
    assert_outcome,
    load_patient,
    outcome_text,
    running_node,
)

from medledger.client import Client
from medledger.crypto.canonical import b64d, loads
from medledger.errors import MedledgerError
from medledger.fhir import shl
from medledger.fhir.synthetic import synthetic_patient_bundle
from medledger.node.auth import ASSERTION_TYPE, make_assertion

pytestmark = pytest.mark.timeout(240)
PASSCODE = "4711"  # short, like the 4-6 digit passcodes patients choose
SEED_PSY, SEED_DENY, SEED_WRITES = 4, 2, 5


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("issue8") / "home") as n:
        for seed in (SEED_PSY, SEED_DENY, SEED_WRITES):
            load_patient(n, seed, n_encounters=1)
        yield n


def _patient(node: NodeHandle, seed: int) -> str:
    return node.patients[(SEED_PSY, SEED_DENY, SEED_WRITES).index(seed)]


def _resource(seed: int, code: str) -> dict[str, Any]:
    return next(e["resource"] for e in synthetic_patient_bundle(seed, 1)["entry"]
                if code in {c.get("code") for c in
                            (e["resource"].get("code") or {}).get("coding", [])})


def _bearer(node: NodeHandle, who: str, scope: str | None = None) -> dict[str, str]:
    ident = node.org if who == ORG_ID else (node.staff.get(who) or node.user_identity(who))
    assert ident is not None
    data = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": make_assertion(ident, node.url + "/auth/token")}
    if scope:
        data["scope"] = scope
    resp = httpx.post(node.url + "/auth/token", data=data)
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['access_token']}",
            "Content-Type": "application/fhir+json"}


def _share(node: NodeHandle, patient: str, **body: Any) -> dict[str, Any]:
    with node.login(patient) as h:
        resp = h.post("/api/shares", json={"selection": {"categories": ["vital-signs"]},
                                           "expires_in_s": 3600, **body})
        assert resp.status_code == 201, resp.text
        grant = next(g for g in h.get("/api/shares").json() if g["id"] == resp.json()["id"])
    return {**resp.json(), "tx": grant["tx"]}


def _manifest(link: str, passcode: str | None = None, who: str = "Mallory") -> httpx.Response:
    return httpx.post(shl.decode_shlink(link).url, json={"recipient": who, "passcode": passcode})


def _strings(doc: Any) -> Iterator[str]:
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for v in doc.values():
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)


def _member_tx(node: NodeHandle, tx_hash: str) -> dict[str, Any]:
    """A tx as a member organisation sees it (through its inclusion proof)."""
    with node.client(ORG_ID) as org:
        proof = org.get(f"/ledger/proof/tx/{tx_hash}")
    return dict(loads(b64d(proof["leaf"])))


def _nothing_opens(node: NodeHandle, share: dict[str, Any]) -> None:
    """No endpoint yields the link's payload: the manifest refuses, anonymous ledger reads
    are refused, and not even a member's copy of the tx holds anything the link's key
    decrypts."""
    resp = _manifest(share["shlink"], PASSCODE)
    assert resp.status_code in (401, 410) and "files" not in resp.text, resp.text
    assert httpx.get(f"{node.url}/ledger/proof/tx/{share['tx']}").status_code == 401
    key = shl.decode_shlink(share["shlink"]).key_bytes
    for value in _strings(_member_tx(node, share["tx"])):
        with pytest.raises(MedledgerError):
            shl.decrypt_jwe(value, key)


# ---------------------------------------------------------------- 1. share links

def test_1_share_tx_holds_the_grant_only(node: NodeHandle) -> None:
    patient = _patient(node, SEED_PSY)
    share = _share(node, patient, passcode=PASSCODE, label="for Dr Heart",
                   recipient="Dr Heart, City Cardiology")
    tx = _member_tx(node, share["tx"])
    assert tx["kind"] == "share.create"
    assert set(tx["body"]) == {"id", "patient", "exp", "node", "payload", "passcode",
                               "max_attempts", "records"}
    assert tx["body"]["passcode"] is True  # a flag: the verifier stays with the node
    raw = orjson.dumps(tx)
    assert PASSCODE.encode() not in raw and b"Dr Heart" not in raw and b"eyJ" not in raw
    opened = _manifest(share["shlink"], PASSCODE, "Dr Heart")
    assert opened.status_code == 200 and opened.json()["files"][0]["embedded"]


def test_1_revoked_expired_locked_links_yield_nothing(node: NodeHandle) -> None:
    patient = _patient(node, SEED_PSY)
    revoked = _share(node, patient, passcode=PASSCODE)
    with node.login(patient) as h:
        assert h.post(f"/api/shares/{revoked['id']}/revoke").status_code == 200
    _nothing_opens(node, revoked)

    locked = _share(node, patient, passcode=PASSCODE)
    left = [_manifest(locked["shlink"], "0000").json().get("remainingAttempts")
            for _ in range(5)]
    assert left == [4, 3, 2, 1, 0]
    _nothing_opens(node, locked)
    assert "locked" in _manifest(locked["shlink"], PASSCODE).text

    expired = _share(node, patient, passcode=PASSCODE, expires_in_s=3)  # > block lag
    while time.time() <= expired["exp"] + 0.5:  # the node's clock must pass exp
        time.sleep(0.2)
    _nothing_opens(node, expired)
    assert "expired" in _manifest(expired["shlink"], PASSCODE).text
    # the issuing node no longer holds the revoked and expired payloads at all
    db = sqlite3.connect(f"file:{node.home / 'blobs.db'}?mode=ro", uri=True)
    held = {r[0] for r in db.execute("SELECT id FROM shares WHERE length(jwe) > 0")}
    db.close()
    assert revoked["id"] not in held and expired["id"] not in held


def test_1_asking_without_passcode_costs_nothing(node: NodeHandle) -> None:
    share = _share(node, _patient(node, SEED_PSY), passcode=PASSCODE)
    for _ in range(12):  # more than the attempt budget
        resp = _manifest(share["shlink"])
        assert resp.status_code == 401 and resp.json()["remainingAttempts"] == 5
    assert _manifest(share["shlink"], PASSCODE, "Dr Heart").status_code == 200


# ---------------------------------------------------------------- 2. the raw ledger

def test_2_raw_ledger_is_for_members(node: NodeHandle) -> None:
    patient = _patient(node, SEED_PSY)
    reason = f"unconscious in ER {os.urandom(4).hex()}"
    hdr = _bearer(node, "dr-house") | {"X-Break-Glass-Reason": reason}
    psy = _resource(SEED_PSY, "35489007")
    assert httpx.get(f"{node.url}/fhir/Condition/{psy['id']}", headers=hdr).status_code == 200
    share = _share(node, patient, label="label-of-my-share", recipient="Ms Recipient")
    status = httpx.get(node.url + "/ledger/status")
    assert status.status_code == 200 and patient not in status.text
    height = status.json()["height"]
    for path in (f"/ledger/blocks/{height}", f"/ledger/proof/tx/{share['tx']}",
                 "/ledger/proof/audit/x", "/ledger/patients/x/sealed"):
        assert httpx.get(node.url + path).status_code == 401, path
    orgs = httpx.get(node.url + "/ledger/orgs").json()
    assert orgs and all("api_url" not in o for o in orgs)
    # even members read no free text: break-glass reasons, share labels and recipients are
    # sealed (the whole chain, block by block, as a member organisation sees it)
    _wait_anchored_break_glass(node, patient)
    seen = b""
    with node.client(ORG_ID) as org:
        for h in range(1, org.get("/ledger/status", auth=False)["height"] + 1):
            for t in org.get(f"/ledger/blocks/{h}")["txs"]:
                seen += b64d(org.get(f"/ledger/proof/tx/{t['hash']}")["leaf"])
    assert b"audit.anchor" in seen and b'"break_glass":true' in seen
    for secret in (reason, "label-of-my-share", "Ms Recipient"):
        assert secret.encode() not in seen, secret


def _wait_anchored_break_glass(node: NodeHandle, patient: str) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        with node.login(patient) as h:
            if any(e["break_glass"] and e["anchored_height"]
                   for e in h.get("/api/access-log?count=500").json()):
                return
        time.sleep(0.3)
    raise AssertionError("the break-glass read was not anchored")


# ---------------------------------------------------------------- 3. scopes

def test_3_everything_and_summary_follow_scopes(node: NodeHandle) -> None:
    patient = _patient(node, SEED_PSY)
    obs_only = _bearer(node, "dr-house", "user/Observation.rs")
    doc = httpx.get(f"{node.url}/fhir/Patient/{patient}/$everything", headers=obs_only).json()
    got = {e["resource"]["resourceType"] for e in doc["entry"]
           if e["search"]["mode"] == "match"}
    assert got == {"Observation"}
    assert httpx.get(f"{node.url}/fhir/Patient/{patient}/$summary",
                     headers=obs_only).status_code == 403
    consent_only = _bearer(node, patient, "patient/Consent.rs")
    doc = httpx.get(f"{node.url}/fhir/Patient/{patient}/$everything",
                    headers=consent_only).json()
    assert not [e for e in doc.get("entry", []) if e["search"]["mode"] == "match"]
    assert httpx.get(f"{node.url}/fhir/Patient/{patient}/$summary",
                     headers=consent_only).status_code == 403
    full = _bearer(node, patient)
    doc = httpx.get(f"{node.url}/fhir/Patient/{patient}/$everything", headers=full).json()
    assert len({e["resource"]["resourceType"] for e in doc["entry"]}) > 3


# ---------------------------------------------------------------- 4. writes

def test_4_writes_follow_the_read_policy(node: NodeHandle) -> None:
    patient = _patient(node, SEED_WRITES)
    psy = _resource(SEED_WRITES, "35489007")
    edited = orjson.dumps({**psy, "note": [{"text": "reviewed"}]})
    url = f"{node.url}/fhir/Condition/{psy['id']}"
    phys = _bearer(node, "dr-house")
    assert_outcome(httpx.put(url, content=edited, headers=phys), 403, "break the glass")
    flagged = httpx.put(url, content=edited, headers=phys | {
        "X-Break-Glass-Reason": "urgent medication reconciliation"})
    assert flagged.status_code == 200, flagged.text
    with Client(node.url, node.user_identity(patient)) as c:
        log = c.get("/api/access-log?count=200")
        c.submit_tx("consent.put", {"id": "deny-nurse", "patient": patient,
                                    "decision": "deny", "actors": ["nurse-joy"]})
        c.submit_tx("consent.put", {"id": "deny-org", "patient": patient,
                                    "decision": "deny", "orgs": [ORG_ID],
                                    "categories": ["laboratory"]})
    assert any(e["subtype"] == "update" and e["break_glass"] for e in log)
    vital = _resource(SEED_WRITES, "8867-4")
    body = orjson.dumps({k: v for k, v in vital.items() if k != "id"})
    nurse = _bearer(node, "nurse-joy")
    assert_outcome(httpx.post(f"{node.url}/fhir/Observation", content=body, headers=nurse),
                   403, "deny-nurse")
    assert_outcome(httpx.put(f"{node.url}/fhir/Observation/{vital['id']}",
                             content=orjson.dumps({**vital, "status": "amended"}),
                             headers=nurse), 403, "deny-nurse")
    lab = _resource(SEED_WRITES, "2339-0")
    new_lab = orjson.dumps({k: v for k, v in lab.items() if k != "id"})
    for who in ("dr-house", ORG_ID):  # the organisation named, and its staff
        assert_outcome(httpx.post(f"{node.url}/fhir/Observation", content=new_lab,
                                  headers=_bearer(node, who)), 403, "deny-org")


# ---------------------------------------------------------------- 5. oracles

def test_5_put_is_no_content_oracle(node: NodeHandle) -> None:
    url = f"{node.url}/fhir/Observation/{_resource(SEED_PSY, '44261-6')['id']}"
    phq = httpx.get(url, headers=_bearer(node, "dr-freud")).json()  # exactly what is stored
    nurse = _bearer(node, "nurse-joy")
    right = httpx.put(url, content=orjson.dumps(phq), headers=nurse)  # the right guess
    wrong = httpx.put(url, content=orjson.dumps({**phq, "status": "amended"}), headers=nurse)
    assert right.status_code == wrong.status_code == 403
    assert outcome_text(right) == outcome_text(wrong)
    assert "identical" not in right.text


def test_5_duplicates_and_withheld_notices_name_nothing(node: NodeHandle) -> None:
    patient = _patient(node, SEED_DENY)
    with Client(node.url, node.user_identity(patient)) as c:
        c.submit_tx("consent.put", {"id": "no-clerk-no-nurse", "patient": patient,
                                    "decision": "deny", "actors": ["clerk-bob", "nurse-joy"]})
    ids = {e["resource"]["id"] for e in synthetic_patient_bundle(SEED_DENY, 1)["entry"]}
    demographics = next(e["resource"] for e in synthetic_patient_bundle(SEED_DENY, 1)["entry"]
                        if e["resource"]["resourceType"] == "Patient")
    probe = orjson.dumps({k: v for k, v in demographics.items() if k != "id"})
    resp = httpx.post(f"{node.url}/fhir/Patient", content=probe,
                      headers=_bearer(node, "clerk-bob"))
    assert_outcome(resp, 409, "already registered", "not visible to you")
    assert not any(i in resp.text for i in ids)
    seen = httpx.post(f"{node.url}/fhir/Patient", content=probe,
                      headers=_bearer(node, "dr-house"))
    assert_outcome(seen, 409, f"Patient/{patient}")  # one who may see the patient is told
    search = httpx.get(f"{node.url}/fhir/Observation?patient={patient}",
                       headers=_bearer(node, "nurse-joy"))
    notes = [i["diagnostics"] for e in search.json()["entry"] for i in e["resource"]["issue"]]
    assert len(notes) == 1 and "records withheld" in notes[0]
    assert not any(i in search.text for i in ids - {patient})
    assert "vital-signs" not in search.text and "laboratory" not in search.text
    with node.login(patient) as h:
        log = h.get("/api/access-log?count=500").json()
    assert any(e["agent"] == "clerk-bob" and e["subtype"] == "register" and e["outcome"] != "0"
               for e in log)
    assert any(e["agent"] == "nurse-joy" and e["subtype"] == "search" for e in log)


def test_5_one_login_error(node: NodeHandle) -> None:
    unknown = httpx.post(node.url + "/auth/login",
                         json={"id": "nobody-here", "password": PASSWORD})
    wrong = httpx.post(node.url + "/auth/login",
                       json={"id": node.patients[0], "password": "not-the-password"})
    assert unknown.status_code == wrong.status_code == 401
    assert outcome_text(unknown) == outcome_text(wrong)
