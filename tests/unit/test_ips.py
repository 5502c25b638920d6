"""International Patient Summary document Bundle: sections, references, R4B validity."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from medledger.errors import InvalidInput
from medledger.fhir.ips import IPS_SECTIONS, international_patient_summary

NOW = "2025-01-31T12:00:00Z"
LOINC = "http://loinc.org"
SUBJECT = {"reference": "Patient/p1"}

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "name": [{"family": "Smith", "given": ["Jane"]}],
    "gender": "female",
    "birthDate": "1970-01-01",
}


def _obs(
    oid: str, category: str, code: str, display: str, value: float, unit: str
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": category,
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": SUBJECT,
        "effectiveDateTime": "2024-12-01T09:00:00Z",
        "valueQuantity": {"value": value, "unit": unit},
    }


RESOURCES: list[dict[str, Any]] = [
    {
        "resourceType": "Condition",
        "id": "c1",
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "code": {"text": "Type 2 diabetes <mellitus>"},
        "subject": SUBJECT,
    },
    {
        "resourceType": "Condition",
        "id": "c-error",
        "verificationStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": "entered-in-error",
                }
            ]
        },
        "code": {"text": "Mistake"},
        "subject": SUBJECT,
    },
    {
        "resourceType": "Medication",
        "id": "m1",
        "code": {
            "coding": [
                {
                    "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                    "code": "860975",
                    "display": "metformin 500 MG",
                }
            ]
        },
    },
    {
        "resourceType": "MedicationRequest",
        "id": "mr1",
        "status": "active",
        "intent": "order",
        "medicationReference": {"reference": "Medication/m1"},
        "subject": SUBJECT,
    },
    {
        "resourceType": "Immunization",
        "id": "i1",
        "status": "completed",
        "vaccineCode": {"text": "Influenza vaccine"},
        "patient": SUBJECT,
        "occurrenceDateTime": "2024-10-01",
    },
    _obs("o-lab", "laboratory", "4548-4", "Hemoglobin A1c", 7.1, "%"),
    _obs("o-vital", "vital-signs", "8867-4", "Heart rate", 72, "beats/minute"),
    _obs("o-social", "social-history", "72166-2", "Tobacco smoking status", 0, "1"),
    {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": SUBJECT,
    },
]


def _ips(**kwargs: Any) -> dict[str, Any]:
    bundle: dict[str, Any] = international_patient_summary(
        PATIENT, RESOURCES, NOW, "ips-1", **kwargs
    )
    return bundle


def _sections(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    composition = bundle["entry"][0]["resource"]
    return {s["code"]["coding"][0]["code"]: s for s in composition["section"]}


def test_document_bundle_shape() -> None:
    bundle = _ips()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "document"
    assert bundle["timestamp"] == NOW
    assert bundle["identifier"]["system"] == "urn:ietf:rfc:3986"
    composition = bundle["entry"][0]["resource"]
    assert composition["resourceType"] == "Composition"
    assert composition["id"] == "ips-1"
    assert composition["status"] == "final"
    assert composition["date"] == NOW
    assert composition["type"]["coding"][0] == {
        "system": LOINC,
        "code": "60591-5",
        "display": "Patient summary Document",
    }
    assert composition["subject"]["reference"] == bundle["entry"][1]["fullUrl"]
    assert bundle["entry"][1]["resource"]["resourceType"] == "Patient"
    assert composition["author"]


def test_validates_as_r4b_bundle() -> None:
    for kwargs in ({}, {"base_url": "https://node.example.org/fhir"}):
        bundle = _ips(**kwargs)
        model = Bundle.model_validate(bundle)
        assert model.type == "document"
        assert model.entry is not None
        first = model.entry[0].resource
        assert first is not None and first.get_resource_type() == "Composition"


def test_sections_and_entries_by_full_url() -> None:
    bundle = _ips()
    urls = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}": e["fullUrl"]
        for e in bundle["entry"]
    }
    sections = _sections(bundle)
    assert set(sections) == {"11450-4", "48765-2", "10160-0", "11369-6", "30954-2", "8716-3"}
    assert [e["reference"] for e in sections["11450-4"]["entry"]] == [urls["Condition/c1"]]
    assert [e["reference"] for e in sections["10160-0"]["entry"]] == [urls["MedicationRequest/mr1"]]
    assert [e["reference"] for e in sections["11369-6"]["entry"]] == [urls["Immunization/i1"]]
    assert [e["reference"] for e in sections["30954-2"]["entry"]] == [urls["Observation/o-lab"]]
    assert [e["reference"] for e in sections["8716-3"]["entry"]] == [urls["Observation/o-vital"]]
    # Every section reference resolves inside the Bundle.
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    for section in sections.values():
        for entry in section.get("entry", []):
            assert entry["reference"] in full_urls
    assert len(full_urls) == len(bundle["entry"])


def test_required_empty_section_has_empty_reason() -> None:
    allergies = _sections(_ips())["48765-2"]
    assert "entry" not in allergies
    assert allergies["emptyReason"]["coding"][0]["code"] == "unavailable"
    assert "No information" in allergies["text"]["div"]


def test_optional_empty_sections_are_omitted() -> None:
    bundle = international_patient_summary(PATIENT, [], NOW, "ips-2")
    sections = _sections(bundle)
    assert set(sections) == {"11450-4", "48765-2", "10160-0"}
    assert all("emptyReason" in s for s in sections.values())
    Bundle.model_validate(bundle)


def test_left_out_and_included_resources() -> None:
    bundle = _ips()
    keys = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]]
    assert "Condition/c-error" not in keys  # entered in error
    assert "Encounter/e1" not in keys  # not in any section, not referenced
    assert "Observation/o-social" not in keys  # neither lab nor vital signs
    assert "Medication/m1" in keys  # referenced by the MedicationRequest


def test_references_are_rewritten_to_full_urls() -> None:
    bundle = _ips()
    by_key = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e for e in bundle["entry"]}
    patient_url = by_key["Patient/p1"]["fullUrl"]
    assert patient_url.startswith("urn:uuid:")
    assert by_key["Condition/c1"]["resource"]["subject"]["reference"] == patient_url
    request = by_key["MedicationRequest/mr1"]["resource"]
    assert request["medicationReference"]["reference"] == by_key["Medication/m1"]["fullUrl"]
    # The caller's resources are not modified.
    assert RESOURCES[3]["medicationReference"]["reference"] == "Medication/m1"


def test_restful_full_urls_with_base_url() -> None:
    bundle = _ips(base_url="https://node.example.org/fhir/")
    assert bundle["entry"][0]["fullUrl"] == "https://node.example.org/fhir/Composition/ips-1"
    assert bundle["entry"][1]["fullUrl"] == "https://node.example.org/fhir/Patient/p1"


def test_uuid_ids_keep_their_uuid() -> None:
    pid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    patient = dict(PATIENT, id=pid)
    bundle = international_patient_summary(patient, [], NOW, "ips-3")
    assert bundle["entry"][1]["fullUrl"] == f"urn:uuid:{pid}"


def test_narrative_is_escaped_and_descriptive() -> None:
    sections = _sections(_ips())
    problems = sections["11450-4"]["text"]["div"]
    assert "Type 2 diabetes &lt;mellitus&gt; (active)" in problems
    assert "metformin 500 MG" in sections["10160-0"]["text"]["div"]
    assert "Hemoglobin A1c: 7.1 %" in sections["30954-2"]["text"]["div"]
    assert problems.startswith('<div xmlns="http://www.w3.org/1999/xhtml">')


def test_deterministic() -> None:
    assert _ips() == _ips()
    assert [s.code for s in IPS_SECTIONS] == [
        "11450-4",
        "48765-2",
        "10160-0",
        "11369-6",
        "30954-2",
        "8716-3",
    ]


def test_author_can_be_given() -> None:
    author = {"reference": "Organization/org1", "display": "General Hospital"}
    composition = _ips(author=author)["entry"][0]["resource"]
    assert composition["author"] == [author]


def test_rejects_other_patients_records() -> None:
    other = copy.deepcopy(RESOURCES[0])
    other["subject"] = {"reference": "Patient/p2"}
    with pytest.raises(InvalidInput, match="one patient only"):
        international_patient_summary(PATIENT, [other], NOW, "ips-1")


@pytest.mark.parametrize(
    ("patient", "resources", "now", "cid", "needle"),
    [
        ({"resourceType": "Observation", "id": "x"}, [], NOW, "c", "Patient"),
        ({"resourceType": "Patient"}, [], NOW, "c", "id"),
        (PATIENT, [], "2025-01-31", "c", "timezone"),
        (PATIENT, [], "2025-01-31T12:00:00", "c", "timezone"),
        (PATIENT, [], NOW, "bad id!", "composition id"),
        (PATIENT, [{"id": "x"}], NOW, "c", "resources\\[0\\]"),
        (PATIENT, [RESOURCES[0], RESOURCES[0]], NOW, "c", "twice"),
    ],
)
def test_rejects_bad_input(patient: Any, resources: Any, now: str, cid: str, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        international_patient_summary(patient, resources, now, cid)
