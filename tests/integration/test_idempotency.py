"""Idempotent writes on a real node: the same ``Idempotency-Key`` gives the first outcome,
never a second record; keys are scoped to the caller; pre-signed txs resent with a key
answer with their committed outcome."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import NodeHandle, assert_outcome, running_node

from medledger.core.tx import make_tx
from medledger.fhir.synthetic import synthetic_observation

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("idem") / "home", patients=1,
                      n_encounters=1) as n:
        yield n


def _obs(node: NodeHandle, seed: int) -> dict[str, object]:
    obs = synthetic_observation(node.patients[0], seed)
    obs.pop("id", None)
    return obs


def test_same_key_same_record_one_version(node: NodeHandle) -> None:
    obs = _obs(node, 1)
    with node.client("dr-house") as c:
        first = c.request("POST", "/fhir/Observation", obs, idempotency_key="k-1")
        again = c.request("POST", "/fhir/Observation", obs, idempotency_key="k-1")
        other = c.request("POST", "/fhir/Observation", obs, idempotency_key="k-2")
        rid = first.json()["id"]
        assert first.status_code == 201 and again.status_code == 200
        assert again.json()["id"] == rid and again.json()["meta"]["versionId"] == "1"
        assert other.json()["id"] != rid  # another key is another write
        assert c.get(f"/fhir/Observation/{rid}/_history")["total"] == 1
        hits = c.get(f"/fhir/Observation?patient={node.patients[0]}&_count=1000")
    assert sum(e["resource"]["id"] == rid for e in hits["entry"]) == 1


def test_keys_are_scoped_to_the_caller(node: NodeHandle) -> None:
    obs = _obs(node, 2)
    with node.client("dr-house") as house, node.client("nurse-joy") as joy:
        a = house.request("POST", "/fhir/Observation", obs, idempotency_key="shared").json()
        b = joy.request("POST", "/fhir/Observation", obs, idempotency_key="shared").json()
    assert a["id"] != b["id"]


def test_x_request_id_works_too_and_bad_keys_are_refused(node: NodeHandle) -> None:
    obs = _obs(node, 3)
    with node.client("dr-house") as c:
        h = {"Authorization": f"Bearer {c.token()}", "Content-Type": "application/fhir+json"}
        one = c.http.post("/fhir/Observation", json=obs, headers={**h, "X-Request-Id": "r-9"})
        two = c.http.post("/fhir/Observation", json=obs, headers={**h, "X-Request-Id": "r-9"})
        assert one.json()["id"] == two.json()["id"]
        bad = c.http.post("/fhir/Observation", json=obs,
                          headers={**h, "Idempotency-Key": "x" * 201})
        assert_outcome(bad, 400, "Idempotency-Key")


def _bundle(node: NodeHandle, seed: int) -> dict[str, object]:
    """A transaction: one Observation with a urn:uuid fullUrl, one the server names."""
    named, unnamed = _obs(node, seed), _obs(node, seed + 1)
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{uuid.UUID(int=seed)}", "resource": named,
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": unnamed, "request": {"method": "POST", "url": "Observation"}}]}


def _post(c: Any, bundle: object, key: str | None) -> httpx.Response:
    h = {"Authorization": f"Bearer {c.token()}", "Content-Type": "application/fhir+json"}
    if key is not None:
        h["Idempotency-Key"] = key
    return c.http.post("/fhir", content=json.dumps(bundle), headers=h)  # type: ignore[no-any-return]


def test_bundle_retried_with_its_key_answers_with_the_first_response(node: NodeHandle) -> None:
    bundle = _bundle(node, 40)
    with node.client("dr-house") as c:
        first = _post(c, bundle, "bundle-1")
        again = _post(c, bundle, "bundle-1")
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert again.json()["entry"] == first.json()["entry"]
        assert [e["response"]["status"] for e in again.json()["entry"]] == ["201 Created"] * 2
        for entry in first.json()["entry"]:
            rtype, rid = entry["response"]["location"].split("/")[:2]
            assert c.get(f"/fhir/{rtype}/{rid}/_history")["total"] == 1
        # without the key the server-named entry is a new record each time
        plain = [_post(c, bundle, None).json()["entry"][1]["response"]["location"]
                 for _ in range(2)]
    assert len({*plain, first.json()["entry"][1]["response"]["location"]}) == 3


def test_bundle_key_reused_with_another_body_is_refused(node: NodeHandle) -> None:
    with node.client("dr-house") as c:
        assert _post(c, _bundle(node, 50), "bundle-2").status_code == 200
        other = _post(c, _bundle(node, 60), "bundle-2")
    assert_outcome(other, 409, "another Bundle")


def test_refused_bundle_frees_its_key(node: NodeHandle) -> None:
    bad = _bundle(node, 70)
    bad["entry"][0]["resource"]["status"] = "bogus"  # type: ignore[index]
    good = _bundle(node, 80)
    with node.client("dr-house") as c:
        assert_outcome(_post(c, bad, "bundle-3"), 400, "status")
        fixed = _post(c, good, "bundle-3")  # nothing was committed: the key is free
        assert fixed.status_code == 200, fixed.text
        assert _post(c, good, "bundle-3").json()["entry"] == fixed.json()["entry"]


def test_presigned_tx_resent_with_a_key_answers_with_its_outcome(node: NodeHandle) -> None:
    assert node.org is not None
    with node.client() as c:
        chain = c.chain
    pat = node.user_identity(node.patients[0])
    consent = {"id": "c-idem", "patient": pat.id, "decision": "permit", "orgs": ["org-x"]}
    raw = make_tx(pat.id, pat.signer(), chain, "consent.put", consent,
                  os.urandom(16).hex()).raw
    with node.client(pat) as pc:  # raw txs come with their signer's own bearer token
        hdrs = {"Content-Type": "application/octet-stream",
                "Authorization": f"Bearer {pc.token()}"}
    first = httpx.post(node.url + "/ledger/tx", content=raw, headers={**hdrs,
                       "Idempotency-Key": "tx-1"})
    again = httpx.post(node.url + "/ledger/tx", content=raw, headers={**hdrs,
                       "Idempotency-Key": "tx-1"})
    plain = httpx.post(node.url + "/ledger/tx", content=raw, headers=hdrs)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert (again.json()["hash"], again.json()["height"]) == (first.json()["hash"],
                                                              first.json()["height"])
    assert_outcome(plain, 409, "already used")  # without a key, a resend is a replay
