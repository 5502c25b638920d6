"""The authorization matrix: role x label x consent x scope x every path, over HTTP.

One real node (org-stmary) on a chain with a second member organisation (org-other,
no node of its own: its practitioner and its organisation token act at this node,
as any member's may). Three patients:

- P1: PSY records, no consent;
- P2: a *deny* consent naming nurse-joy and clerk-bob, another naming org-other;
- P3: PSY records, *permit* consents for org-other (all data, and the PSY label).

Callers: the four staff roles of org-stmary, org-other's physician, a physician token
narrowed to ``user/Observation.rs``, P1 with a full token, a password session (holds
the key) and a token narrowed to ``patient/Consent.rs``, P2, both organisations, and
nobody. Each row is one request and its expected status, with a check of what the
answer reveals where that matters (types returned, withheld notices named or counted,
no ids of a patient the caller may not see).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from helpers import (
    ORG_ID,
    PASSWORD,
    NodeHandle,
    free_port,
    load_patient,
    register_staff,
)

from medledger.client import Client
from medledger.core.tx import make_tx
from medledger.crypto import keys
from medledger.crypto.canonical import b64e
from medledger.fhir.synthetic import synthetic_patient_bundle
from medledger.node.auth import ASSERTION_TYPE, make_assertion
from medledger.node.home import Home, init_home, org_genesis_entry

pytestmark = pytest.mark.timeout(300)
ORG_B = "org-other"
CHAIN = "medledger-matrix"
SEEDS = {"P1": 4, "P2": 2, "P3": 5}  # 4 and 5 have PSY records
SCOPES = {"phys_obs": ("dr-house", "user/Observation.rs"),
          "p1_consent": ("P1", "patient/Consent.rs")}


@dataclass
class World:
    node: NodeHandle
    org_b: keys.Identity
    other: keys.Identity  # org-other's physician
    refs: dict[str, str] = field(default_factory=dict)
    ids: dict[str, set[str]] = field(default_factory=dict)  # every record id per patient
    patients: dict[str, keys.Identity] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)

    def identity(self, who: str) -> keys.Identity:
        if who in self.patients:
            return self.patients[who]
        return {ORG_ID: self.node.org, ORG_B: self.org_b, "dr-other": self.other}.get(
            who) or self.node.staff[who]

    def token(self, who: str) -> str | None:
        if who == "anon":
            return None
        if who not in self.tokens:
            if who == "p1_login":
                resp = httpx.post(self.node.url + "/auth/login",
                                  json={"id": self.refs["P1"], "password": PASSWORD})
                assert resp.status_code == 200, resp.text
                self.tokens[who] = resp.json()["access_token"]
            else:
                name, scope = SCOPES.get(who, (ALIASES.get(who, who), None))
                self.tokens[who] = _token(self.node.url, self.identity(name), scope)
        return self.tokens[who]


ALIASES = {"phys": "dr-house", "nurse": "nurse-joy", "psych": "dr-freud", "clerk": "clerk-bob",
           "other": "dr-other", "p1": "P1", "p2": "P2", "p3": "P3", "orgA": ORG_ID,
           "orgB": ORG_B}


def _token(url: str, identity: keys.Identity, scope: str | None = None) -> str:
    data = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": make_assertion(identity, url + "/auth/token")}
    if scope:
        data["scope"] = scope
    resp = httpx.post(url + "/auth/token", data=data)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def _two_org_home(path: Path, port: int, org_b: keys.Identity) -> keys.Identity:
    org_a = keys.new_identity(ORG_ID, "org", {"name": "St Mary's Hospital"})
    genesis = {"chain_id": CHAIN, "orgs": [org_genesis_entry(org_a, "St Mary's Hospital"),
                                          org_genesis_entry(org_b, "Other Clinic")]}
    init_home(path, ORG_ID, "St Mary's Hospital", PASSWORD, chain=CHAIN, port=port,
              genesis=genesis, identity=org_a, scrypt_n=2**12)
    return org_a


def _consent(world: World, who: str, **rule: Any) -> None:
    patient = world.patients[who]
    with Client(world.node.url, patient) as c:
        c.submit_tx("consent.put", {"id": os.urandom(8).hex(), "patient": patient.id, **rule})


def _refs(world: World) -> None:
    """Ids of the records the rows name, from each patient's synthetic bundle."""
    for name, seed in SEEDS.items():
        resources = [e["resource"] for e in synthetic_patient_bundle(seed, 1)["entry"]]
        world.ids[name] = {r["id"] for r in resources}
        pid = resources[0]["id"]
        world.refs[name] = pid
        for r in resources:
            tag = _tag(r)
            if tag and f"{name}_{tag}" not in world.refs:
                world.refs[f"{name}_{tag}"] = f"{r['resourceType']}/{r['id']}"
        world.refs[f"{name}_patient"] = f"Patient/{pid}"


def _tag(r: dict[str, Any]) -> str | None:
    codes = {c.get("code") for c in (r.get("code") or {}).get("coding", [])}
    if r["resourceType"] == "Observation" and "8867-4" in codes:
        return "vital"
    if r["resourceType"] == "Observation" and "44261-6" in codes:
        return "phq"
    if r["resourceType"] == "Condition" and "35489007" in codes:
        return "psy"
    if r["resourceType"] == "Condition" and "38341003" in codes:
        return "htn"
    return None


def _first_anchored_event(world: World, patient: str) -> str:
    ident = world.patients[patient]
    deadline = time.time() + 20
    while time.time() < deadline:
        with Client(world.node.url, ident) as c:
            for ev in c.get("/api/access-log?count=200"):
                if ev.get("anchored_height"):
                    return str(ev["id"])
        time.sleep(0.3)
    raise AssertionError(f"no anchored audit event for {patient}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    path = tmp_path_factory.mktemp("matrix") / "home"
    node = NodeHandle(path, free_port())
    org_b = keys.new_identity(ORG_B, "org", {"name": "Other Clinic"})
    _two_org_home(path, node.port, org_b)
    node.org = Home(path).unlock_org(PASSWORD)
    try:
        node.start()
        register_staff(node)
        other = keys.new_identity("dr-other", "practitioner", {"role": "physician"})
        with Client(node.url, org_b) as c:  # a member relays its own registration
            c.submit_tx("actor.register", {"id": other.id, "kind": "practitioner",
                                           "role": "physician",
                                           "sign_pub": b64e(other.sign_public),
                                           "enc_pub": b64e(other.enc_public)})
        w = World(node, org_b, other)
        for name, seed in SEEDS.items():
            load_patient(node, seed, n_encounters=1)
            w.patients[name] = node.user_identity(node.patients[-1])
        _refs(w)
        _consent(w, "P2", decision="deny", actors=["nurse-joy", "clerk-bob"])
        _consent(w, "P2", decision="deny", orgs=[ORG_B])
        _consent(w, "P3", decision="permit", orgs=[ORG_B])
        _consent(w, "P3", decision="permit", orgs=[ORG_B], labels=["PSY"])
        for name in SEEDS:
            with Client(node.url, w.patients[name]) as c:
                doc = c.get(f"/ledger/patients/{w.refs[name]}/sealed")
            w.refs[f"{name}_tx"] = doc["records"][-1]["meta"]["tx"]
        w.refs["P1_event"] = _first_anchored_event(w, "P1")
        w.refs["P2_event"] = _first_anchored_event(w, "P2")
        yield w
    finally:
        node.kill9()


# ---------------------------------------------------------------- checks

Check = Callable[[World, httpx.Response], None]


def _matches(resp: httpx.Response) -> list[dict[str, Any]]:
    return [e["resource"] for e in resp.json().get("entry", [])
            if e.get("search", {}).get("mode") == "match"]


def _withheld(resp: httpx.Response) -> list[str]:
    return [i["diagnostics"] for e in resp.json().get("entry", [])
            if e.get("search", {}).get("mode") == "outcome" for i in e["resource"]["issue"]]


def types(*names: str) -> Check:
    def check(w: World, resp: httpx.Response) -> None:
        assert {r["resourceType"] for r in _matches(resp)} == set(names), resp.text[:500]
    return check


def names(*refs: str) -> Check:
    """Withheld notices name these records (the caller may see the patient)."""
    def check(w: World, resp: httpx.Response) -> None:
        notes = " ".join(_withheld(resp))
        for r in refs:
            assert w.refs[r] in notes, (r, notes)
    return check


def counted_only(patient: str) -> Check:
    """Withheld records are counted, never named: no id of ``patient``'s records, no
    category, no label anywhere in the answer."""
    def check(w: World, resp: httpx.Response) -> None:
        notes = _withheld(resp)
        assert notes and all("withheld" in n for n in notes), resp.text[:400]
        for rid in w.ids[patient] - {w.refs[patient]}:  # (the caller named the patient)
            assert rid not in resp.text
        for word in ("mental-health", "PSY", "vital-signs", "labelled"):
            assert word not in " ".join(notes), notes
    return check


def nothing_of(patient: str) -> Check:
    """No id of ``patient``'s records in the answer; no category or label in what it says
    about records it withholds."""
    def check(w: World, resp: httpx.Response) -> None:
        for rid in w.ids[patient] - {w.refs[patient]}:
            assert rid not in resp.text, rid
        said = resp.text if resp.status_code >= 400 else " ".join(_withheld(resp))
        for word in ("mental-health", "PSY", "vital-signs", "labelled"):
            assert word not in said, (word, said[:400])
    return check


def says(*needles: str) -> Check:
    def check(w: World, resp: httpx.Response) -> None:
        for n in needles:
            n = n.format(**w.refs)
            assert n.lower() in resp.text.lower(), (n, resp.text[:400])
    return check


def all_types(patient: str) -> Check:
    """Every resource type of the patient's records."""
    def check(w: World, resp: httpx.Response) -> None:
        want = {e["resource"]["resourceType"]
                for e in synthetic_patient_bundle(SEEDS[patient], 1)["entry"]}
        assert {r["resourceType"] for r in _matches(resp)} == want, resp.text[:500]
    return check


def both(*checks: Check) -> Check:
    def check(w: World, resp: httpx.Response) -> None:
        for c in checks:
            c(w, resp)
    return check


def header_only(w: World, resp: httpx.Response) -> None:
    assert set(resp.json()) == {"header"}


def with_txs(w: World, resp: httpx.Response) -> None:
    assert resp.json()["txs"]


def public_orgs(w: World, resp: httpx.Response) -> None:
    assert all("api_url" not in o and "validator_pub" not in o for o in resp.json())
    assert {o["id"] for o in resp.json()} == {ORG_ID, ORG_B}


def full_orgs(w: World, resp: httpx.Response) -> None:
    assert all("validator_pub" in o for o in resp.json())


def match_ids(*patients: str) -> Check:
    def check(w: World, resp: httpx.Response) -> None:
        got = {e["resource"]["id"] for e in resp.json().get("entry", [])}
        assert got == {w.refs[p] for p in patients}, got
    return check


# ---------------------------------------------------------------- requests

def _body(kind: str, w: World) -> bytes | None:
    if kind == "vital":
        obs = _vital_of(w.refs["P1"])
        return orjson.dumps(obs)
    if kind == "vital_p2":
        return orjson.dumps(_vital_of(w.refs["P2"]))
    if kind.startswith("psy_edit"):
        res = next(e["resource"] for e in synthetic_patient_bundle(SEEDS["P1"], 1)["entry"]
                   if _tag(e["resource"]) == "psy")
        return orjson.dumps({**res, "note": [{"text": f"reviewed ({kind})"}]})
    if kind.startswith("dup_"):
        patient = next(e["resource"] for e in synthetic_patient_bundle(
            SEEDS[kind[4:]], 1)["entry"] if e["resource"]["resourceType"] == "Patient")
        return orjson.dumps({k: v for k, v in patient.items() if k != "id"})
    if kind.startswith("match_"):
        patient = next(e["resource"] for e in synthetic_patient_bundle(
            SEEDS[kind[6:]], 1)["entry"] if e["resource"]["resourceType"] == "Patient")
        return orjson.dumps({"resourceType": "Parameters", "parameter": [
            {"name": "resource", "resource": {k: v for k, v in patient.items() if k != "id"}}]})
    if kind == "consent_p1":
        return orjson.dumps({"resourceType": "Consent", "status": "active",
                             "scope": {"coding": [{
                                 "system": "http://terminology.hl7.org/CodeSystem/"
                                 "consentscope", "code": "patient-privacy"}]},
                             "category": [{"coding": [{"system": "http://loinc.org",
                                                       "code": "59284-0"}]}],
                             "patient": {"reference": f"Patient/{w.refs['P1']}"},
                             "policyRule": {"coding": [{
                                 "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                 "code": "OPTIN"}]},
                             "provision": {"type": "permit", "actor": [{
                                 "role": {"coding": [{"system": "http://terminology.hl7.org/"
                                                      "CodeSystem/v3-ParticipationType",
                                                      "code": "IRCP"}]},
                                 "reference": {"reference": "Organization/org-far"}}]}})
    if kind == "share":
        return orjson.dumps({"selection": {"categories": ["allergies"]}, "expires_in_s": 600})
    if kind == "blobs":
        return orjson.dumps({"hashes": ["ab" * 32]})
    if kind.startswith("tx_"):
        return _signed_consent(w, "P1")
    raise AssertionError(kind)


def _vital_of(pid: str) -> dict[str, Any]:
    from medledger.fhir.synthetic import synthetic_observation
    obs = synthetic_observation(pid, int.from_bytes(os.urandom(3), "big"))
    obs.pop("id", None)
    return obs


def _signed_consent(w: World, who: str) -> bytes:
    p = w.patients[who]
    chain = httpx.get(w.node.url + "/ledger/status").json()["chain"]
    return make_tx(p.id, p.signer(), chain, "consent.put",
                   {"id": os.urandom(8).hex(), "patient": p.id, "decision": "permit",
                    "orgs": ["org-far"], "categories": ["allergies"]},
                   os.urandom(16).hex()).raw


# (caller, method, path, body kind, expected status, check)
Row = tuple[str, str, str, str | None, int, Check | None]
R = "/fhir/{%s}"
ROWS: list[Row] = [
    # -- read / vread: role x label x consent x scope
    ("phys", "GET", R % "P1_vital", None, 200, None),
    ("phys", "GET", R % "P1_psy", None, 403, says("PSY")),
    ("psych", "GET", R % "P1_psy", None, 200, None),
    ("nurse", "GET", R % "P1_vital", None, 200, None),
    ("nurse", "GET", R % "P1_psy", None, 403, says("mental-health")),
    ("nurse", "GET", R % "P1_htn", None, 403, says("nurse", "conditions")),
    ("clerk", "GET", R % "P1_patient", None, 200, None),
    ("clerk", "GET", R % "P1_vital", None, 403, says("admin-clerk")),
    ("other", "GET", R % "P1_vital", None, 403, both(says("no access"), nothing_of("P1"))),
    ("other", "GET", R % "P1_psy", None, 403, both(says("no access"), nothing_of("P1"))),
    ("other", "GET", R % "P3_vital", None, 200, None),
    ("other", "GET", R % "P3_psy", None, 200, None),
    ("other", "GET", R % "P2_vital", None, 403, nothing_of("P2")),
    ("nurse", "GET", R % "P2_vital", None, 403, says("no access")),
    ("clerk", "GET", R % "P2_patient", None, 403, says("no access")),
    ("phys", "GET", R % "P2_vital", None, 200, None),
    ("phys_obs", "GET", R % "P1_vital", None, 200, None),
    ("phys_obs", "GET", R % "P1_patient", None, 403, says("scopes")),
    ("phys_obs", "GET", R % "P1_htn", None, 403, says("scopes")),
    ("p1", "GET", R % "P1_psy", None, 200, None),
    ("p1", "GET", R % "P2_vital", None, 403, nothing_of("P2")),
    ("p1_consent", "GET", R % "P1_vital", None, 403, says("scopes")),
    ("orgA", "GET", R % "P1_vital", None, 403, says("organisation credentials")),
    ("anon", "GET", R % "P1_vital", None, 401, None),
    ("phys", "GET", R % "P1_vital" + "/_history/1", None, 200, None),
    ("other", "GET", R % "P1_vital" + "/_history/1", None, 403, nothing_of("P1")),
    ("phys", "GET", R % "P1_psy" + "/_history", None, 403, None),
    ("psych", "GET", R % "P1_psy" + "/_history", None, 200, None),
    ("other", "GET", R % "P1_htn" + "/_history", None, 403, nothing_of("P1")),
    # -- search: per-record decisions, withheld notices named or counted
    ("phys", "GET", "/fhir/Observation?patient={P1}", None, 200,
     both(types("Observation"), names("P1_phq"))),
    ("nurse", "GET", "/fhir/Condition?patient={P1}", None, 200,
     both(types(), names("P1_psy", "P1_htn"))),
    ("other", "GET", "/fhir/Observation?patient={P1}", None, 200,
     both(types(), counted_only("P1"))),
    ("nurse", "GET", "/fhir/Observation?patient={P2}", None, 200,
     both(types(), counted_only("P2"))),
    ("other", "GET", "/fhir/Observation?patient={P3}", None, 200, types("Observation")),
    ("other", "GET", "/fhir/Condition", None, 200,
     both(types("Condition"), nothing_of("P1"), nothing_of("P2"))),
    ("p1", "GET", "/fhir/Observation?patient={P2}", None, 403, nothing_of("P2")),
    ("p1", "GET", "/fhir/Observation", None, 200, both(types("Observation"),
                                                       nothing_of("P2"))),
    ("phys_obs", "GET", "/fhir/Condition?patient={P1}", None, 403, says("scopes")),
    ("p1_consent", "GET", "/fhir/Observation?patient={P1}", None, 403, says("scopes")),
    ("orgA", "GET", "/fhir/Observation?patient={P1}", None, 403, None),
    ("anon", "GET", "/fhir/Observation?patient={P1}", None, 401, None),
    # -- $everything: scopes checked per returned resource type
    # (the physician gets every type too: the PSY records of each are withheld, named)
    ("phys", "GET", "/fhir/Patient/{P1}/$everything", None, 200,
     both(all_types("P1"), names("P1_psy", "P1_phq"))),
    ("psych", "GET", "/fhir/Patient/{P1}/$everything", None, 200, all_types("P1")),
    ("phys_obs", "GET", "/fhir/Patient/{P1}/$everything", None, 200,
     both(types("Observation"), says("records withheld"))),
    ("p1", "GET", "/fhir/Patient/{P1}/$everything", None, 200, all_types("P1")),
    ("p1_consent", "GET", "/fhir/Patient/{P1}/$everything", None, 200, types()),
    ("other", "GET", "/fhir/Patient/{P1}/$everything", None, 200,
     both(types(), counted_only("P1"))),
    ("other", "GET", "/fhir/Patient/{P3}/$everything", None, 200, all_types("P3")),
    ("nurse", "GET", "/fhir/Patient/{P2}/$everything", None, 200,
     both(types(), counted_only("P2"))),
    ("p1", "GET", "/fhir/Patient/{P2}/$everything", None, 403, nothing_of("P2")),
    ("orgA", "GET", "/fhir/Patient/{P1}/$everything", None, 403, None),
    # -- $summary
    ("phys", "GET", "/fhir/Patient/{P1}/$summary", None, 200, None),
    ("p1", "GET", "/fhir/Patient/{P1}/$summary", None, 200, None),
    ("phys_obs", "GET", "/fhir/Patient/{P1}/$summary", None, 403, None),
    ("p1_consent", "GET", "/fhir/Patient/{P1}/$summary", None, 403, None),
    ("other", "GET", "/fhir/Patient/{P1}/$summary", None, 403, nothing_of("P1")),
    ("other", "GET", "/fhir/Patient/{P3}/$summary", None, 200, None),
    # -- sealed export (the patient's own key opens it)
    ("p1", "GET", "/ledger/patients/{P1}/sealed", None, 200, None),
    ("p1", "GET", "/ledger/patients/{P2}/sealed", None, 403, None),
    ("phys", "GET", "/ledger/patients/{P1}/sealed", None, 403, None),
    ("orgA", "GET", "/ledger/patients/{P1}/sealed", None, 403, None),
    # -- consent rules: read and change
    ("phys", "GET", "/fhir/Consent?patient={P3}", None, 200, None),
    ("other", "GET", "/fhir/Consent?patient={P3}", None, 403, None),
    ("p3", "GET", "/fhir/Consent?patient={P3}", None, 200, None),
    ("p1", "GET", "/fhir/Consent?patient={P3}", None, 403, None),
    ("p1_consent", "GET", "/fhir/Consent?patient={P1}", None, 200, None),
    ("orgA", "GET", "/fhir/Consent?patient={P3}", None, 200, None),
    ("orgB", "GET", "/fhir/Consent?patient={P3}", None, 403, None),
    ("p1_login", "POST", "/fhir/Consent", "consent_p1", 201, None),
    ("phys", "POST", "/fhir/Consent", "consent_p1", 403, None),
    ("p1", "POST", "/fhir/Consent", "consent_p1", 403, says("no patient key")),
    # -- the access log
    ("p1", "GET", "/fhir/AuditEvent?patient={P1}", None, 200, None),
    ("p1_consent", "GET", "/fhir/AuditEvent?patient={P1}", None, 403, says("scopes")),
    ("phys", "GET", "/fhir/AuditEvent?patient={P1}", None, 403, None),
    ("other", "GET", "/fhir/AuditEvent?patient={P1}", None, 403, None),
    ("orgA", "GET", "/fhir/AuditEvent?patient={P1}", None, 200, None),
    ("orgB", "GET", "/fhir/AuditEvent?patient={P1}", None, 403, None),
    ("p2", "GET", "/fhir/AuditEvent?patient={P1}", None, 403, None),
    # -- $match: only patients the practitioner may see
    ("phys", "POST", "/fhir/Patient/$match", "match_P1", 200, match_ids("P1")),
    ("other", "POST", "/fhir/Patient/$match", "match_P1", 200, match_ids()),
    ("other", "POST", "/fhir/Patient/$match", "match_P3", 200, match_ids("P3")),
    ("clerk", "POST", "/fhir/Patient/$match", "match_P2", 200, match_ids()),
    ("phys_obs", "POST", "/fhir/Patient/$match", "match_P1", 403, None),
    ("p1", "POST", "/fhir/Patient/$match", "match_P1", 403, None),
    ("orgA", "POST", "/fhir/Patient/$match", "match_P1", 403, None),
    # -- registration: duplicates named only to those who may see the patient
    ("phys", "POST", "/fhir/Patient", "dup_P1", 409, says("Patient/{P1}")),
    ("clerk", "POST", "/fhir/Patient", "dup_P1", 409, says("Patient/{P1}")),
    ("clerk", "POST", "/fhir/Patient", "dup_P2", 409,
     both(says("not visible to you"), nothing_of("P2"))),
    ("nurse", "POST", "/fhir/Patient", "dup_P1", 403, nothing_of("P1")),
    ("other", "POST", "/fhir/Patient", "dup_P3", 403, None),
    ("p1", "POST", "/fhir/Patient", "dup_P1", 403, None),
    ("phys_obs", "POST", "/fhir/Patient", "dup_P1", 403, says("scopes")),
    # -- writes and overwrites
    ("phys", "POST", "/fhir/Observation", "vital", 201, None),
    ("nurse", "POST", "/fhir/Observation", "vital", 201, None),
    ("orgA", "POST", "/fhir/Observation", "vital", 201, None),
    ("clerk", "POST", "/fhir/Observation", "vital", 403, None),
    ("nurse", "POST", "/fhir/Observation", "vital_p2", 403, says("consent")),
    ("other", "POST", "/fhir/Observation", "vital", 403, says("own organisation")),
    ("p1", "POST", "/fhir/Observation", "vital", 403, None),
    ("phys_obs", "POST", "/fhir/Observation", "vital", 403, says("scopes")),
    ("phys", "PUT", R % "P1_psy", "psy_edit_phys", 403, says("break the glass")),
    ("nurse", "PUT", R % "P1_psy", "psy_edit_nurse", 403, None),
    ("psych", "PUT", R % "P1_psy", "psy_edit_psych", 200, None),
    # -- share links: created by the patient with their own key
    ("p1_login", "POST", "/api/shares", "share", 201, None),
    ("p1", "POST", "/api/shares", "share", 403, says("no patient key")),
    ("phys", "POST", "/api/shares", "share", 403, None),
    ("anon", "POST", "/api/shares", "share", 401, None),
    # -- the members-only ledger
    ("anon", "GET", "/ledger/status", None, 200, nothing_of("P1")),
    ("anon", "GET", "/ledger/blocks/1", None, 401, None),
    ("orgA", "GET", "/ledger/blocks/1", None, 200, with_txs),
    ("orgB", "GET", "/ledger/blocks/1", None, 200, with_txs),
    ("phys", "GET", "/ledger/blocks/1", None, 200, header_only),
    ("p1", "GET", "/ledger/blocks/1", None, 200, header_only),
    ("anon", "GET", "/ledger/proof/tx/{P1_tx}", None, 401, None),
    ("orgA", "GET", "/ledger/proof/tx/{P1_tx}", None, 200, None),
    ("orgB", "GET", "/ledger/proof/tx/{P1_tx}", None, 200, None),
    ("p1", "GET", "/ledger/proof/tx/{P1_tx}", None, 200, None),
    ("p2", "GET", "/ledger/proof/tx/{P1_tx}", None, 403, nothing_of("P1")),
    ("phys", "GET", "/ledger/proof/tx/{P1_tx}", None, 403, None),
    ("other", "GET", "/ledger/proof/tx/{P2_tx}", None, 403, None),
    ("anon", "GET", "/ledger/proof/audit/{P1_event}", None, 401, None),
    ("orgB", "GET", "/ledger/proof/audit/{P1_event}", None, 200, None),
    ("p1", "GET", "/ledger/proof/audit/{P1_event}", None, 200, None),
    ("p1", "GET", "/ledger/proof/audit/{P2_event}", None, 403, None),
    ("phys", "GET", "/ledger/proof/audit/{P1_event}", None, 403, None),
    ("anon", "GET", "/ledger/orgs", None, 200, public_orgs),
    ("orgB", "GET", "/ledger/orgs", None, 200, full_orgs),
    ("anon", "POST", "/ledger/tx", "tx_p1", 401, None),
    ("p1", "POST", "/ledger/tx", "tx_p1", 200, None),
    ("orgB", "POST", "/ledger/tx", "tx_p1", 200, None),
    ("phys", "POST", "/ledger/tx", "tx_p1", 403, None),
    ("p2", "POST", "/ledger/tx", "tx_p1", 403, None),
    ("orgB", "POST", "/replica/blobs", "blobs", 200, None),
    ("orgA", "POST", "/replica/blobs", "blobs", 403, None),
    ("phys", "POST", "/replica/blobs", "blobs", 403, None),
    ("anon", "POST", "/replica/blobs", "blobs", 401, None),
]


def _row_id(row: Row) -> str:
    who, method, path, body, status, _ = row
    return f"{who}-{method}-{path.split('?')[0].strip('/')}-{body or ''}-{status}"


@pytest.mark.parametrize("row", ROWS, ids=[_row_id(r) for r in ROWS])
def test_matrix(world: World, row: Row) -> None:
    who, method, path, body_kind, status, check = row
    url = world.node.url + path.format(**world.refs)
    token = world.token(who)
    headers = {"Content-Type": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body_kind and body_kind.startswith("tx_"):
        headers["Content-Type"] = "application/octet-stream"
    content = _body(body_kind, world) if body_kind else None
    resp = httpx.request(method, url, headers=headers, content=content, timeout=60)
    assert resp.status_code == status, f"{who} {method} {path}: {resp.status_code} {resp.text}"
    if check is not None:
        check(world, resp)


def test_every_probe_is_in_the_patients_log(world: World) -> None:
    """The counted-only answers above (searches, $everything, reads, a duplicate
    registration by a clerk the patient denied) are all in P2's access log."""
    with Client(world.node.url, world.patients["P2"]) as c:
        events = c.get("/api/access-log?count=1000")
    by = {(e["agent"], e["subtype"]) for e in events}
    assert ("nurse-joy", "read") in by and ("nurse-joy", "search") in by
    assert ("nurse-joy", "everything") in by
    assert ("clerk-bob", "register") in by  # the duplicate probe
    assert ("dr-other", "read") in by
    denied = [e for e in events if e["agent"] == "dr-other" and e["outcome"] != "0"]
    assert denied and all("deny" in e["reason"] or "consent" in e["reason"] for e in denied)
