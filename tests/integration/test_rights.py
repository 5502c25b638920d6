"""Patient rights on a real node process (solo mode): key recovery through guardians,
onboarding of imported patients, accounting of disclosures, erasure from the CLI.

Key recovery: the patient splits their key 2-of-3 among two people (registered at the
node, approving from their portal sessions or their own key files) and the organisation.
The organisation opens a request with a printed code; one approval (k-1) does not
recover; a guardian holds one share, which alone recovers nothing; with two approvals
the patient sets a new password, the recovered key is the ledger's, signs
``recovery.complete`` and opens their records; the shares are deleted afterwards.
"""

from __future__ import annotations

import base64
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
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
    run_cli,
    running_node,
)

from medledger.client import Client, NodeError
from medledger.core import proofs
from medledger.core import state as st
from medledger.crypto import shamir
from medledger.crypto.canonical import b64d, loads
from medledger.errors import Forbidden
from medledger.fhir import shl
from medledger.fhir.synthetic import synthetic_patient_bundle
from medledger.node.home import Home

pytestmark = pytest.mark.timeout(300)

NEW_PASSWORD = "a-brand-new-password"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("rights") / "node") as n:
        load_patient(n, 1)  # seed 1: depression, PHQ-9 (PSY) records
        for guardian in ("anna-guardian", "ben-guardian"):
            with n.client("dr-house") as c:
                c.request("PUT", f"/fhir/Patient/{guardian}", {
                    "resourceType": "Patient", "id": guardian, "gender": "other",
                    "name": [{"family": guardian.title()}], "birthDate": "1970-01-01"},
                    headers={"X-Medledger-Patient-Password": PASSWORD})
        yield n


def _state(node: NodeHandle, key: str) -> dict[str, Any] | None:
    db = sqlite3.connect(f"file:{node.home / 'ledger.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    return None if row is None else dict(loads(row[0]))


def _held(node: NodeHandle, hashes: list[str]) -> set[str]:
    db = sqlite3.connect(f"file:{node.home / 'blobs.db'}?mode=ro", uri=True)
    try:
        return {h for h in hashes if db.execute("SELECT 1 FROM blobs WHERE hash = ?",
                                                (bytes.fromhex(h),)).fetchone()}
    finally:
        db.close()


# --------------------------------------------------------------------------- key recovery

def test_key_recovery_with_k_of_n_guardians(node: NodeHandle) -> None:
    pid = node.patients[0]
    guardians = ["anna-guardian", "ben-guardian", ORG_ID]
    with node.login(pid) as me:
        r = me.post("/api/recovery/setup", json={"guardians": guardians, "threshold": 1})
        assert_outcome(r, 400, "no guardian may recover alone")
        r = me.post("/api/recovery/setup", json={"guardians": guardians, "threshold": 2})
        assert r.status_code == 201, r.text
        setup = r.json()["setup"]
    assert setup["threshold"] == 2 and setup["guardians"] == sorted(guardians)
    assert _held(node, list(setup["shares"].values())) == set(setup["shares"].values())

    # a nurse (neither caring organisation nor guardian) cannot open a request
    with node.client("nurse-joy") as c:
        r = c._send("POST", "/api/recovery/requests", json={"patient": pid})  # noqa: SLF001
        assert r.status_code == 403
    # the organisation checked the patient's identity in person and opens one
    with node.client(ORG_ID) as c:
        req = c.post("/api/recovery/requests", {"patient": pid})
    rid, code = req["id"], req["code"]
    # the patient sees it (and could cancel it if it were not theirs)
    with node.login(pid) as me:
        mine = me.get("/api/recovery").json()["requests"]
    assert [(r["id"], r["by"], r["fingerprint"]) for r in mine] == [(rid, ORG_ID,
                                                                     req["fingerprint"])]

    # guardian anna approves from her portal session: k-1 approvals
    with node.login("anna-guardian") as anna:
        pending = anna.get("/api/recovery").json()["to_approve"]
        assert [p["id"] for p in pending] == [rid]
        r = anna.post(f"/api/recovery/requests/{rid}/approve")
        assert r.status_code == 200 and r.json()["approvals"] == "1/2"
        assert_outcome(anna.post(f"/api/recovery/requests/{rid}/approve"), 409,
                       "already approved")
    r = httpx.post(node.url + "/auth/recover", json={"id": pid, "request": rid, "code": code,
                                                     "password": NEW_PASSWORD})
    assert_outcome(r, 409, "1 of 2 guardian approvals")

    # a guardian cannot recover alone: her own share, opened with her own key, is one
    # share of a 2-of-3 split, and she does not have the request's code either
    anna_id = node.user_identity("anna-guardian")
    with Client(node.url, anna_id) as c:
        sealed = b64d(c.get(f"/api/recovery/share?patient={pid}")["share"], field="share")
    share = shamir.open_share(sealed, anna_id.enc_private, pid, "anna-guardian")
    with pytest.raises(Forbidden, match="do not recover the key"):
        shamir.combine_identity([share.mnemonic])
    r = httpx.post(node.url + "/auth/recover", json={
        "id": pid, "request": rid, "code": "AAAAA-AAAAA-AAAAA-AAAAA", "password": NEW_PASSWORD})
    assert_outcome(r, 401, "wrong recovery code")

    # the organisation approves with its own key, on the client side (CLI)
    org_key = node.home / "keystores" / "org.json"
    out = run_cli("recovery", "approve", "--node", node.url, "--key", str(org_key),
                  "--request", rid, "--fingerprint", "0000-0000-0000-0000",
                  MEDLEDGER_KEY_PASSWORD=PASSWORD)
    assert out.returncode == 1 and "fingerprint does not match" in out.stderr
    out = run_cli("recovery", "approve", "--node", node.url, "--key", str(org_key),
                  "--request", rid, "--fingerprint", req["fingerprint"],
                  MEDLEDGER_KEY_PASSWORD=PASSWORD)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2/2" in out.stdout

    # with k approvals the patient recovers their key and sets a new password
    new_key = node.home.parent / "recovered.key.json"
    out = run_cli("recovery", "finish", "--node", node.url, "--patient", pid, "--request",
                  rid, "--code", code.lower().replace("-", " "), "--out", str(new_key),
                  MEDLEDGER_KEY_PASSWORD=NEW_PASSWORD)
    assert out.returncode == 0, out.stdout + out.stderr
    from medledger.crypto import keys
    recovered = keys.load_keystore(new_key, NEW_PASSWORD)
    actor = _state(node, f"actor/{pid}")
    assert actor is not None and base64.urlsafe_b64decode(
        actor["sign_pub"] + "=") == recovered.sign_public
    with Client(node.url, recovered) as c:
        assert len(c.export_records()) > 5  # the key opens the records again
    r = httpx.post(node.url + "/auth/login", json={"id": pid, "password": PASSWORD})
    assert r.status_code == 401  # the lost password no longer opens the keystore
    done = _state(node, f"recoveryreq/{rid}")
    assert done is not None and done["status"] == "completed"
    # the public keys came with the request's shares; nothing unauthenticated tells
    # whether a patient id exists
    for who in (pid, "no-such-patient"):
        assert httpx.get(f"{node.url}/recovery/public/{who}").status_code == 404
    assert httpx.get(f"{node.url}/recovery/requests/{'0' * 32}/shares").status_code == 404
    assert _held(node, list(done["approvals"].values())) == set()  # shares deleted
    with node.login(pid, NEW_PASSWORD) as me:
        events = me.get("/api/access-log?count=500").json()
    subtypes = {e["subtype"] for e in events if e["outcome"] == "0"}
    assert {"recovery-setup", "recovery-request", "recovery-approve",
            "recovery-complete"} <= subtypes
    assert not (node.home / "recovery" / f"{rid}.json").exists()


def test_key_recovery_on_the_patients_own_machine(node: NodeHandle) -> None:
    """The strongest mode: the patient's machine splits the key and holds the request key;
    guardians re-seal on theirs; no node ever sees a share in the clear."""
    pid = node.patients[0]
    key = node.home.parent / "recovered.key.json"  # from the test above
    users = node.home / "keystores" / "users"
    out = run_cli("recovery", "setup", "--node", node.url, "--key", str(key), "--guardian",
                  "anna-guardian", "--guardian", "ben-guardian", "--threshold", "2",
                  MEDLEDGER_KEY_PASSWORD=NEW_PASSWORD)
    assert out.returncode == 0, out.stdout + out.stderr
    req_key = node.home.parent / "request.key.json"
    out = run_cli("recovery", "keygen", "--patient", pid, "--out", str(req_key),
                  MEDLEDGER_KEY_PASSWORD="request-key-pw")
    assert out.returncode == 0, out.stderr
    text = out.stdout.replace("\n", " ")
    pub = text.split("--enc-pub`):", 1)[1].split()[0]
    fp = text.split("guardians):", 1)[1].split()[0]
    out = run_cli("recovery", "request", "--home", str(node.home), "--patient", pid,
                  "--enc-pub", pub)
    assert out.returncode == 0, out.stderr
    assert "recovery code" not in out.stdout  # this node holds no request key
    rid = out.stdout.split("request ", 1)[1].split()[0]
    for guardian in ("anna-guardian", "ben-guardian"):
        res = run_cli("recovery", "approve", "--node", node.url, "--key",
                      str(users / f"{guardian}.json"), "--request", rid, "--fingerprint", fp)
        assert res.returncode == 0, res.stdout + res.stderr
    again = node.home.parent / "again.key.json"
    res = run_cli("recovery", "finish", "--node", node.url, "--patient", pid, "--request", rid,
                  "--request-key", str(req_key), "--out", str(again),
                  MEDLEDGER_REQUEST_KEY_PASSWORD="request-key-pw",
                  MEDLEDGER_KEY_PASSWORD="yet-another-password")
    assert res.returncode == 0, res.stdout + res.stderr
    from medledger.crypto import keys
    assert keys.load_keystore(again, "yet-another-password") == keys.load_keystore(
        key, NEW_PASSWORD)
    done = _state(node, f"recoveryreq/{rid}")
    assert done is not None and done["status"] == "completed"


# --------------------------------------------------------------------------- onboarding

def test_imported_patient_activates_with_a_one_time_code(node: NodeHandle) -> None:
    bundle = synthetic_patient_bundle(7, n_encounters=1)
    pid = bundle["entry"][0]["resource"]["id"]
    with node.client(ORG_ID) as c:
        c.post("/fhir", bundle)  # bulk import: nobody chose a password
    assert (node.home / "onboarding" / f"{pid}.json").exists()
    assert httpx.post(node.url + "/auth/login", json={"id": pid, "password": PASSWORD}
                      ).status_code == 401
    r = httpx.post(node.url + "/auth/activate", json={"id": pid, "code": "X", "password":
                                                      NEW_PASSWORD})
    assert_outcome(r, 401, "no activation is pending")

    with node.client("dr-house") as c:
        r = c._send("POST", f"/api/onboarding/{pid}/code", json={})  # noqa: SLF001
        assert_outcome(r, 403, "only this node's organisation")
    qr = node.home.parent / "activation.png"
    out = run_cli("patient", "activation-code", "--home", str(node.home), "--patient", pid,
                  "--qr", str(qr))
    assert out.returncode == 0, out.stderr
    first = next(ln.split(": ", 1)[1] for ln in out.stdout.splitlines()
                 if ln.startswith("code: "))
    assert qr.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(qr.stat().st_mode) == 0o600  # the code opens the account
    with node.client(ORG_ID) as c:  # a new code replaces the first one
        doc = c.post(f"/api/onboarding/{pid}/code", {"valid_days": 3})
    assert doc["code"] != first and "<svg" in doc["qr_svg"] and pid in doc["text"]

    def activate(code: str, password: str = NEW_PASSWORD) -> httpx.Response:
        return httpx.post(node.url + "/auth/activate",
                          json={"id": pid, "code": code, "password": password})

    assert_outcome(activate(first), 401, "4 tries left")  # the replaced code is void
    assert_outcome(activate(doc["code"], "short"), 400, "at least 8 characters")
    # what the organisation could have kept: a copy of the escrowed key
    from medledger.crypto import keys
    from medledger.node.home import Home
    from medledger.node.onboarding import escrow_secret
    home = Home(node.home)
    escrow_copy = node.home.parent / "escrow-copy.json"
    escrow_copy.write_bytes(home.user_keystore(pid).read_bytes())
    # a 256-bit escrow secret needs no stretching; the patient's password does (ADR 7)
    assert orjson.loads(escrow_copy.read_bytes())["kdf"]["n"] == 2**10
    r = activate(doc["code"])
    assert r.status_code == 200 and r.json()["kind"] == "patient", r.text
    assert orjson.loads(home.user_keystore(pid).read_bytes())["kdf"]["n"] == \
        keys.DEFAULT_SCRYPT_N
    # the escrow ended with new keys: the copy no longer signs for the patient, while
    # the patient's keystore keeps the old encryption key for what was sealed to it
    escrowed = keys.load_keystore(escrow_copy, escrow_secret(
        home.unlock_org(PASSWORD).secret_root, pid))
    renewed = keys.load_keystore(home.user_keystore(pid), NEW_PASSWORD)
    assert renewed.sign_public != escrowed.sign_public
    assert escrowed.enc_private in renewed.previous
    with Client(node.url, escrowed) as old, pytest.raises(NodeError) as refused:
        old.token()
    assert refused.value.status == 401
    with Client(node.url, renewed) as new:
        assert new.get("/auth/me")["actor"] == pid
    assert_outcome(activate(doc["code"]), 401, "no activation is pending")  # one time
    assert not (node.home / "onboarding" / f"{pid}.json").exists()
    with node.login(pid, NEW_PASSWORD) as me:
        everything = me.get(f"/fhir/Patient/{pid}/$everything").json()
        assert everything["total"] > 5
        events = me.get("/api/access-log?count=500").json()
    by = {(e["subtype"], e["outcome"]) for e in events}
    assert {("activation-code", "0"), ("activate", "4"), ("activate", "0")} <= by

    # the CLI path: a second imported patient activates and saves their key file
    bundle = synthetic_patient_bundle(8, n_encounters=1)
    pid2 = bundle["entry"][0]["resource"]["id"]
    with node.client(ORG_ID) as c:
        c.post("/fhir", bundle)
        code = c.post(f"/api/onboarding/{pid2}/code", {})["code"]
    key = node.home.parent / "pid2.key.json"
    out = run_cli("patient", "activate", "--node", node.url, "--patient", pid2, "--code",
                  code, "--out", str(key), MEDLEDGER_KEY_PASSWORD=NEW_PASSWORD)
    assert out.returncode == 0, out.stderr
    assert keys.load_keystore(key, NEW_PASSWORD).id == pid2


# --------------------------------------------------------------------------- disclosures

def _psy_observation(node: NodeHandle, pid: str) -> str:
    with node.login(pid, NEW_PASSWORD) as me:
        bundle = me.get(f"/fhir/Observation?patient={pid}&_count=1000").json()
    for e in bundle["entry"]:
        r = e.get("resource", {})
        if any(s.get("code") == "PSY" for s in r.get("meta", {}).get("security", [])):
            return str(r["id"])
    raise AssertionError("no PSY observation")


def test_accounting_of_disclosures_with_proofs(node: NodeHandle, tmp_path: Path) -> None:
    pid = node.patients[0]
    key = node.home.parent / "recovered.key.json"  # from the recovery test
    password = NEW_PASSWORD
    psy = _psy_observation(node, pid)
    with node.client("dr-house") as c:  # treatment by the patient's own organisation
        c.get(f"/fhir/Patient/{pid}")
        reason = "unconscious in the ER, overdose suspected"
        c.get(f"/fhir/Observation/{psy}", headers={"X-Break-Glass-Reason": reason})
    with node.login(pid, password) as me:
        share = me.post("/api/shares", json={"selection": {}, "expires_in_s": 600,
                                             "label": "dentist"}).json()
    payload = shl.decode_shlink(share["shlink"])
    assert httpx.post(payload.url, json={"recipient": "Dr Tooth, Smile Clinic"}
                      ).status_code == 200

    def anchored() -> bool:
        with node.login(pid, password) as me:
            rows = me.get("/api/disclosures").json()
        return len(rows) >= 2 and all(r["proved"] for r in rows)

    import time
    deadline = time.time() + 20
    while not anchored():
        assert time.time() < deadline, "disclosures were not anchored"
        time.sleep(0.3)
    with node.login(pid, password) as me:
        bundle = me.get(f"/fhir/Patient/{pid}/$disclosures").json()
        assert_outcome(me.get(f"/fhir/Patient/{pid}/$disclosures?start=tomorrow"), 400,
                       "start must be a date")
        empty = me.get(f"/fhir/Patient/{pid}/$disclosures?start=2999-01-01&end=2999-12-31")
        assert empty.json()["total"] == 0
        pdf = me.get("/api/disclosures.pdf")
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
        assert pdf.headers["content-type"] == "application/pdf"
    with node.login("anna-guardian") as other:
        assert_outcome(other.get(f"/fhir/Patient/{pid}/$disclosures"), 403, "only the patient")

    kinds = {}
    for e in bundle["entry"]:
        r = e["resource"]
        ext = {x["url"].rsplit("/", 1)[-1]: x for x in r["extension"]}
        kinds[ext["disclosure-kind"]["valueCode"]] = (r, ext)
    assert set(kinds) == {"break-glass", "share-link"}  # not the treatment read
    r, ext = kinds["break-glass"]
    proof = orjson.loads(base64.b64decode(ext["ledger-proof"]["valueAttachment"]["data"]))
    assert proofs.verify_proof(proof)
    leaf = loads(b64d(proof["leaf"]))
    assert leaf["id"] == r["id"] and "reason" not in leaf  # sealed on the ledger
    from medledger.crypto import freetext
    opened = freetext.open_(base64.b64decode(ext["sealed-text-key"]["valueBase64Binary"]),
                            [leaf["id"], leaf["node"], leaf["patient"]], leaf["x"])
    assert opened["reason"] == reason  # the patient reads their own sealed text
    assert "Dr Tooth" in str(kinds["share-link"][0])

    # medledger audit disclosures + prove: offline checks, and a tampered copy fails
    out_file, pdf_file = tmp_path / "d.json", tmp_path / "d.pdf"
    res = run_cli("audit", "disclosures", "--node", node.url, "--key", str(key), "--out",
                  str(out_file), "--pdf", str(pdf_file), MEDLEDGER_KEY_PASSWORD=password)
    assert res.returncode == 0, res.stdout + res.stderr
    assert pdf_file.read_bytes().startswith(b"%PDF-")
    assert {stat.S_IMODE(f.stat().st_mode) for f in (out_file, pdf_file)} == {0o600}
    res = run_cli("audit", "prove", "--file", str(out_file), "--against", node.url,
                  "--key", str(key), MEDLEDGER_KEY_PASSWORD=password)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 of 2 proofs verified" in res.stdout and reason[:20] in res.stdout
    doc = orjson.loads(out_file.read_bytes())
    for e in doc["entry"]:
        for x in e["resource"]["extension"]:
            if x["url"].endswith("ledger-proof"):
                p = orjson.loads(base64.b64decode(x["valueAttachment"]["data"]))
                p["index"] = (p["index"] + 1) % max(p["tree_size"], 2)
                x["valueAttachment"]["data"] = base64.b64encode(orjson.dumps(p)).decode()
                break
        break
    out_file.write_bytes(orjson.dumps(doc))
    res = run_cli("audit", "prove", "--file", str(out_file))
    assert res.returncode == 1 and "FAILED" in res.stdout


# --------------------------------------------------------------------------- erasure (CLI)

def test_erasure_from_the_cli(node: NodeHandle) -> None:
    pid = node.patients[0]
    key = node.home.parent / "recovered.key.json"
    with node.login(pid, NEW_PASSWORD) as me:
        obs = me.get(f"/fhir/Observation?patient={pid}&category=vital-signs&_count=1"
                     ).json()["entry"][0]["resource"]["id"]
    args = ["record", "erase", "--node", node.url, "--key", str(key), "--basis", "objection"]
    res = run_cli(*args, "--record", f"Observation/{obs}", MEDLEDGER_KEY_PASSWORD=NEW_PASSWORD)
    assert res.returncode == 1 and "confirm with --yes" in res.stderr  # no terminal
    res = run_cli(*args, "--record", f"Observation/{obs}", "--all", "--yes",
                  MEDLEDGER_KEY_PASSWORD=NEW_PASSWORD)
    assert res.returncode == 1 and "exactly one of" in res.stderr
    res = run_cli(*args, "--record", f"Observation/{obs}", "--yes",
                  MEDLEDGER_KEY_PASSWORD=NEW_PASSWORD)
    assert res.returncode == 0, res.stderr
    assert "erased 1 versions" in res.stdout
    with node.client("dr-house") as c:
        assert c._send("GET", f"/fhir/Observation/{obs}").status_code == 410  # noqa: SLF001
    # the organisation, on the patient's documented request: a whole category
    org_key = node.home / "keystores" / "org.json"
    res = run_cli("record", "erase", "--node", node.url, "--key", str(org_key), "--patient",
                  pid, "--basis", "no-longer-necessary", "--category", "laboratory", "--yes",
                  MEDLEDGER_KEY_PASSWORD=PASSWORD)
    assert res.returncode == 0, res.stderr
    entries = [v for k, v in _erasures(node, pid)]
    assert sorted((e["by"], e["basis"]) for e in entries) == sorted([
        (ORG_ID, "no-longer-necessary"), (pid, "objection")])


def _erasures(node: NodeHandle, pid: str) -> list[tuple[str, dict[str, Any]]]:
    db = sqlite3.connect(f"file:{node.home / 'ledger.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key, value FROM state WHERE key LIKE ?",
                          (f"erasure/{pid}/%",)).fetchall()
    finally:
        db.close()
    return [(k, dict(loads(v))) for k, v in rows]


def test_init_takes_retention_rules(tmp_path: Path) -> None:
    res = run_cli("init", "--home", str(tmp_path / "h"), "--org-id", "org-x", "--org-name",
                  "X", "--retention", "conditions=10y", "--retention", "claims=2190d")
    assert res.returncode == 0, res.stderr
    genesis = Home(tmp_path / "h").load_genesis()
    assert genesis["retention"] == {"conditions": 10 * 365 * 86400, "claims": 2190 * 86400}
    assert "3650 days" in res.stdout
    bad = run_cli("init", "--home", str(tmp_path / "h2"), "--org-id", "org-x", "--org-name",
                  "X", "--retention", "astrology=1y")
    assert bad.returncode == 1 and "unknown category 'astrology'" in bad.stderr
    _ = (subprocess, st)  # imported for the helpers above
