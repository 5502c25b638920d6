"""Extraction: the fast evaluator returns exactly what fhirpathpy returns (real Synthea
resources and hand vectors), typed values per FHIR search, compartment membership."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from medledger.search import fastpath
from medledger.search.compartment import directory_type, patient_refs
from medledger.search.differential import compare, resources_in
from medledger.search.extract import evaluator, extract, indexed_params
from medledger.search.registry import registry
from medledger.search.values import MAX_MS, date_range, implicit_range, normalize, parse_reference

VECTORS = Path(__file__).parent / "vectors"
SAMPLE = json.loads((VECTORS / "synthea_sample.json").read_text())["resources"]
HAND: list[dict[str, Any]] = [
    {"resourceType": "Observation", "id": "many", "subject": {"reference": "Patient/p"},
     "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
     "component": [
         {"code": {"text": "a"}, "valueQuantity": {"value": 1.5, "unit": "mg"}},
         {"code": {"text": "b"}, "valueCodeableConcept": {"coding": [{"code": "x"}]}},
         {"code": {"text": "c"}, "valueString": "yes"}],
     "effectivePeriod": {"start": "2020-01-01"}, "valueString": "free text"},
    {"resourceType": "Patient", "id": "p", "deceasedBoolean": False,
     "telecom": [{"system": "email", "value": "A@B.example"}, {"system": "phone",
                                                              "value": "1"}],
     "communication": [{"language": {"coding": [{"code": "fr"}]}}],
     "link": [{"other": {"reference": "Patient/q"}, "type": "seealso"}]},
    {"resourceType": "Goal", "id": "g", "target": [{"dueDate": "2025-01-01"},
                                                   {"dueDuration": {"value": 3}}]},
    {"resourceType": "Medication", "id": "m", "ingredient": [
        {"itemCodeableConcept": {"coding": [{"code": "i1"}]}},
        {"itemReference": {"reference": "Substance/s1"}}]},
]


@pytest.mark.parametrize("resource", SAMPLE + HAND,
                         ids=lambda r: f"{r['resourceType']}/{r['id'][:8]}")
def test_fast_path_equals_fhirpathpy(resource: dict[str, Any]) -> None:
    assert compare(resource) == []


@pytest.mark.skipif(not os.environ.get("MEDLEDGER_SYNTHEA_DIR"),
                    reason="set MEDLEDGER_SYNTHEA_DIR to a Synthea output folder to compare "
                           "on every resource of it")
@pytest.mark.timeout(7200)
def test_fast_path_equals_fhirpathpy_on_a_whole_synthea_output() -> None:
    folder = Path(os.environ["MEDLEDGER_SYNTHEA_DIR"])
    problems = [d for r in resources_in(folder) for d in compare(r)]
    assert problems == []


def test_almost_every_parameter_takes_the_fast_path() -> None:
    slow = [(t, p.code) for t in registry().types for p in indexed_params(t)
            if p.type != "composite" and fastpath.compile_path(p.path, t) is None]
    assert slow == [("Patient", "deceased")]  # exists() and != false: fhirpathpy


def test_values_of_a_patient() -> None:
    v = extract({"resourceType": "Patient", "id": "p", "gender": "female",
                 "birthDate": "1980-05", "name": [{"family": "Núñez", "given": ["Ana"]}],
                 "identifier": [{"system": "urn:mrn", "value": "7",
                                 "type": {"text": "MRN"}}],
                 "generalPractitioner": [{"reference": "https://x.example/fhir/"
                                                       "Practitioner/d1/_history/2"}]})
    assert ("family", "nunez", "Núñez") in v.strings
    assert ("name", "ana", "Ana") in v.strings
    assert ("identifier", "urn:mrn", "7") in v.tokens and ("identifier", "mrn") in v.texts
    assert ("gender", "", "female") in v.tokens
    # all of May 1980: 1980-01-01 is 315,532,800 s; + 121 days; + 31 days
    assert ("birthdate", 325_987_200_000, 328_665_600_000) in v.dates
    assert ("general-practitioner", "Practitioner", "d1") in v.refs


def test_reference_filters_of_resolve_is() -> None:
    v = extract({"resourceType": "Provenance", "id": "x", "recorded": "2024-01-01T00:00:00Z",
                 "target": [{"reference": "Observation/o"}, {"reference": "Patient/p"}]})
    assert ("patient", "Patient", "p") in v.refs
    assert ("patient", "Observation", "o") not in v.refs
    assert {("target", "Observation", "o"), ("target", "Patient", "p")} <= set(v.refs)


@pytest.mark.parametrize(("text", "low", "high"), [
    ("2024", "2024-01-01T00:00:00", "2025-01-01T00:00:00"),
    ("2024-02", "2024-02-01T00:00:00", "2024-03-01T00:00:00"),
    ("2024-12-31", "2024-12-31T00:00:00", "2025-01-01T00:00:00"),
    ("2024-03-01T10:00:00+02:00", "2024-03-01T08:00:00", "2024-03-01T08:00:01"),
    ("2024-03-01T10:00-05:00", "2024-03-01T15:00:00", "2024-03-01T15:01:00"),
    ("2024-03-01T10:00:00.25Z", "2024-03-01T10:00:00.250", "2024-03-01T10:00:00.260"),
])
def test_date_ranges(text: str, low: str, high: str) -> None:
    from datetime import UTC, datetime
    def ms(s: str) -> int:
        return int(datetime.fromisoformat(s).replace(tzinfo=UTC).timestamp() * 1000)
    assert date_range(text) == (ms(low), ms(high))


def test_bad_dates_and_numbers() -> None:
    assert date_range("2023-02-30") is None and date_range("soon") is None
    assert implicit_range("100") == (99.5, 100.5)
    assert implicit_range("1.50") == (1.495, 1.505)
    assert implicit_range("x") is None


def test_dates_at_the_ends_of_the_calendar() -> None:
    """A birth date of 9999-12-31 (a common "unknown" placeholder) or an early date with a
    positive offset has a range: it used to raise OverflowError, which failed the index
    update of its whole block and, at the next start, every search of the node."""
    from datetime import UTC, datetime
    last_day = int(datetime(9999, 12, 31, tzinfo=UTC).timestamp() * 1000)
    assert date_range("9999-12-31") == (last_day, last_day + 86_400_000)
    assert date_range("9999-12-31T23:59:59Z") == (last_day + 86_399_000, last_day + 86_400_000)
    assert date_range("9999") == (int(datetime(9999, 1, 1, tzinfo=UTC).timestamp() * 1000),
                                  last_day + 86_400_000)
    first = int(datetime(1, 1, 1, tzinfo=UTC).timestamp() * 1000)
    assert date_range("0001-01-01T00:30:00+01:00") == (first - 1_800_000, first - 1_799_000)
    for resource in ({"resourceType": "Patient", "id": "p", "birthDate": "9999-12-31"},
                     {"resourceType": "Observation", "id": "o", "status": "final",
                      "code": {"text": "x"}, "subject": {"reference": "Patient/p"},
                      "effectiveDateTime": "0001-01-01T00:30:00+01:00"}):
        assert extract(resource).dates, resource


def test_normalize_and_references() -> None:
    assert normalize("  Zoë  ÅSA ") == "zoe asa"
    assert parse_reference("Patient/1") == ("Patient", "1")
    assert parse_reference("urn:uuid:abc") == ("", "urn:uuid:abc")
    assert parse_reference("#contained") is None
    assert parse_reference("http://h/fhir/Patient/1/_history/3") == ("Patient", "1")
    assert MAX_MS > 0


def test_compartment_follows_the_definition() -> None:
    assert patient_refs({"resourceType": "Observation", "subject": {"reference": "Patient/a"},
                         "performer": [{"reference": "Patient/b"},
                                       {"reference": "Practitioner/c"}]}) == {"a", "b"}
    assert patient_refs({"resourceType": "Provenance", "target": [
        {"reference": "Patient/a"}, {"reference": "Observation/o"}]}) == {"a"}
    assert patient_refs({"resourceType": "Encounter", "subject": {"reference": "Group/g"},
                         "participant": [{"individual": {"reference": "Practitioner/x"}}]}
                        ) == set()
    assert patient_refs({"resourceType": "Patient", "id": "me"}) == {"me"}
    assert patient_refs({"resourceType": "Organization", "id": "o"}) == set()
    assert patient_refs({"resourceType": "Medication", "id": "m"}) == set()


@pytest.mark.parametrize(("rtype", "directory"), [
    ("Organization", True), ("Practitioner", True), ("Medication", True),
    ("SpecimenDefinition", True), ("ValueSet", True), ("Device", True),
    ("CareTeam", True), ("Group", True),  # only when they name no patient
    ("Observation", False), ("Condition", False), ("Patient", False), ("Provenance", False),
    ("Binary", False), ("Bundle", False), ("Task", False), ("NoSuchType", False),
])
def test_directory_types_follow_the_compartment_definition(rtype: str, directory: bool) -> None:
    assert directory_type(rtype) is directory


def test_a_branch_that_filters_first_is_left_to_fhirpathpy() -> None:
    """A branch beginning with ``where`` has no first element to check: the fast path
    declines it (its first-key check would read the filter's literal as keys) and
    extraction never skips it."""
    path = "Observation.where(status='final').code"
    assert fastpath.compile_path(path, "Observation") is None
    assert fastpath.first_keys(path, "Observation") is None
    code = {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}
    resource = {"resourceType": "Observation", "status": "final", "code": code}
    assert evaluator(path, "Observation")(resource) == [code]
