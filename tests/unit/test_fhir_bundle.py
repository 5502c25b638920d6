"""fhir.bundle: planning transaction/batch Bundles (ids, reference rewriting, errors)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from medledger.errors import InvalidInput
from medledger.fhir.bundle import parse_if_match, plan_transaction, rewrite_references
from medledger.fhir.synthetic import synthetic_patient_bundle

PID = "11111111-1111-4111-8111-111111111111"
OID = "22222222-2222-4222-8222-222222222222"


def _counter() -> Callable[[], str]:
    numbers = itertools.count(1)
    return lambda: f"new-{next(numbers)}"


def _patient_entry() -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{PID}",
        "resource": {"resourceType": "Patient", "gender": "female"},
        "request": {"method": "POST", "url": "Patient"},
    }


def _obs_entry(subject: str = f"urn:uuid:{PID}", status: str = "final") -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{OID}",
        "resource": {
            "resourceType": "Observation",
            "status": status,
            "code": {"text": "heart rate"},
            "subject": {"reference": subject},
            "hasMember": [{"reference": f"urn:uuid:{PID}"}],
        },
        "request": {"method": "POST", "url": "Observation"},
    }


def _bundle(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _error(bundle: Any) -> str:
    with pytest.raises(InvalidInput) as info:
        plan_transaction(bundle, _counter())
    return str(info.value)


def test_urn_uuid_ids_and_reference_rewriting() -> None:
    original = _bundle(_patient_entry(), _obs_entry())
    snapshot = copy.deepcopy(original)
    plan = plan_transaction(original, _counter())
    assert original == snapshot  # not mutated
    patient, obs = plan
    assert (patient.index, patient.method, patient.resource_type, patient.resource_id) == (
        0,
        "POST",
        "Patient",
        PID,
    )
    assert patient.resource["id"] == PID
    assert patient.full_url == f"urn:uuid:{PID}"
    assert obs.resource["subject"] == {"reference": f"Patient/{PID}"}
    assert obs.resource["hasMember"] == [{"reference": f"Patient/{PID}"}]
    assert obs.if_match is None


def test_bytes_input_and_batch_type() -> None:
    plan = plan_transaction(orjson.dumps(_bundle(_patient_entry(), kind="batch")), _counter())
    assert plan[0].resource_id == PID


def test_put_with_id_and_if_match_and_new_ids() -> None:
    bundle = _bundle(
        {
            "resource": {"resourceType": "Patient", "id": "p-7"},
            "request": {"method": "PUT", "url": "Patient/p-7", "ifMatch": 'W/"3"'},
        },
        {
            "fullUrl": "https://other.example/fhir/Observation/x",
            "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}},
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "resource": {"resourceType": "Patient"},
            "request": {
                "method": "PUT",
                "url": "Patient?identifier=http://hospital.example.org/mrn|42",
            },
        },
    )
    put, post, conditional = plan_transaction(bundle, _counter())
    assert (put.method, put.resource_id, put.if_match) == ("PUT", "p-7", 3)
    assert post.resource_id == "new-1"
    assert conditional.resource_id == "new-2"
    assert conditional.condition == "identifier=http://hospital.example.org/mrn|42"


def test_if_none_exist_is_the_condition() -> None:
    entry = _patient_entry()
    entry["request"]["ifNoneExist"] = "identifier=http://hospital.example.org/mrn|1"
    (planned,) = plan_transaction(_bundle(entry), _counter())
    assert planned.condition == "identifier=http://hospital.example.org/mrn|1"


@pytest.mark.parametrize(
    ("value", "expected"), [('W/"3"', 3), ('"12"', 12), ("7", 7), (' W/"1" ', 1)]
)
def test_parse_if_match(value: str, expected: int) -> None:
    assert parse_if_match(value) == expected


def test_bad_if_match() -> None:
    entry = _patient_entry()
    entry["request"]["ifMatch"] = "abc"
    message = _error(_bundle(entry))
    assert message.startswith(f"Bundle.entry[0] (urn:uuid:{PID}, Patient): ifMatch")


def test_bad_entry_is_named_with_index_fullurl_and_path() -> None:
    bundle = synthetic_patient_bundle(4, n_encounters=3)
    bad = bundle["entry"][5]
    bad["resource"]["status"] = "done"
    message = _error(bundle)
    assert message.startswith(f"Bundle.entry[5] ({bad['fullUrl']}, Observation): ")
    assert "'done' is not a valid code" in message
    assert "at Observation.status" in message


def test_unresolved_urn_reference() -> None:
    missing = "urn:uuid:99999999-9999-4999-8999-999999999999"
    message = _error(_bundle(_patient_entry(), _obs_entry(subject=missing)))
    assert message.startswith(f"Bundle.entry[1] (urn:uuid:{OID}, Observation): ")
    assert f"reference '{missing}' at Observation.subject.reference does not resolve" in message


def test_duplicate_full_url() -> None:
    message = _error(_bundle(_patient_entry(), _patient_entry()))
    expected = f"Bundle.entry[1] (urn:uuid:{PID}, Patient): duplicate fullUrl"
    assert message.startswith(expected)


def test_same_target_twice() -> None:
    entry = {
        "resource": {"resourceType": "Patient"},
        "request": {"method": "PUT", "url": "Patient/a"},
    }
    assert "Patient/a is already written by Bundle.entry[0]" in _error(_bundle(entry, entry))


@pytest.mark.parametrize(
    ("bundle", "fragment"),
    [
        ({"resourceType": "Patient"}, "expected a Bundle"),
        ([], "expected a Bundle resource"),
        (b"{not json", "malformed JSON"),
        (_bundle(kind="collection"), "Bundle.type must be 'transaction' or 'batch'"),
        ({"resourceType": "Bundle", "type": "batch", "entry": {}}, "Bundle.entry must be an array"),
    ],
)
def test_rejects_bad_bundles(bundle: Any, fragment: str) -> None:
    assert fragment in _error(bundle)


def test_rejects_bad_entries() -> None:
    entry = _patient_entry()
    del entry["request"]
    assert "Bundle.entry[0] (urn:uuid:" in _error(_bundle(entry))
    assert "missing request" in _error(_bundle(entry))

    entry = _patient_entry()
    entry["request"] = {"method": "DELETE", "url": "Patient/x"}
    assert "records are never deleted" in _error(_bundle(entry))

    entry = _patient_entry()
    entry["request"] = {"method": "PATCH", "url": "Patient/x"}
    assert "request.method must be POST or PUT, got 'PATCH'" in _error(_bundle(entry))

    entry = _patient_entry()
    entry["request"]["url"] = "Observation"
    assert "does not match resourceType 'Patient'" in _error(_bundle(entry))

    entry = _patient_entry()
    entry["request"] = {"method": "PUT", "url": "Patient/a"}
    entry["resource"]["id"] = "b"
    assert "resource.id 'b' does not match request.url id 'a'" in _error(_bundle(entry))

    entry = _patient_entry()
    del entry["resource"]
    assert "POST needs a resource" in _error(_bundle(entry))

    entry = _patient_entry()
    entry["resource"]["resourceType"] = "Patientt"
    entry["request"]["url"] = "Patientt"
    assert "unknown resourceType 'Patientt'" in _error(_bundle(entry))


def test_synthetic_bundle_of_300_plus_resources() -> None:
    bundle = synthetic_patient_bundle(2, n_encounters=40)
    plan = plan_transaction(bundle, _counter())
    assert len(plan) >= 300
    ids = {f"{p.resource_type}/{p.resource_id}" for p in plan}
    assert len(ids) == len(plan)
    for entry in plan:
        assert b"urn:uuid:" not in orjson.dumps(entry.resource)
    # Loading the same bundle twice plans the same writes (idempotent Synthea loads).
    again = plan_transaction(bundle, _counter())
    assert [p.resource for p in again] == [p.resource for p in plan]


def test_rewrite_references_is_deep_and_pure() -> None:
    node: dict[str, Any] = {
        "a": [{"reference": "urn:uuid:1"}, {"b": {"reference": "urn:uuid:2"}}],
        "reference": 5,
    }
    out = rewrite_references(node, {"urn:uuid:1": "Patient/1"})
    assert out == {
        "a": [{"reference": "Patient/1"}, {"b": {"reference": "urn:uuid:2"}}],
        "reference": 5,
    }
    assert node["a"][0] == {"reference": "urn:uuid:1"}
