"""Issue 8 item 6 — revocation end to end, through the CLI, on a real node.

``medledger practitioner remove`` (the organisation signs ``actor.deactivate``),
``medledger key rotate`` for a practitioner, a patient (their data keys re-wrapped to the
new key) and the organisation (old encryption keys kept), ``POST /auth/revoke`` (RFC
7009), and every request re-checking the caller's standing on the ledger.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    ORG_ID,
    PASSWORD,
    NodeHandle,
    assert_outcome,
    load_patient,
    outcome_text,
    run_cli,
    running_node,
)

from medledger.client import Client, NodeError
from medledger.crypto import keys
from medledger.fhir import shl
from medledger.fhir.synthetic import synthetic_observation, synthetic_patient_bundle
from medledger.node.auth import ASSERTION_TYPE, make_assertion
from medledger.node.home import Home

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("revoke") / "home") as n:
        load_patient(n, 4, n_encounters=1)
        load_patient(n, 2, n_encounters=1)
        yield n


def _exchange(node: NodeHandle, ident: keys.Identity) -> httpx.Response:
    return httpx.post(node.url + "/auth/token", data={
        "grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": make_assertion(ident, node.url + "/auth/token")})


def _token(node: NodeHandle, ident: keys.Identity) -> str:
    resp = _exchange(node, ident)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def _get(node: NodeHandle, token: str, path: str) -> httpx.Response:
    return httpx.get(node.url + path, headers={"Authorization": f"Bearer {token}"})


def _some_vital(node: NodeHandle, patient: str, token: str) -> dict[str, Any]:
    doc = _get(node, token, f"/fhir/Observation?patient={patient}&category=vital-signs").json()
    return dict(doc["entry"][0]["resource"])


def test_token_revocation(node: NodeHandle) -> None:
    token = _token(node, node.staff["dr-house"])
    path = f"/fhir/Patient/{node.patients[0]}"
    assert _get(node, token, path).status_code == 200
    assert httpx.post(node.url + "/auth/revoke", data={"token": token}).status_code == 200
    assert_outcome(_get(node, token, path), 401, "revoked")
    # revoking again, or a token that never was, answers the same (RFC 7009 2.2)
    assert httpx.post(node.url + "/auth/revoke", data={"token": token}).status_code == 200
    assert httpx.post(node.url + "/auth/revoke", data={"token": "made-up"}).status_code == 200
    assert httpx.post(node.url + "/auth/revoke", data={}).status_code == 400


def test_practitioner_remove(node: NodeHandle) -> None:
    freud = node.staff["dr-freud"]
    token = _token(node, freud)
    path = f"/fhir/Patient/{node.patients[0]}"
    assert _get(node, token, path).status_code == 200
    res = run_cli("practitioner", "remove", "--home", str(node.home), "--id", "dr-freud",
                  "--reason", "key-compromised")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "inactive" in res.stdout
    # the live token is refused at its next request, on this node (every node checks)
    assert_outcome(_get(node, token, path), 401, "deactivated")
    assert_outcome(_exchange(node, freud), 401, "deactivated")
    login = httpx.post(node.url + "/auth/login", json={"id": "dr-freud", "password": PASSWORD})
    unknown = httpx.post(node.url + "/auth/login", json={"id": "nobody", "password": PASSWORD})
    assert login.status_code == 401 and outcome_text(login) == outcome_text(unknown)
    # their key signs nothing any more, even relayed by the organisation
    with node.client(ORG_ID) as org, Client(node.url, freud) as c:
        raw = c.sign_tx("key.rotate", {"id": "dr-freud", "sign_pub": "x", "enc_pub": "y"}).raw
        with pytest.raises(NodeError) as err:
            org.submit_raw(raw)
    assert err.value.status == 401 and "deactivated" in str(err.value)
    again = run_cli("practitioner", "remove", "--home", str(node.home), "--id", "dr-freud")
    assert again.returncode == 1 and "already deactivated" in again.stderr
    nurse = run_cli("practitioner", "remove", "--home", str(node.home), "--id", "no-such-one")
    assert nurse.returncode == 1 and "not registered" in nurse.stderr


def test_practitioner_key_rotate(node: NodeHandle, tmp_path: Path) -> None:
    keyfile = tmp_path / "nurse-joy.json"
    shutil.copy(node.home / "demo-keys" / "nurse-joy.json", keyfile)
    old = keys.load_keystore(keyfile, PASSWORD)
    token = _token(node, old)
    path = f"/fhir/Patient/{node.patients[0]}"
    assert _get(node, token, path).status_code == 200
    res = run_cli("key", "rotate", "--node", node.url, "--key", str(keyfile))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "copy of your key file held by the node was replaced" in res.stdout
    new = keys.load_keystore(keyfile, PASSWORD)
    assert new.sign_public != old.sign_public and new.previous == (old.enc_private,)
    assert_outcome(_get(node, token, path), 401, "rotated")  # issued under the old key
    assert _exchange(node, old).status_code == 401  # the old key signs nothing
    assert _get(node, _token(node, new), path).status_code == 200
    with node.login("nurse-joy") as h:  # the node's copy was replaced: password login works
        assert h.get(path).status_code == 200
    assert not keyfile.with_name("nurse-joy.json.next").exists()


def test_patient_key_rotate_rewraps_their_records(node: NodeHandle, tmp_path: Path) -> None:
    pid = node.patients[1]
    keyfile = tmp_path / "patient.json"
    shutil.copy(Home(node.home).user_keystore(pid), keyfile)
    old = keys.load_keystore(keyfile, PASSWORD)
    with Client(node.url, old) as c:
        before = {r["id"]: r for r in c.export_records()}
    res = run_cli("key", "rotate", "--node", node.url, "--key", str(keyfile))
    assert res.returncode == 0, res.stdout + res.stderr
    new = keys.load_keystore(keyfile, PASSWORD)
    # the new key alone (no earlier key kept) opens every record: the node re-wrapped the
    # data keys to it (record.rewrap), so it works from any node that replicated them
    bare = keys.Identity(new.id, new.kind, new.sign_seed, new.enc_private)
    deadline = time.time() + 30
    while True:
        with Client(node.url, bare) as c:
            doc = c.get(f"/ledger/patients/{pid}/sealed")
            if all(item["rewrapped"] for item in doc["records"]):
                after = {r["id"]: r for r in c.export_records()}
                break
        assert time.time() < deadline, "records were not re-wrapped to the new key"
        time.sleep(0.3)
    assert after == before and len(after) > 10
    assert _exchange(node, old).status_code == 401
    with node.login(pid) as h:  # the portal login follows the new key
        assert h.get(f"/fhir/Patient/{pid}").status_code == 200


def test_org_key_rotate(node: NodeHandle) -> None:
    patient = node.patients[0]
    doctor = _token(node, node.staff["dr-house"])
    vital = _some_vital(node, patient, doctor)
    with node.login(patient) as h:  # a passcode link issued before the rotation
        link = h.post("/api/shares", json={"selection": {"categories": ["allergies"]},
                                           "passcode": "2468", "expires_in_s": 3600}
                      ).json()["shlink"]
    old_org = node.org
    assert old_org is not None
    res = run_cli("key", "rotate", "--home", str(node.home))
    assert res.returncode == 0, res.stdout + res.stderr
    rotated = Home(node.home).unlock_org(PASSWORD)
    assert rotated.sign_public != old_org.sign_public
    assert rotated.previous == (old_org.enc_private,)
    node.org = rotated
    assert _exchange(node, old_org).status_code == 401
    for restart in (False, True):
        if restart:
            node.stop()
            node.start()
        doctor = _token(node, node.staff["dr-house"])
        # records sealed to the old organisation key still open; new ones are sealed anew
        got = _get(node, doctor, f"/fhir/Observation/{vital['id']}")
        assert got.status_code == 200 and got.json() == vital
        obs = synthetic_observation(patient, 9000 + restart)
        created = httpx.put(f"{node.url}/fhir/Observation/{obs['id']}",
                            headers={"Authorization": f"Bearer {doctor}",
                                     "Content-Type": "application/fhir+json"},
                            json=obs)
        assert created.status_code == 201, created.text
        assert _get(node, doctor, f"/fhir/Observation/{obs['id']}").status_code == 200
        opened = httpx.post(shl.decode_shlink(link).url,
                            json={"recipient": "Dr Later", "passcode": "2468"})
        assert opened.status_code == 200, opened.text
        with node.login(patient) as h:  # the node still reads its earlier audit text
            log = h.get("/api/access-log?count=1000").json()
        assert any(e["detail"].startswith("share ") for e in log)
    assert not (node.home / "keystores" / "org.next.json").exists()


def test_imported_patients_activate_after_an_org_key_rotation(node: NodeHandle) -> None:
    """An imported patient's key is escrowed under a secret derived from the organisation
    key, and their activation code is checked with a key derived from it: both came from
    the *current* key, so after `medledger key rotate --home` the code was "wrong" and the
    escrowed keystore would not open ("wrong password for keystore") - never activatable."""
    def import_patient(seed: int) -> str:
        bundle = synthetic_patient_bundle(seed, n_encounters=1)
        with node.client(ORG_ID) as c:
            c.post("/fhir", bundle)
        return str(bundle["entry"][0]["resource"]["id"])

    def code_for(pid: str) -> str:
        with node.client(ORG_ID) as c:
            return str(c.post(f"/api/onboarding/{pid}/code", {"valid_days": 3})["code"])

    def activate(pid: str, code: str) -> None:
        resp = httpx.post(node.url + "/auth/activate",
                          json={"id": pid, "code": code, "password": "long-enough-1"})
        assert resp.status_code == 200, resp.text
        assert httpx.post(node.url + "/auth/login", json={
            "id": pid, "password": "long-enough-1"}).status_code == 200

    before = import_patient(8)
    code_before = code_for(before)
    res = run_cli("key", "rotate", "--home", str(node.home))
    assert res.returncode == 0, res.stdout + res.stderr
    node.org = Home(node.home).unlock_org(PASSWORD)
    activate(before, code_before)  # escrowed and issued before the rotation
    after = import_patient(9)  # escrowed under the rotated organisation
    activate(after, code_for(after))
