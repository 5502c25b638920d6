"""Bulk loading through transaction Bundles, and every malformed input answered clearly."""

from __future__ import annotations

import copy
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from helpers import NodeHandle, assert_outcome, load_patient, running_node

from medledger.fhir.synthetic import synthetic_observation, synthetic_patient_bundle

pytestmark = pytest.mark.timeout(120)
MAX_BODY = 3_000_000


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("bundle") / "home", max_body_bytes=MAX_BODY,
                      max_bundle_bytes=MAX_BODY) as n:
        yield n


def _post(node: NodeHandle, path: str, body: Any, who: str = "dr-house") -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    with node.client(who) as c:
        return c.http.post(path, content=content, timeout=120, headers={
            "Authorization": f"Bearer {c.token()}", "Content-Type": "application/fhir+json"})


def _counts(node: NodeHandle) -> dict[str, int]:
    db = sqlite3.connect(f"file:{node.home / 'ledger.db'}?mode=ro", uri=True)
    try:
        return {p: db.execute("SELECT count(*) FROM state WHERE key LIKE ?", (p + "%",)
                              ).fetchone()[0] for p in ("rec/", "actor/", "pat/", "v/")}
    finally:
        db.close()


def test_bulk_transaction_bundle(node: NodeHandle) -> None:
    bundle = synthetic_patient_bundle(10, n_encounters=40)
    n = len(bundle["entry"])
    assert n >= 300
    start = time.perf_counter()
    resp = _post(node, "/fhir", bundle)
    took = time.perf_counter() - start
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["type"] == "transaction-response" and len(doc["entry"]) == n
    assert all(e["response"]["status"] == "201 Created" for e in doc["entry"])
    assert took < 30, f"{n} resources took {took:.1f}s"
    pid = bundle["entry"][0]["resource"]["id"]
    with node.client("dr-freud") as c:  # a psychiatrist sees every category and PSY
        everything = c.get(f"/fhir/Patient/{pid}/$everything")
        got = {e["resource"]["id"]: e["resource"] for e in everything["entry"]
               if e["search"]["mode"] == "match"}
        assert set(got) == {e["resource"]["id"] for e in bundle["entry"]}
        some = bundle["entry"][123]["resource"]
        read = c.get(f"/fhir/{some['resourceType']}/{some['id']}")
        assert read["id"] == some["id"] and read["meta"]["versionId"] == "1"
        # urn:uuid references were rewritten to the stored ids
        assert read.get("subject", {}).get("reference", f"Patient/{pid}") == f"Patient/{pid}"
    # posting the same bundle again is idempotent: no new versions
    again = _post(node, "/fhir", bundle)
    assert again.status_code == 200, again.text
    assert all(e["response"]["status"] == "200 OK" and e["response"]["etag"] == 'W/"1"'
               for e in again.json()["entry"])


def test_batch_decides_each_kind_of_record_on_its_own(node: NodeHandle) -> None:
    """A Bundle's policy decisions on new records are taken once per patient and kind of
    record: a nurse's allergy and vital signs are written, the Condition between them is
    refused, and a Condition about the same patient by a physician is written."""
    bundle = load_patient(node, 31)
    pid = bundle["entry"][0]["resource"]["id"]
    allergy, condition = (copy.deepcopy(next(e["resource"] for e in bundle["entry"]
                                             if e["resource"]["resourceType"] == rtype))
                          for rtype in ("AllergyIntolerance", "Condition"))
    condition.pop("encounter", None)
    condition["subject"] = allergy["patient"] = {"reference": f"Patient/{pid}"}

    def put(resource: dict[str, Any], rid: str) -> dict[str, Any]:
        rtype = resource["resourceType"]
        return {"resource": {**resource, "id": rid},
                "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}

    entries = [put(allergy, "memo-a1"), put(condition, "memo-c1"),
               put(synthetic_observation(pid, 2), "memo-v2")]
    resp = _post(node, "/fhir", {"resourceType": "Bundle", "type": "batch", "entry": entries},
                 who="nurse-joy")
    assert resp.status_code == 200, resp.text
    statuses = [e["response"]["status"] for e in resp.json()["entry"]]
    assert statuses[0].startswith("201") and statuses[2].startswith("201"), statuses
    assert statuses[1].startswith("403"), statuses
    # a transaction is refused by the node's own check, which names the entry (the
    # ledger, which decides again, would refuse the whole tx without naming it)
    resp = _post(node, "/fhir", {"resourceType": "Bundle", "type": "transaction",
                                 "entry": [put(allergy, "memo-a2"), put(condition, "memo-c2")]},
                 who="nurse-joy")
    assert_outcome(resp, 403, "Bundle.entry[1]")
    resp = _post(node, "/fhir", {"resourceType": "Bundle", "type": "batch",
                                 "entry": [put(condition, "memo-c1")]})
    assert resp.json()["entry"][0]["response"]["status"].startswith("201"), resp.text


def _bad_entry_bundle(seed: int, index: int, mutate: Any) -> dict[str, Any]:
    bundle = synthetic_patient_bundle(seed, n_encounters=4)
    mutate(bundle["entry"][index]["resource"])
    return bundle


def _assert_nothing_stored(node: NodeHandle, bundle: dict[str, Any],
                           before: dict[str, int]) -> None:
    assert _counts(node) == before
    pid = bundle["entry"][0]["resource"]["id"]
    with node.client("dr-house") as c:
        resp = c.http.get(f"/fhir/Patient/{pid}", headers={"Authorization": f"Bearer {c.token()}"})
    assert resp.status_code == 404
    assert not (node.home / "keystores" / "users" / f"{pid}.json").exists(), \
        "a refused bundle left a keystore for a patient that was never registered"


def test_invalid_entry_rejects_whole_bundle(node: NodeHandle) -> None:
    bundle = _bad_entry_bundle(11, 17, lambda r: r.update(status="bogus"))
    before = _counts(node)
    resp = _post(node, "/fhir", bundle)
    assert_outcome(resp, 400, "Bundle.entry[17]", "status")
    _assert_nothing_stored(node, bundle, before)


def test_entry_without_patient_rejects_whole_bundle(node: NodeHandle) -> None:
    bundle = _bad_entry_bundle(12, 20, lambda r: r.pop("subject"))
    before = _counts(node)
    resp = _post(node, "/fhir", bundle)
    assert_outcome(resp, 400, "Bundle.entry[20]", "patient")
    _assert_nothing_stored(node, bundle, before)


def test_malformed_json(node: NodeHandle) -> None:
    assert_outcome(_post(node, "/fhir", b'{"resourceType": "Bundle", '), 400, "JSON")
    assert_outcome(_post(node, "/fhir/Observation", b"[1,2"), 400, "JSON")
    assert_outcome(_post(node, "/fhir/Observation", b""), 400)


def test_wrong_resource_types(node: NodeHandle) -> None:
    obs = synthetic_observation("nobody", 1)
    assert_outcome(_post(node, "/fhir", obs), 400, "Bundle")
    pat = synthetic_patient_bundle(13)["entry"][0]["resource"]
    assert_outcome(_post(node, "/fhir/Observation", pat), 400, "Patient")
    assert_outcome(_post(node, "/fhir/NotAType", obs), 400, "NotAType")
    assert_outcome(_post(node, "/fhir/lowercase", obs), 400, "lowercase")
    collection = {"resourceType": "Bundle", "type": "collection", "entry": []}
    assert_outcome(_post(node, "/fhir", collection), 400, "transaction")


def test_invalid_fhir_names_the_field(node: NodeHandle) -> None:
    obs = synthetic_observation("nobody", 2)
    bad = copy.deepcopy(obs)
    bad["status"] = "bogus"
    assert_outcome(_post(node, "/fhir/Observation", bad), 400, "Observation.status")
    bad = copy.deepcopy(obs)
    bad["valueQuantity"]["value"] = "seventy"
    assert_outcome(_post(node, "/fhir/Observation", bad), 400, "Observation.valueQuantity.value")


def test_oversize_body(node: NodeHandle) -> None:
    body = b'{"resourceType": "Bundle", "type": "transaction", "entry": [' + b" " * (
        MAX_BODY + 10) + b"]}"
    assert_outcome(_post(node, "/fhir", body), 413, str(MAX_BODY))


def test_oversize_chunked_body(node: NodeHandle) -> None:
    """Without a Content-Length the limit must hold too."""
    def chunks() -> Iterator[bytes]:
        yield b'{"resourceType": "Bundle", "type": "transaction", "entry": ['
        for _ in range(40):
            yield b" " * 100_000
        yield b"]}"

    with node.client("dr-house") as c:
        resp = c.http.post("/fhir", content=chunks(), headers={
            "Authorization": f"Bearer {c.token()}", "Content-Type": "application/fhir+json"})
    assert_outcome(resp, 413)
