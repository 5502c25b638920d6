"""RBAC, automatic sensitivity labels, patient consent and break-the-glass on a real node."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from helpers import NodeHandle, assert_outcome, running_node

from medledger.fhir.synthetic import synthetic_patient_bundle

pytestmark = pytest.mark.timeout(120)
SEED = 1  # depression: PHQ-9 (PSY) Observations and a PSY Condition


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("policy") / "home") as n:
        from helpers import load_patient
        load_patient(n, SEED, n_encounters=2)
        yield n


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    """One record of each kind the tests read, by role in the test."""
    bundle = synthetic_patient_bundle(SEED, n_encounters=2)
    res = [e["resource"] for e in bundle["entry"]]

    def first(pred: Any) -> dict[str, Any]:
        return next(r for r in res if pred(r))

    def code(r: dict[str, Any]) -> str:
        return str((r.get("code") or {}).get("coding", [{}])[0].get("code"))

    return {"patient": res[0],
            "vital": first(lambda r: r["resourceType"] == "Observation" and code(r) == "8867-4"),
            "phq9": first(lambda r: code(r) == "44261-6"),
            "depression": first(lambda r: code(r) == "35489007"),
            "lab": first(lambda r: r["resourceType"] == "Observation" and code(r) == "2339-0")}


def _get(node: NodeHandle, who: str, path: str, **headers: str) -> httpx.Response:
    with node.client(who) as c:
        return c.http.get(path, headers={"Authorization": f"Bearer {c.token()}", **headers})


def _path(r: dict[str, Any]) -> str:
    return f"/fhir/{r['resourceType']}/{r['id']}"


def _access_log(node: NodeHandle) -> list[dict[str, Any]]:
    with node.login(node.patients[0]) as h:
        resp = h.get("/api/access-log?count=1000")
        assert resp.status_code == 200, resp.text
        return list(resp.json())


# ---------------------------------------------------------------- roles

def test_nurse_reads_vitals_not_mental_health(node: NodeHandle, records: dict[str, Any]) -> None:
    assert _get(node, "nurse-joy", _path(records["vital"])).status_code == 200
    denied = _get(node, "nurse-joy", _path(records["phq9"]))
    assert_outcome(denied, 403, "nurse", "mental-health")
    assert denied.json()["issue"][0]["code"] == "forbidden"
    assert_outcome(_get(node, "nurse-joy", _path(records["depression"])), 403)
    assert_outcome(_get(node, "nurse-joy", _path(records["lab"])), 403, "laboratory")
    search = _get(node, "nurse-joy", f"/fhir/Observation?patient={node.patients[0]}").json()
    got = {e["resource"]["id"] for e in search["entry"] if e["search"]["mode"] == "match"}
    assert records["vital"]["id"] in got and records["phq9"]["id"] not in got
    withheld = [i["diagnostics"] for e in search["entry"] if e["search"]["mode"] == "outcome"
                for i in e["resource"]["issue"]]
    assert any(records["phq9"]["id"] in w and "mental-health" in w for w in withheld)


def test_psychiatrist_reads_mental_health(node: NodeHandle, records: dict[str, Any]) -> None:
    resp = _get(node, "dr-freud", _path(records["phq9"]))
    assert resp.status_code == 200
    assert any(s["code"] == "PSY" for s in resp.json()["meta"]["security"])
    assert _get(node, "dr-freud", _path(records["depression"])).status_code == 200


def test_physician_needs_consent_for_psy(node: NodeHandle, records: dict[str, Any]) -> None:
    assert_outcome(_get(node, "dr-house", _path(records["phq9"])), 403, "PSY")
    assert _get(node, "dr-house", _path(records["lab"])).status_code == 200


def test_admin_clerk_reads_patient_only(node: NodeHandle, records: dict[str, Any]) -> None:
    assert _get(node, "clerk-bob", _path(records["patient"])).status_code == 200
    for kind in ("vital", "lab", "phq9", "depression"):
        assert_outcome(_get(node, "clerk-bob", _path(records[kind])), 403, "admin-clerk")


def test_labels_assigned_on_ingest(node: NodeHandle, records: dict[str, Any]) -> None:
    phq9 = {k: v for k, v in records["phq9"].items() if k not in ("id", "meta")}
    with node.client("dr-freud") as c:
        created = c.request("POST", "/fhir/Observation", phq9)
        assert created.status_code == 201
        rid = created.json()["id"]
        stored = c.get(f"/fhir/Observation/{rid}")
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"} in \
        stored["meta"]["security"]
    assert_outcome(_get(node, "nurse-joy", f"/fhir/Observation/{rid}"), 403)


def test_nurse_may_not_write_mental_health(node: NodeHandle, records: dict[str, Any]) -> None:
    phq9 = {k: v for k, v in records["phq9"].items() if k not in ("id", "meta")}
    with node.client("nurse-joy") as c:
        resp = c.http.post("/fhir/Observation", json=phq9,
                           headers={"Authorization": f"Bearer {c.token()}"})
    assert_outcome(resp, 403, "nurse-joy", "mental-health")


# ---------------------------------------------------------------- consent

def _consent(patient: str, decision: str, actor: str, category: str,
             start: int | None = None, end: int | None = None) -> dict[str, Any]:
    provision: dict[str, Any] = {
        "type": decision,
        "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                        "v3-ParticipationType", "code": "IRCP"}]},
                   "reference": {"reference": f"Practitioner/{actor}"}}],
        "code": [{"coding": [{"system": "http://medledger.example/fhir/CodeSystem/category",
                              "code": category}]}]}
    period = {k: datetime.fromtimestamp(v, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
              for k, v in (("start", start), ("end", end)) if v is not None}
    if period:
        provision["period"] = period
    return {"resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{patient}"}, "provision": provision}


def test_patient_restricts_and_revokes(node: NodeHandle, records: dict[str, Any]) -> None:
    pid = node.patients[0]
    vital = _path(records["vital"])
    assert _get(node, "nurse-joy", vital).status_code == 200
    with node.login(pid) as h:
        resp = h.post("/fhir/Consent", json=_consent(pid, "deny", "nurse-joy", "vital-signs"))
        assert resp.status_code == 201, resp.text
        cid = resp.json()["id"]
        assert resp.json()["provision"]["type"] == "deny"
        listed = h.get(f"/fhir/Consent?patient={pid}").json()
        assert cid in {e["resource"]["id"] for e in listed["entry"]}
    assert_outcome(_get(node, "nurse-joy", vital), 403, "consent", cid)
    assert _get(node, "dr-house", vital).status_code == 200  # only the nurse is restricted
    with node.login(pid) as h:
        revoked = h.post(f"/api/consents/{cid}/revoke")
        assert revoked.status_code == 200 and revoked.json()["status"] == "inactive"
    assert _get(node, "nurse-joy", vital).status_code == 200
    events = _access_log(node)
    assert {"consent", "consent-revoke"} <= {e["subtype"] for e in events}
    denied = [e for e in events if e["agent"] == "nurse-joy" and e["outcome"] != "0"]
    assert any(cid in e["reason"] for e in denied)


def test_consent_by_a_nurse_is_forbidden(node: NodeHandle) -> None:
    pid = node.patients[0]
    with node.client("nurse-joy") as c:
        resp = c.http.post("/fhir/Consent", json=_consent(pid, "permit", "nurse-joy",
                                                          "mental-health"),
                           headers={"Authorization": f"Bearer {c.token()}"})
    assert_outcome(resp, 403, f"only patient {pid}")


def test_period_limited_consent(node: NodeHandle, records: dict[str, Any]) -> None:
    pid = node.patients[0]
    vital = _path(records["vital"])
    now = int(time.time())
    with node.login(pid) as h:
        past = h.post("/fhir/Consent", json=_consent(pid, "deny", "nurse-joy", "vital-signs",
                                                     now - 7200, now - 3600))
        future = h.post("/fhir/Consent", json=_consent(pid, "deny", "nurse-joy", "vital-signs",
                                                       now + 3600, now + 7200))
        assert past.status_code == future.status_code == 201
        assert _get(node, "nurse-joy", vital).status_code == 200  # neither is in force
        soon = h.post("/fhir/Consent", json=_consent(pid, "deny", "nurse-joy", "vital-signs",
                                                     now - 60, now + 3))
        assert soon.status_code == 201
        assert_outcome(_get(node, "nurse-joy", vital), 403, soon.json()["id"])
        time.sleep(max(0.0, now + 3.5 - time.time()))
        assert _get(node, "nurse-joy", vital).status_code == 200  # it lapsed by itself
        bad = h.post("/fhir/Consent", json=_consent(pid, "deny", "nurse-joy", "vital-signs",
                                                    now + 100, now + 50))
        assert_outcome(bad, 400, "period ends before it starts")


def test_invalid_consent_is_400(node: NodeHandle) -> None:
    pid = node.patients[0]
    with node.login(pid) as h:
        assert_outcome(h.post("/fhir/Consent", json=_consent(pid, "deny", "nurse-joy",
                                                             "no-such-category")),
                       400, "no-such-category")
        assert_outcome(h.post("/fhir/Consent", content=b"{not json"), 400)


# ---------------------------------------------------------------- break-the-glass

def test_break_glass(node: NodeHandle, records: dict[str, Any]) -> None:
    phq9 = _path(records["phq9"])
    reason = "unconscious in ER, overdose suspected"
    resp = _get(node, "dr-house", phq9, **{"X-Break-Glass-Reason": reason})
    assert resp.status_code == 200 and resp.json()["id"] == records["phq9"]["id"]
    assert_outcome(_get(node, "dr-house", phq9, **{"X-Break-Glass-Reason": "because"}), 403,
                   "at least 10 characters")
    assert_outcome(_get(node, "nurse-joy", phq9, **{"X-Break-Glass-Reason": reason}), 403,
                   "may not break the glass")
    events = _access_log(node)
    bg = [e for e in events if e.get("break_glass")]
    assert len(bg) == 1 and bg[0]["agent"] == "dr-house" and bg[0]["reason"] == reason
    assert bg[0]["purpose"] == "ETREAT" and bg[0]["outcome"] == "0"
    with node.login(node.patients[0]) as h:
        fhir = h.get(f"/fhir/AuditEvent?patient={node.patients[0]}").json()
    bg_fhir = [e["resource"] for e in fhir["entry"]
               if any(x.get("valueBoolean") for x in e["resource"]["extension"]
                      if x["url"].endswith("/break-glass"))]
    assert len(bg_fhir) == 1
    assert bg_fhir[0]["purposeOfEvent"][0]["coding"][0]["code"] == "ETREAT"
    nurse_try = [e for e in events if e["agent"] == "nurse-joy" and e["reason"].startswith(
        "role nurse may not break the glass")]
    assert nurse_try and nurse_try[0]["outcome"] != "0"


# ---------------------------------------------------------------- review findings

def test_nurse_cannot_overwrite_psy_record_to_reach_its_history(
        node: NodeHandle, records: dict[str, Any]) -> None:
    phq9, vital = records["phq9"], records["vital"]
    disguised = {**vital, "id": phq9["id"]}
    with node.client("nurse-joy") as c:
        resp = c.http.put(_path(phq9), content=httpx.Request("PUT", "/", json=disguised).content,
                          headers={"Authorization": f"Bearer {c.token()}",
                                   "Content-Type": "application/fhir+json"})
    assert_outcome(resp, 403, "overwrite", "mental-health")
    assert_outcome(_get(node, "nurse-joy", _path(phq9) + "/_history"), 403)


def test_patient_registration_cannot_take_over_an_id(node: NodeHandle,
                                                    records: dict[str, Any]) -> None:
    keystore = node.home / "keystores" / "users" / "nurse-joy.json"
    before = keystore.read_bytes()
    stranger = synthetic_patient_bundle(7)["entry"][0]["resource"]  # not a duplicate
    body = {**stranger, "id": "nurse-joy"}
    with node.client("clerk-bob") as c:
        resp = c.http.put("/fhir/Patient/nurse-joy", json=body,
                          headers={"Authorization": f"Bearer {c.token()}"})
    assert_outcome(resp, 409, "nurse-joy")
    assert keystore.read_bytes() == before  # the practitioner's key is untouched
    with node.login("nurse-joy") as h:
        assert h.get("/auth/me").status_code == 200


def test_match_needs_a_practitioner_who_may_see_the_patient(
        node: NodeHandle, records: dict[str, Any]) -> None:
    params = {"resourceType": "Parameters",
              "parameter": [{"name": "resource", "resource": records["patient"]}]}
    with node.client(node.org) as c:
        resp = c.http.post("/fhir/Patient/$match", json=params,
                           headers={"Authorization": f"Bearer {c.token()}"})
    assert_outcome(resp, 403, "practitioners")
    with node.client("clerk-bob") as c:
        found = c.post("/fhir/Patient/$match", params)
    assert [e["resource"]["id"] for e in found["entry"]] == [records["patient"]["id"]]


def test_break_glass_needs_one_patient(node: NodeHandle) -> None:
    resp = _get(node, "dr-house", "/fhir/Observation",
                **{"X-Break-Glass-Reason": "mass emergency lookup of everyone"})
    assert_outcome(resp, 400, "one patient")
