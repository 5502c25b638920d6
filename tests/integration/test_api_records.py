"""Encrypted, versioned records over FHIR REST on a real node: nothing readable at rest,
history/vread/If-Match/idempotent and conflicting updates, search, $everything."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from helpers import NodeHandle, assert_outcome, running_node

from medledger.fhir.synthetic import synthetic_observation, synthetic_patient_bundle

pytestmark = pytest.mark.timeout(120)
SEEDS = (0, 1)  # seed 1 has depression: PHQ-9 Observations and a PSY-labelled Condition


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("records") / "home", patients=len(SEEDS)) as n:
        yield n


@pytest.fixture(scope="module")
def bundles() -> list[dict[str, Any]]:
    return [synthetic_patient_bundle(s, n_encounters=4) for s in SEEDS]


def _resources(bundle: dict[str, Any], rtype: str | None = None) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"]
            if rtype is None or e["resource"]["resourceType"] == rtype]


def _ids(searchset: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in searchset.get("entry", [])
            if e["search"]["mode"] == "match"}


def _withheld(searchset: dict[str, Any]) -> list[str]:
    return [i["diagnostics"] for e in searchset.get("entry", []) if e["search"]["mode"] ==
            "outcome" for i in e["resource"]["issue"]]


# ---------------------------------------------------------------- nothing in plaintext at rest

def _phi_needles(bundle: dict[str, Any]) -> set[bytes]:
    patient = _resources(bundle, "Patient")[0]
    needles: set[str] = set()
    for name in patient["name"]:
        needles.add(name["family"])
        needles.update(name.get("given", []))
    needles.add(patient["birthDate"])
    needles.update(i["value"] for i in patient["identifier"] if i["value"] != patient["id"])
    needles.update(t["value"] for t in patient.get("telecom", []))
    needles.update(line for a in patient.get("address", []) for line in a.get("line", []))
    for r in _resources(bundle):
        if r["resourceType"] == "Patient":
            continue
        for key in ("code", "vaccineCode", "medicationCodeableConcept"):
            for coding in (r.get(key) or {}).get("coding", []):
                if len(coding["code"]) >= 5:  # "113" (a CVX code) is not distinctive
                    needles.add(coding["code"])
                needles.add(coding.get("display", "") if len(coding.get("display", "")) > 6
                            else "")
        if "valueQuantity" in r:
            needles.add(orjson.dumps(r["valueQuantity"]).decode()[1:-1])
            needles.add(json.dumps(r["valueQuantity"])[1:-1])
        if "text" in r:
            needles.add(r["text"]["div"][45:85])  # the narrative, past the xmlns
    needles.discard("")
    return {n.encode() for n in needles}


def test_no_plaintext_phi_at_rest(node: NodeHandle, bundles: list[dict[str, Any]]) -> None:
    needles = set().union(*(_phi_needles(b) for b in bundles))
    for code in (b"8867-4", b"44261-6", b"35489007", b"38341003"):
        assert code in needles or code == b"35489007" and SEEDS != (0, 1)
    files = [p for p in node.home.rglob("*") if p.is_file()] + [node.log_path]
    assert any(p.name == "ledger.db" for p in files)
    assert any(p.name == "ledger.db-wal" for p in files), "expected a WAL file while running"
    leaks = []
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            # a needle of 4-5 bytes (a given name) turns up by chance in a few MB of
            # ciphertext (~1e-3 per needle per MB): in the stores it is looked for as a
            # JSON string (the form a record's plaintext takes; the longer needles of the
            # same record are looked for bare); in the node's log, bare
            form = needle if len(needle) >= 6 or path == node.log_path else b'"%s"' % needle
            if form in data:
                leaks.append(f"{path.relative_to(node.home.parent)}: {needle.decode()!r}")
    assert not leaks, "plaintext PHI at rest:\n" + "\n".join(sorted(leaks)[:40])


def test_policy_metadata_is_plaintext(node: NodeHandle) -> None:
    """Sanity check of the scan itself: the allowed metadata is found where expected."""
    data = (node.home / "ledger.db").read_bytes() + (node.home / "ledger.db-wal").read_bytes()
    assert b"vital-signs" in data and node.patients[0].encode() in data


# ---------------------------------------------------------------- versions

def test_create_update_history_vread(node: NodeHandle) -> None:
    pid = node.patients[0]
    obs = synthetic_observation(pid, 101)
    obs.pop("id", None)
    with node.client("dr-house") as c:
        r1 = c.request("POST", "/fhir/Observation", obs)
        assert r1.status_code == 201
        v1 = r1.json()
        rid = v1["id"]
        assert v1["meta"]["versionId"] == "1" and r1.headers["etag"] == 'W/"1"'
        assert r1.headers["location"].endswith(f"/Observation/{rid}/_history/1")
        changed = {**v1, "valueQuantity": {**v1["valueQuantity"], "value": 123}}
        r2 = c.request("PUT", f"/fhir/Observation/{rid}", changed,
                       headers={"If-Match": 'W/"1"'})
        assert r2.status_code == 200 and r2.json()["meta"]["versionId"] == "2"
        hist = c.get(f"/fhir/Observation/{rid}/_history")
        assert hist["type"] == "history" and hist["total"] == 2
        assert [e["resource"]["meta"]["versionId"] for e in hist["entry"]] == ["2", "1"]
        assert [e["request"]["method"] for e in hist["entry"]] == ["PUT", "POST"]
        one = c.get(f"/fhir/Observation/{rid}/_history/1")
        two = c.get(f"/fhir/Observation/{rid}/_history/2")
        assert one["valueQuantity"]["value"] == obs["valueQuantity"]["value"]
        assert two["valueQuantity"]["value"] == 123
        assert c.get(f"/fhir/Observation/{rid}")["meta"]["versionId"] == "2"

        # a stale If-Match is refused
        stale = c.http.put(f"/fhir/Observation/{rid}", content=orjson.dumps(changed),
                           headers={"If-Match": 'W/"1"', "Authorization": f"Bearer {c.token()}",
                                    "Content-Type": "application/fhir+json"})
        assert_outcome(stale, 412, "If-Match version 1", "version 2")
        # identical content: no new version
        same = c.request("PUT", f"/fhir/Observation/{rid}", changed)
        assert same.status_code == 200 and same.json()["meta"]["versionId"] == "2"
        assert c.get(f"/fhir/Observation/{rid}/_history")["total"] == 2
        missing = c.http.get(f"/fhir/Observation/{rid}/_history/7",
                             headers={"Authorization": f"Bearer {c.token()}"})
        assert_outcome(missing, 404, "version 7")


def test_concurrent_conflicting_updates(node: NodeHandle) -> None:
    pid = node.patients[0]
    obs = synthetic_observation(pid, 202)
    with node.client("dr-house") as c:
        created = c.request("PUT", f"/fhir/Observation/{obs['id']}", obs)
        assert created.status_code == 201, created.text
        token = c.token()
    results: list[httpx.Response] = []
    barrier = threading.Barrier(2)

    def put(value: int) -> None:
        body = {**obs, "valueQuantity": {**obs["valueQuantity"], "value": value}}
        with httpx.Client(base_url=node.url, timeout=30) as h:
            barrier.wait()
            results.append(h.put(f"/fhir/Observation/{obs['id']}", content=orjson.dumps(body),
                                 headers={"If-Match": 'W/"1"', "Authorization":
                                          f"Bearer {token}",
                                          "Content-Type": "application/fhir+json"}))

    threads = [threading.Thread(target=put, args=(v,)) for v in (61, 62)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes[0] == 200 and codes[1] in (409, 412), [r.text for r in results]
    loser = next(r for r in results if r.status_code != 200)
    assert_outcome(loser, loser.status_code, "version")
    with node.client("dr-house") as c:
        assert c.get(f"/fhir/Observation/{obs['id']}/_history")["total"] == 2


def test_concurrent_writes_each_get_their_own_validation_outcome(node: NodeHandle) -> None:
    # writes arriving together are validated in one worker-pool job: each must still get
    # its own answer (its resource, or the error about its own content)
    import asyncio

    pid = node.patients[0]
    with node.client("dr-house") as c:
        token = c.token()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    bodies = []
    for i in range(16):
        obs = synthetic_observation(pid, 900 + i)
        value: Any = 60 + i if i % 2 == 0 else f"bad-value-{i:02d}"
        bodies.append({**obs, "valueQuantity": {**obs["valueQuantity"], "value": value}})

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=node.url, timeout=30) as h:
            return await asyncio.gather(*(h.post("/fhir/Observation", content=orjson.dumps(b),
                                                 headers=headers) for b in bodies))

    for i, resp in enumerate(asyncio.run(send_all())):
        if i % 2 == 0:
            assert resp.status_code == 201, resp.text
            assert resp.json()["valueQuantity"]["value"] == 60 + i
        else:
            text = assert_outcome(resp, 400, f"bad-value-{i:02d}")
            assert not any(f"bad-value-{j:02d}" in text for j in range(1, 16, 2) if j != i)


def test_readyz_says_how_far_the_search_index_has_come(node: NodeHandle) -> None:
    # informational (searches wait for the index, writes do not): a benchmark or an
    # operator can tell a node still indexing its records at start from one caught up
    with node.client("dr-house") as c:
        created = c.request("POST", "/fhir/Observation",
                            synthetic_observation(node.patients[0], 777))
        assert created.status_code == 201, created.text
    deadline = time.monotonic() + 30
    while True:
        doc = httpx.get(node.url + "/readyz", timeout=10).json()
        assert doc["status"] == "ready" and 0 <= doc["search_index_height"] <= doc["height"]
        if doc["search_index_height"] == doc["height"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert doc["search_index_height"] == doc["height"] > 0


def test_put_id_mismatch(node: NodeHandle) -> None:
    obs = synthetic_observation(node.patients[0], 303)
    with node.client("dr-house") as c:
        resp = c.http.put("/fhir/Observation/some-other-id", content=orjson.dumps(obs),
                          headers={"Authorization": f"Bearer {c.token()}"})
    assert_outcome(resp, 400, "does not match the URL id")


def test_delete_is_refused(node: NodeHandle) -> None:
    with node.client("dr-house") as c:
        resp = c.http.delete(f"/fhir/Patient/{node.patients[0]}",
                             headers={"Authorization": f"Bearer {c.token()}"})
    assert resp.status_code in (405, 400, 500) and "never deleted" in resp.text
    assert resp.status_code != 500, "refusing a delete is not an internal error"


def test_directory_records_follow_the_patient_compartment(node: NodeHandle) -> None:
    """A type outside every patient compartment (here SpecimenDefinition, which no
    hand list named) and a CareTeam naming no patient are directory records that any
    staff member reads; a Binary or an Observation naming no patient is refused."""
    spec = {"resourceType": "SpecimenDefinition", "id": "serum-tube",
            "typeCollected": {"text": "Serum"}}
    team = {"resourceType": "CareTeam", "id": "night-shift", "status": "active",
            "name": "Night shift, ward 3"}
    with node.client("dr-house") as c:
        for r in (spec, team):
            resp = c.http.put(f"/fhir/{r['resourceType']}/{r['id']}", content=orjson.dumps(r),
                              headers={"Authorization": f"Bearer {c.token()}"})
            assert resp.status_code == 201, resp.text
        binary = {"resourceType": "Binary", "id": "scan", "contentType": "text/plain",
                  "data": "aGVsbG8="}
        orphan = {**synthetic_observation(node.patients[0], 404), "id": "orphan"}
        del orphan["subject"]
        for r in (binary, orphan):
            resp = c.http.put(f"/fhir/{r['resourceType']}/{r['id']}", content=orjson.dumps(r),
                              headers={"Authorization": f"Bearer {c.token()}"})
            assert_outcome(resp, 400, "must reference its patient")
    with node.client("nurse-joy") as c:
        assert c.get("/fhir/SpecimenDefinition/serum-tube")["typeCollected"] == {
            "text": "Serum"}
        assert c.get("/fhir/CareTeam/night-shift")["name"] == "Night shift, ward 3"


# ---------------------------------------------------------------- search

def _effective(r: dict[str, Any]) -> str:
    return str(r.get("effectiveDateTime") or "")


def test_search_by_patient_category_code_date(node: NodeHandle,
                                              bundles: list[dict[str, Any]]) -> None:
    pid = node.patients[0]
    observations = _resources(bundles[0], "Observation")
    vitals = {o["id"] for o in observations if o["category"][0]["coding"][0]["code"] ==
              "vital-signs"}
    labs = {o["id"] for o in observations if o["category"][0]["coding"][0]["code"] ==
            "laboratory"}
    heart = {o["id"] for o in observations if o["code"]["coding"][0]["code"] == "8867-4"}
    with node.client("dr-house") as c:
        by_patient = c.get(f"/fhir/Observation?patient={pid}")
        found = _ids(by_patient)
        assert {o["id"] for o in observations} <= found
        assert all(e["resource"]["subject"]["reference"].endswith(pid)
                   for e in by_patient["entry"])
        other = c.get(f"/fhir/Observation?patient=Patient/{node.patients[1]}")
        assert not (_ids(other) & found)
        assert _ids(c.get(f"/fhir/Observation?patient={pid}&category=vital-signs")) >= vitals
        assert not (_ids(c.get(f"/fhir/Observation?patient={pid}&category=vital-signs"))
                    & labs)
        assert _ids(c.get(f"/fhir/Observation?patient={pid}&category=laboratory")) == labs
        assert _ids(c.get(f"/fhir/Observation?patient={pid}&code=8867-4")) >= heart
        assert _ids(c.get(f"/fhir/Observation?patient={pid}&code=http://loinc.org|8867-4")
                    ) >= heart
        assert not _ids(c.get(f"/fhir/Observation?patient={pid}&code=0000-0"))
        dates = sorted({_effective(o)[:10] for o in observations})
        lo, hi = dates[1], dates[-2]
        want = {o["id"] for o in observations if lo <= _effective(o)[:10] <= hi}
        got = _ids(c.get(f"/fhir/Observation?patient={pid}&date=ge{lo}&date=le{hi}"))
        got_ours = got & {o["id"] for o in observations}
        assert got_ours == want, "date=ge..&date=le.. must intersect both bounds"
        only_ge = _ids(c.get(f"/fhir/Observation?patient={pid}&date=ge{hi}")) & {
            o["id"] for o in observations}
        assert only_ge == {o["id"] for o in observations if _effective(o)[:10] >= hi}
        counted = c.get(f"/fhir/Observation?patient={pid}&_count=3")
        assert len(_ids(counted)) == 3
        everything = c.get(f"/fhir/Observation?patient={pid}")
        assert counted["total"] == everything["total"] == len(_ids(everything)) > 3


def test_search_bad_parameters(node: NodeHandle) -> None:
    with node.client("dr-house") as c:
        hdr = {"Authorization": f"Bearer {c.token()}"}
        lenient = c.get("/fhir/Observation?colour=red&_count=1")  # ignored and reported
        notes = [i["diagnostics"] for e in lenient["entry"] if e["search"]["mode"] == "outcome"
                 for i in e["resource"]["issue"]]
        assert any("'colour'" in n and "ignored" in n for n in notes)
        assert_outcome(c.http.get("/fhir/Observation?colour=red", headers={
            **hdr, "Prefer": "handling=strict"}), 400, "unknown search parameter", "colour")
        assert_outcome(c.http.get(f"/fhir/Observation?patient={node.patients[0]}&date=soon",
                                  headers=hdr), 400, "bad date")
        assert_outcome(c.http.get(f"/fhir/Observation?patient={node.patients[0]}&_count=x",
                                  headers=hdr), 400, "_count")


def test_everything_returns_everything_permitted(node: NodeHandle,
                                                bundles: list[dict[str, Any]]) -> None:
    psy_pid = node.patients[1]
    all_ids = {r["id"] for r in _resources(bundles[1])}
    psy_ids = {r["id"] for r in _resources(bundles[1])
               if "44261-6" in json.dumps(r.get("code")) or "35489007" in json.dumps(r.get("code"))
               or "sertraline" in json.dumps(r.get("medicationCodeableConcept"))}
    assert psy_ids
    with node.client("dr-freud") as c:
        everything = c.get(f"/fhir/Patient/{psy_pid}/$everything")
        assert _ids(everything) == all_ids
        assert not _withheld(everything)
    with node.client("dr-house") as c:
        everything = c.get(f"/fhir/Patient/{psy_pid}/$everything")
        got = _ids(everything)
        assert got <= all_ids and not (got & psy_ids)
        assert all_ids - psy_ids <= got
        withheld = _withheld(everything)
        assert len(withheld) >= len(psy_ids - got) and all("PSY" in w for w in withheld)
    with node.client("dr-house") as c:
        hdr = {"Authorization": f"Bearer {c.token()}"}
        assert_outcome(c.http.get("/fhir/Patient/no-such-patient/$everything", headers=hdr),
                       404, "no-such-patient")


def test_patient_reads_own_records_only(node: NodeHandle) -> None:
    mine, theirs = node.patients
    with node.login(mine) as h:
        assert h.get(f"/fhir/Patient/{mine}").status_code == 200
        own = h.get(f"/fhir/Patient/{mine}/$everything").json()
        assert len(_ids(own)) > 10
        # another patient's record: refused without saying anything about it
        assert_outcome(h.get(f"/fhir/Patient/{theirs}"), 403, "no access")
        assert_outcome(h.get(f"/fhir/Observation?patient={theirs}"), 403, "own records")


_ = Path
