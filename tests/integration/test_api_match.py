"""Patient/$match and duplicate registration on a real node."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from helpers import NodeHandle, assert_outcome, load_patient, running_node

from medledger.fhir.synthetic import synthetic_patient_bundle

pytestmark = pytest.mark.timeout(120)
GRADE_URL = "http://hl7.org/fhir/StructureDefinition/match-grade"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("match") / "home") as n:
        for seed in (0, 1, 2):
            load_patient(n, seed, n_encounters=1)
        yield n


def _patient(seed: int) -> dict[str, Any]:
    return copy.deepcopy(synthetic_patient_bundle(seed, n_encounters=1)["entry"][0]["resource"])


def _post(node: NodeHandle, path: str, body: Any, who: str = "clerk-bob") -> httpx.Response:
    with node.client(who) as c:
        return c.http.post(path, content=orjson.dumps(body), headers={
            "Authorization": f"Bearer {c.token()}", "Content-Type": "application/fhir+json"})


def _params(resource: dict[str, Any], **extra: Any) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": "resource", "resource": resource}]
    if "only_certain" in extra:
        params.append({"name": "onlyCertainMatches", "valueBoolean": extra["only_certain"]})
    if "count" in extra:
        params.append({"name": "count", "valueInteger": extra["count"]})
    return {"resourceType": "Parameters", "parameter": params}


def test_match_returns_scored_searchset(node: NodeHandle) -> None:
    candidate = _patient(0)
    pid = candidate.pop("id")
    resp = _post(node, "/fhir/Patient/$match", _params(candidate))
    assert resp.status_code == 200, resp.text
    bundle = resp.json()
    assert bundle["type"] == "searchset" and bundle["entry"]
    top = bundle["entry"][0]
    assert top["resource"]["id"] == pid and top["search"]["mode"] == "match"
    assert top["search"]["score"] >= 0.95
    assert {"url": GRADE_URL, "valueCode": "certain"} in top["search"]["extension"]
    scores = [e["search"]["score"] for e in bundle["entry"]]
    assert scores == sorted(scores, reverse=True)
    only = _post(node, "/fhir/Patient/$match", _params(candidate, only_certain=True)).json()
    assert [e["resource"]["id"] for e in only["entry"]] == [pid]


def test_match_needs_parameters(node: NodeHandle) -> None:
    assert_outcome(_post(node, "/fhir/Patient/$match", _patient(0)), 400, "Parameters")
    assert_outcome(_post(node, "/fhir/Patient/$match", {"resourceType": "Parameters"}), 400,
                   "resource")


def test_patient_may_not_match(node: NodeHandle) -> None:
    with node.login(node.patients[0]) as h:
        resp = h.post("/fhir/Patient/$match", content=orjson.dumps(_params(_patient(1))))
    assert_outcome(resp, 403, "patient index")


def test_identical_patient_is_refused(node: NodeHandle) -> None:
    again = _patient(1)
    existing = again.pop("id")
    resp = _post(node, "/fhir/Patient", again)
    assert_outcome(resp, 409, f"Patient/{existing}", "Patient.link")
    again["link"] = [{"other": {"reference": f"Patient/{existing}"}, "type": "seealso"}]
    linked = _post(node, "/fhir/Patient", again)
    assert linked.status_code == 201, linked.text
    assert linked.json()["id"] != existing


def test_identical_patient_in_a_bundle_is_refused(node: NodeHandle) -> None:
    patient = _patient(2)
    existing = patient.pop("id")
    new_id = str(uuid.uuid4())  # same person, exported by another system under a new id
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{new_id}", "resource": patient,
         "request": {"method": "POST", "url": "Patient"}}]}
    resp = _post(node, "/fhir", bundle, who="dr-house")
    assert_outcome(resp, 409, "Bundle.entry[0]", f"Patient/{existing}")


def test_probable_duplicate_is_created_with_warning(node: NodeHandle) -> None:
    similar = _patient(0)
    existing = similar.pop("id")
    similar.pop("identifier")
    similar.pop("telecom")
    similar["name"][0]["given"] = ["Jim"]
    similar["address"][0].update(line=["1 Other Road"], postalCode="99999", city="Boston")
    resp = _post(node, "/fhir/Patient", similar)
    assert resp.status_code == 201, resp.text
    assert existing in resp.headers["x-medledger-warning"]
    assert "probable duplicate" in resp.headers["x-medledger-warning"]
