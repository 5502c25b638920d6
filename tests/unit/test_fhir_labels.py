"""fhir.labels: categories and sensitivity labels, driven by tests/unit/vectors/labels.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from medledger.fhir.labels import (
    CATEGORIES,
    classify,
    patient_id_from_reference,
    patient_of,
    sensitivity_labels,
)
from medledger.fhir.validate import parse_resource

VECTORS: list[dict[str, Any]] = orjson.loads(
    (Path(__file__).parent / "vectors" / "labels.json").read_bytes()
)["vectors"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_label_vector(vector: dict[str, Any]) -> None:
    resource = parse_resource(vector["resource"])  # vectors are valid FHIR R4B
    expected = vector["expected"]
    got = classify(resource)
    assert got.resource_type == resource["resourceType"]
    assert got.category == expected["category"]
    assert got.category in CATEGORIES
    assert sorted(got.labels) == expected["labels"]
    assert got.patient_id == expected["patient_id"]
    assert patient_of(resource) == expected["patient_id"]
    if "date" in expected:
        assert got.date == expected["date"]
    if "codes" in expected:
        assert list(got.codes) == expected["codes"]


def test_vectors_include_negative_cases() -> None:
    negatives = [v for v in VECTORS if v["name"].startswith("NEGATIVE")]
    assert len(negatives) >= 5
    assert all(v["expected"]["labels"] == [] for v in negatives)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Patient/123", "123"),
        ("urn:uuid:abc-def", "abc-def"),
        ("https://x.example/fhir/Patient/9/_history/2", "9"),
        ("Group/1", None),
        ("Patient/", None),
        ("urn:uuid:", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_patient_id_from_reference(reference: object, expected: str | None) -> None:
    assert patient_id_from_reference(reference) == expected


def test_labels_ignore_malformed_shapes() -> None:
    assert sensitivity_labels({"resourceType": "Observation", "code": "F32"}) == frozenset()
    assert (
        sensitivity_labels({"resourceType": "Condition", "meta": {"security": "x"}}) == frozenset()
    )


def test_component_codes_are_labelled() -> None:
    obs = {
        "resourceType": "Observation",
        "code": {"coding": [{"system": "http://loinc.org", "code": "11111-1"}]},
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]}},
        ],
    }
    got = classify(obs)
    assert got.labels == frozenset({"PSY"})
    assert got.category == "mental-health"


def test_classification_is_frozen() -> None:
    got = classify({"resourceType": "Patient", "id": "p"})
    with pytest.raises(AttributeError):
        got.category = "other"  # type: ignore[misc]


def test_a_task_is_about_the_patient_it_is_for() -> None:
    task = {"resourceType": "Task", "id": "t", "status": "requested", "intent": "order",
            "for": {"reference": "Patient/p-1"}}
    assert classify(task).patient_id == "p-1"
    assert classify({**task, "for": {"reference": "Group/g"}}).patient_id is None
