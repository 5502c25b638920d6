"""FHIR search as real clients use it: ``fhirpy`` against a node loaded with real Synthea
patients. Expectations are computed by hand from the loaded resources: each parameter
type, modifiers and prefixes, chains, _include/_revinclude, _sort, paging to the end,
policy per resource (nurse, psychiatrist, consent deny), the CapabilityStatement, and
no plaintext in the index files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhirpy import SyncFHIRClient
from fhirpy.base.searchset import Raw
from helpers import NodeHandle, assert_outcome, run_cli, running_node
from synthea_compat import load_synthea

from medledger.fhir.labels import classify

pytestmark = pytest.mark.timeout(300)
LOINC = "http://loinc.org"
PSY_CODES = {"44261-6", "55757-9", "70274-6", "69737-5"}  # PHQ-9, PHQ-2, GAD-7


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_node(tmp_path_factory.mktemp("fhirpy") / "home") as node:
        data = {name: load_synthea(node, name) for name in ("lavern", "audie")}
        yield {"node": node, "data": data}


@pytest.fixture(scope="module")
def node(loaded: dict[str, Any]) -> NodeHandle:
    return loaded["node"]  # type: ignore[no-any-return]


def fhir(node: NodeHandle, who: str = "dr-house") -> SyncFHIRClient:
    with node.client(who) as c:
        token = c.token()
    return SyncFHIRClient(f"{node.url}/fhir", authorization=f"Bearer {token}")


def of(loaded: dict[str, Any], name: str, rtype: str) -> list[dict[str, Any]]:
    patient, rest = loaded["data"][name]
    return [patient] if rtype == "Patient" else [r for r in rest if r["resourceType"] == rtype]


def psychiatrist_reads(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Those a psychiatrist may read: every label but PSY and ETH withholds (e.g. HARK's
    SDV, an HIV result)."""
    return [r for r in resources if classify(r).labels <= {"PSY", "ETH"}]


def ids(resources: Any) -> set[str]:
    return {r["id"] for r in resources}


def codes(r: dict[str, Any], field: str = "code") -> set[str]:
    return {c.get("code") for c in (r.get(field) or {}).get("coding", [])}


def effective(r: dict[str, Any]) -> str:
    return str(r.get("effectiveDateTime") or r.get("effectivePeriod", {}).get("start"))


# ------------------------------------------------------------------ Patient

def test_patient_demographics(node: NodeHandle, loaded: dict[str, Any]) -> None:
    client = fhir(node)
    patients = client.resources("Patient")
    for name in ("lavern", "audie"):
        p = of(loaded, name, "Patient")[0]
        family, given = p["name"][0]["family"], p["name"][0]["given"][0]
        assert ids(patients.search(family=family[:4].upper()).fetch_all()) == {p["id"]}
        assert ids(patients.search(given=given.lower()).fetch_all()) == {p["id"]}
        assert ids(patients.search(name=family).fetch_all()) == {p["id"]}
        assert ids(patients.search(family=family, birthdate=p["birthDate"]).fetch_all()
                   ) == {p["id"]}
        assert not patients.search(family=family, birthdate=f"ne{p['birthDate']}").fetch_all()
        assert ids(patients.search(family__exact=family).fetch_all()) == {p["id"]}
        assert not patients.search(family__exact=family.lower()).fetch_all()
        assert ids(patients.search(family__contains=family[2:6]).fetch_all()) >= {p["id"]}
        mrn = next(i for i in p["identifier"] if i.get("type", {}).get("coding", [{}])[0]
                   .get("code") == "MR")
        assert ids(patients.search(identifier=f"{mrn['system']}|{mrn['value']}").fetch_all()
                   ) == {p["id"]}
        assert ids(patients.search(identifier=mrn["value"]).fetch_all()) == {p["id"]}
        city, postal = p["address"][0]["city"], p["address"][0].get("postalCode")
        assert p["id"] in ids(patients.search(**{"address-city": city}).fetch_all())
        if postal:
            assert p["id"] in ids(patients.search(**{"address-postalcode": postal})
                                  .fetch_all())
        phone = p["telecom"][0]["value"]
        assert ids(patients.search(phone=phone).fetch_all()) == {p["id"]}
        assert p["id"] in ids(patients.search(gender=p["gender"]).fetch_all())
        assert ids(patients.search(_id=p["id"]).fetch_all()) == {p["id"]}
    lavern, audie = of(loaded, "lavern", "Patient")[0], of(loaded, "audie", "Patient")[0]
    older = min((lavern, audie), key=lambda x: x["birthDate"])
    younger = max((lavern, audie), key=lambda x: x["birthDate"])
    assert ids(patients.search(birthdate__lt=younger["birthDate"]).fetch_all()) == {
        older["id"]}
    assert ids(patients.search(birthdate__ge=younger["birthDate"]).fetch_all()) == {
        younger["id"]}
    by_birth = [r["id"] for r in patients.sort("-birthdate").fetch_all()]
    assert by_birth == [younger["id"], older["id"]]


# ------------------------------------------------------------------ clinical types

def test_observations_codes_dates_values_and_paging(node: NodeHandle,
                                                    loaded: dict[str, Any]) -> None:
    client = fhir(node, "dr-freud")  # a psychiatrist reads PSY too, not SDV or HIV
    p = of(loaded, "audie", "Patient")[0]
    obs = psychiatrist_reads(of(loaded, "audie", "Observation"))
    withheld = ids(of(loaded, "audie", "Observation")) - ids(obs)
    assert withheld  # HARK screenings (SDV)
    search = client.resources("Observation").search(patient=p["id"])
    walked = search.limit(10).fetch_all()  # follows `next` links to the end
    assert len(walked) == len(obs) and ids(walked) == ids(obs)
    assert search.count() == len(obs)
    code = sorted(c for o in obs for c in codes(o))[0]
    want = {o["id"] for o in obs if code in codes(o)}
    assert ids(search.search(code=f"{LOINC}|{code}").fetch_all()) == want
    assert ids(search.search(code=code).fetch_all()) == want
    assert ids(search.search(code__not=code).fetch_all()) == ids(obs) - want
    cut = sorted(effective(o) for o in obs)[len(obs) // 2][:10]
    assert ids(search.search(date__ge=cut).fetch_all()) == {
        o["id"] for o in obs if effective(o)[:10] >= cut}
    assert ids(search.search(date__lt=cut).fetch_all()) == {
        o["id"] for o in obs if effective(o)[:10] < cut}
    heavy = [o for o in obs if "valueQuantity" in o and o["valueQuantity"].get("code") == "kg"]
    if heavy:
        limit = sorted(o["valueQuantity"]["value"] for o in heavy)[len(heavy) // 2]
        got = search.search(**{"value-quantity": f"gt{limit}|http://unitsofmeasure.org|kg"})
        assert ids(got.fetch_all()) == {o["id"] for o in heavy
                                         if o["valueQuantity"]["value"] > limit}
    bp = [o for o in obs if any("8480-6" in codes(c) for c in o.get("component", []))]
    assert bp
    high = {o["id"] for o in bp for c in o["component"]
            if "8480-6" in codes(c) and c["valueQuantity"]["value"] > 120}
    got = search.search(**{"component-code-value-quantity": "8480-6$gt120"}).fetch_all()
    assert ids(got) == high
    latest = search.sort("-date").limit(5).fetch()
    dates = [datetime.fromisoformat(effective(o)) for o in latest]
    assert dates == sorted(dates, reverse=True)
    assert dates[0] == max(datetime.fromisoformat(effective(o)) for o in obs)
    vitals = {o["id"] for o in obs if any(
        "vital-signs" in codes({"code": c}) for c in o.get("category", []))}
    assert ids(search.search(category="vital-signs").fetch_all()) == vitals


def test_encounters_paging_has_next_links(node: NodeHandle, loaded: dict[str, Any]) -> None:
    client = fhir(node)
    p = of(loaded, "audie", "Patient")[0]
    encounters = of(loaded, "audie", "Encounter")
    page = client.resources("Encounter").search(patient=p["id"]).limit(10)
    raw = page.fetch_raw()
    assert raw["total"] == len(encounters) and len(raw["entry"]) == 10
    assert any(link["relation"] == "next" for link in raw["link"])
    assert ids(page.fetch_all()) == ids(encounters)
    klass = encounters[0]["class"]["code"]
    assert ids(client.resources("Encounter").search(patient=p["id"], **{"class": klass})
               .fetch_all()) == {e["id"] for e in encounters if e["class"]["code"] == klass}
    code = sorted(c["code"] for e in encounters for t in e["type"] for c in t["coding"])[0]
    assert ids(client.resources("Encounter").search(patient=p["id"], type=code).fetch_all()
               ) == {e["id"] for e in encounters
                     if code in {c["code"] for t in e["type"] for c in t["coding"]}}
    assert ids(client.resources("Encounter").search(status="finished", patient=p["id"])
               .fetch_all()) == {e["id"] for e in encounters if e["status"] == "finished"}


def test_chains_includes_and_revincludes(node: NodeHandle, loaded: dict[str, Any]) -> None:
    client = fhir(node, "dr-freud")
    lavern = of(loaded, "lavern", "Patient")[0]
    family = lavern["name"][0]["family"]
    obs = of(loaded, "lavern", "Observation")
    chained = client.resources("Observation").search(Raw(**{"subject:Patient.family": family}))
    assert ids(chained.fetch_all()) == ids(obs)
    assert ids(client.resources("Condition").search(Raw(**{"patient.birthdate":
                                                             lavern["birthDate"]}))
               .fetch_all()) == ids(of(loaded, "lavern", "Condition"))
    enc = of(loaded, "lavern", "Encounter")[0]
    in_enc = {o["id"] for o in obs if o.get("encounter", {}).get("reference") ==
              f"Encounter/{enc['id']}"}
    raw = client.resources("Encounter").search(_id=enc["id"]).revinclude(
        "Observation", "encounter").fetch_raw()
    modes = {(e["resource"]["resourceType"], e["search"]["mode"]) for e in raw["entry"]}
    assert ("Encounter", "match") in modes
    assert {e["resource"]["id"] for e in raw["entry"] if e["search"]["mode"] == "include"
            } == in_enc
    one = obs[0]
    raw = client.resources("Observation").search(_id=one["id"]).include(
        "Observation", "subject").fetch_raw()
    assert [(e["resource"]["resourceType"], e["search"]["mode"]) for e in raw["entry"]] == [
        ("Observation", "match"), ("Patient", "include")]


def test_conditions_medications_claims(node: NodeHandle, loaded: dict[str, Any]) -> None:
    client = fhir(node, "dr-freud")
    p = of(loaded, "audie", "Patient")[0]
    conditions = of(loaded, "audie", "Condition")
    active = {c["id"] for c in conditions if "active" in codes(c, "clinicalStatus")}
    assert ids(client.resources("Condition").search(patient=p["id"],
                                                    **{"clinical-status": "active"})
               .fetch_all()) == active
    onset = sorted(c["onsetDateTime"] for c in conditions)[len(conditions) // 2][:10]
    assert ids(client.resources("Condition").search(patient=p["id"],
                                                    **{"onset-date": f"ge{onset}"})
               .fetch_all()) == {c["id"] for c in conditions if c["onsetDateTime"][:10] >= onset}
    meds = of(loaded, "audie", "MedicationRequest")
    assert ids(client.resources("MedicationRequest").search(patient=p["id"], intent="order")
               .fetch_all()) == {m["id"] for m in meds if m["intent"] == "order"}
    claims = of(loaded, "audie", "Claim")
    assert client.resources("Claim").search(patient=p["id"]).count() == len(claims)
    eobs = of(loaded, "audie", "ExplanationOfBenefit")
    assert ids(client.resources("ExplanationOfBenefit").search(patient=p["id"]).limit(7)
               .fetch_all()) == ids(eobs)
    docs = of(loaded, "audie", "DocumentReference")
    assert client.resources("DocumentReference").search(patient=p["id"]).count() == len(docs)
    immunizations = of(loaded, "audie", "Immunization")
    assert ids(client.resources("Immunization").search(patient=p["id"]).fetch_all()
               ) == ids(immunizations)


def test_summary_elements_total(node: NodeHandle, loaded: dict[str, Any]) -> None:
    p = of(loaded, "lavern", "Patient")[0]
    with node.client("dr-freud") as c:
        counted = c.get(f"/fhir/Procedure?patient={p['id']}&_summary=count")
        assert counted["total"] == len(of(loaded, "lavern", "Procedure"))
        assert "entry" not in counted
        slim = c.get(f"/fhir/Procedure?patient={p['id']}&_elements=code&_count=3")
        for e in slim["entry"]:
            assert set(e["resource"]) <= {"resourceType", "id", "meta", "code"}
        none = c.get(f"/fhir/Procedure?patient={p['id']}&_total=none&_count=3")
        assert "total" not in none


# ------------------------------------------------------------------ policy

def test_policy_is_applied_per_resource(node: NodeHandle, loaded: dict[str, Any]) -> None:
    p = of(loaded, "audie", "Patient")[0]
    obs = of(loaded, "audie", "Observation")
    psy = {o["id"] for o in obs if codes(o) & PSY_CODES}
    assert psy
    nurse = fhir(node, "nurse-joy")
    seen = nurse.resources("Observation").search(patient=p["id"]).limit(50).fetch_all()
    assert not (ids(seen) & psy)
    assert not nurse.resources("Condition").search(patient=p["id"]).fetch_all()
    with node.client("nurse-joy") as c:
        raw = c.get(f"/fhir/Condition?patient={p['id']}")
        withheld = [i["diagnostics"] for e in raw.get("entry", [])
                    if e["search"]["mode"] == "outcome" for i in e["resource"]["issue"]]
        assert withheld and raw["total"] == 0
    physician = fhir(node, "dr-house").resources("Observation").search(patient=p["id"])
    assert not (ids(physician.fetch_all()) & psy)
    psychiatrist = fhir(node, "dr-freud").resources("Observation").search(patient=p["id"])
    assert ids(psychiatrist.fetch_all()) >= psy
    assert psychiatrist.search(code="44261-6").count() == len(
        [o for o in obs if "44261-6" in codes(o)])


def test_consent_deny_hides_records_from_search(node: NodeHandle,
                                                loaded: dict[str, Any]) -> None:
    p = of(loaded, "lavern", "Patient")[0]
    vitals = [o for o in of(loaded, "lavern", "Observation")
              if any("vital-signs" in {c["code"] for c in cat["coding"]}
                     for cat in o.get("category", []))]
    search = fhir(node, "nurse-joy").resources("Observation").search(patient=p["id"])
    assert ids(search.fetch_all()) >= ids(vitals)
    consent = {"resourceType": "Consent", "status": "active",
               "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                               "consentscope", "code": "patient-privacy"}]},
               "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
               "patient": {"reference": f"Patient/{p['id']}"},
               "provision": {"type": "deny", "actor": [{"role": {"coding": [{
                   "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                   "code": "IRCP"}]}, "reference": {"reference": "Practitioner/nurse-joy"}}],
                   "code": [{"coding": [{"system": "http://medledger.example/fhir/CodeSystem/"
                                                   "category", "code": "vital-signs"}]}]}}
    with node.login(p["id"]) as h:
        assert h.post("/fhir/Consent", json=consent).status_code == 201
    after = fhir(node, "nurse-joy").resources("Observation").search(patient=p["id"])
    assert not (ids(after.fetch_all()) & ids(vitals))
    assert ids(fhir(node, "dr-house").resources("Observation").search(patient=p["id"])
               .fetch_all()) >= ids(vitals)


def test_patient_searches_only_own_records(node: NodeHandle, loaded: dict[str, Any]) -> None:
    mine, theirs = of(loaded, "lavern", "Patient")[0], of(loaded, "audie", "Patient")[0]
    with node.login(mine["id"]) as h:
        own = h.get("/fhir/Observation?_count=1000").json()
        got = {e["resource"]["id"] for e in own["entry"] if e["search"]["mode"] == "match"}
        assert got == ids(of(loaded, "lavern", "Observation"))
        assert_outcome(h.get(f"/fhir/Observation?patient={theirs['id']}"), 403, "own records")


# ------------------------------------------------------------------ protocol

def test_unknown_parameters_strict_and_lenient(node: NodeHandle) -> None:
    with node.client("dr-house") as c:
        hdr = {"Authorization": f"Bearer {c.token()}"}
        lenient = httpx.get(f"{node.url}/fhir/Encounter?flavour=x&_count=1", headers=hdr)
        assert lenient.status_code == 200
        assert "flavour" in json.dumps(lenient.json()["entry"][-1]["resource"])
        assert_outcome(httpx.get(f"{node.url}/fhir/Encounter?flavour=x", headers={
            **hdr, "Prefer": "handling=strict"}), 400, "flavour")
        assert_outcome(httpx.get(f"{node.url}/fhir/Encounter?date=tomorrow", headers=hdr),
                       400, "bad date")
        assert_outcome(httpx.get(f"{node.url}/fhir/Encounter?_page=forged", headers=hdr),
                       400, "cursor")


SAMPLE_VALUES = {"string": "a", "token": "x", "date": "ge2020-01-01", "number": "1",
                 "quantity": "gt1", "reference": "Patient/x", "uri": "http://x",
                 "composite": "x$y"}


def test_capability_statement_lists_exactly_what_works(node: NodeHandle) -> None:
    cap = httpx.get(f"{node.url}/fhir/metadata").json()
    resources = {r["type"]: r for r in cap["rest"][0]["resource"]}
    patient = {p["name"]: p["type"] for p in resources["Patient"]["searchParam"]}
    for name, kind in (("family", "string"), ("given", "string"), ("birthdate", "date"),
                       ("identifier", "token"), ("general-practitioner", "reference"),
                       ("_id", "token"), ("_lastUpdated", "date")):
        assert patient[name] == kind
    assert "Observation:subject" in resources["Observation"]["searchInclude"]
    with node.client("dr-house") as c:
        hdr = {"Authorization": f"Bearer {c.token()}", "Prefer": "handling=strict"}
    with httpx.Client(base_url=node.url, headers=hdr, timeout=30) as h:
        for rtype in ("Patient", "Observation", "Encounter", "Condition", "Provenance"):
            for p in resources[rtype]["searchParam"]:
                value = SAMPLE_VALUES[p["type"]]
                if p["type"] == "composite":
                    value = "x$gt1" if "quantity" in p["name"] else (
                        "x$ge2020" if "date" in p["name"] else "x$y")
                resp = h.get(f"/fhir/{rtype}", params={p["name"]: value, "_count": "1"})
                assert resp.status_code == 200, (rtype, p["name"], resp.text)


def test_no_plaintext_in_index_files(node: NodeHandle, loaded: dict[str, Any]) -> None:
    patient = of(loaded, "audie", "Patient")[0]
    needles = {patient["name"][0]["family"], patient["name"][0]["given"][0],
               patient["birthDate"], patient["address"][0]["line"][0],
               patient["telecom"][0]["value"], "44261-6", "Body Weight",
               *(i["value"] for i in patient["identifier"])}
    files = sorted(Path(node.home).glob("index.db*"))
    assert {f.name for f in files} >= {"index.db"}
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, f"{needle!r} in {path.name}"


def test_index_catches_up_and_rebuilds(node: NodeHandle, loaded: dict[str, Any]) -> None:
    """Last in this module: it restarts the node. A deleted index is rebuilt on start
    (catch-up); `medledger index rebuild` recreates it from the ledger."""
    p = of(loaded, "audie", "Patient")[0]
    want = ids(psychiatrist_reads(of(loaded, "audie", "Observation")))

    def observations() -> set[str]:
        return ids(fhir(node, "dr-freud").resources("Observation").search(patient=p["id"])
                   .limit(200).fetch_all())

    assert observations() == want
    node.stop()
    for f in Path(node.home).glob("index.db*"):
        f.unlink()
    node.start()
    assert observations() == want
    node.stop()
    res = run_cli("index", "rebuild", "--home", str(node.home), "--quiet", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "indexed" in res.stdout and "records at height" in res.stdout
    node.start()
    assert observations() == want
