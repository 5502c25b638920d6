"""fhir.validate: parsing, R4B validation and human-readable diagnoses."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.errors import InvalidInput
from medledger.fhir.synthetic import synthetic_observation
from medledger.fhir.validate import canonical_bytes, parse_resource, preload_models

OBS: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2024-01-02T03:04:05+00:00",
    "valueQuantity": {"value": 72, "unit": "/min"},
}


def _error(data: Any, expected_type: str | None = None) -> str:
    with pytest.raises(InvalidInput) as info:
        parse_resource(data, expected_type)
    return str(info.value)


def test_valid_resource_round_trips_from_bytes_str_and_dict() -> None:
    from_dict = parse_resource(OBS)
    assert parse_resource(orjson.dumps(OBS)) == from_dict
    assert parse_resource(orjson.dumps(OBS).decode()) == from_dict
    assert from_dict["resourceType"] == "Observation"
    assert from_dict["valueQuantity"] == {"value": 72, "unit": "/min"}


def test_canonical_form_is_idempotent_and_drops_nulls() -> None:
    once = parse_resource({**OBS, "issued": None})
    assert "issued" not in once
    assert parse_resource(once) == once
    assert canonical_bytes(once) == canonical_bytes(parse_resource(canonical_bytes(once)))


def test_canonical_bytes_sorts_keys() -> None:
    assert canonical_bytes({"b": 1, "a": {"d": 2, "c": 3}}) == b'{"a":{"c":3,"d":2},"b":1}'


def test_input_dict_is_not_mutated() -> None:
    data = orjson.loads(orjson.dumps(OBS))
    parse_resource(data)
    assert data == OBS


def test_malformed_json_names_position() -> None:
    message = _error(b'{"resourceType": "Patient",\n "id": }')
    assert "malformed JSON at line 2" in message
    assert "column" in message


def test_non_object_json() -> None:
    assert "must be a JSON object, got an array" in _error(b"[1, 2]")


def test_missing_and_unknown_resource_type() -> None:
    assert "missing resourceType" in _error({"id": "x"})
    assert "unknown resourceType 'Patientt'" in _error({"resourceType": "Patientt"})
    # A datatype is a model in fhir.resources but not a resource.
    assert "unknown resourceType 'Coding'" in _error({"resourceType": "Coding"})


def test_expected_type_mismatch() -> None:
    message = _error(OBS, "Patient")
    assert message == "expected a Patient resource, got resourceType 'Observation'"


def test_invalid_enum_code_is_named_with_path_and_choices() -> None:
    message = _error({**OBS, "status": "done"})
    assert "'done' is not a valid code" in message
    assert "at Observation.status" in message
    assert "final" in message


def test_invalid_gender_and_nested_enum() -> None:
    message = _error(
        {
            "resourceType": "Patient",
            "gender": "M",
            "telecom": [{"system": "phone", "value": "1"}, {"system": "pigeon", "value": "2"}],
        }
    )
    assert "at Patient.gender" in message
    assert "'pigeon' is not a valid code" in message
    assert "at Patient.telecom[1].system" in message


def test_wrong_types_are_described() -> None:
    message = _error({**OBS, "code": "8867-4"})
    assert "must be a JSON object, got a string '8867-4' at Observation.code" in message
    message = _error({"resourceType": "Patient", "name": [{"given": "Ann"}]})
    assert "must be an array, got a string 'Ann' at Patient.name[0].given" in message
    message = _error({**OBS, "status": 5})
    assert "must be a string, got a number 5 at Observation.status" in message


def test_missing_required_element_and_unknown_element() -> None:
    body = {k: v for k, v in OBS.items() if k != "code"}
    assert "required element is missing at Observation.code" in _error(body)
    message = _error({**OBS, "colour": "blue"})
    assert "unknown element 'colour' (not part of FHIR R4B) at Observation.colour" in message


def test_bad_date_and_id() -> None:
    message = _error({"resourceType": "Patient", "id": "a b", "birthDate": "1980-13-01"})
    assert "'a b' is not a valid id" in message
    assert "'1980-13-01' is not a valid FHIR date" in message
    assert "at Patient.birthDate" in message
    message = _error({**OBS, "effectiveDateTime": "2024-01-02T03:04"})
    assert "not a valid FHIR dateTime" in message


def test_choice_type_conflict() -> None:
    message = _error({**OBS, "valueString": "high"})
    assert "only one of the choice elements" in message


def test_at_most_three_problems_listed() -> None:
    message = _error(
        {**OBS, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5},
    )
    assert message.count(" at Observation.") == 3
    assert "(and 2 more problems)" in message


def test_lax_coercion_is_canonicalised() -> None:
    """fhir.resources accepts "true"/"72" in lax mode; the canonical form has JSON types."""
    out = parse_resource({"resourceType": "Patient", "active": "true"})
    assert out["active"] is True


def test_bundle_resource_validates_nested_entries() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": {"resourceType": "Observation", "status": "final"}}],
    }
    assert "required element is missing at Bundle.entry[0].resource.code" in _error(bundle)


def test_fhir_comments_are_not_kept() -> None:
    out = parse_resource({"resourceType": "Patient", "fhir_comments": ["hi"]})
    assert "fhir_comments" not in out


def test_preload_models() -> None:
    preload_models(("Patient", "Observation"))
    with pytest.raises(InvalidInput):
        preload_models(("NotAType",))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    pid=st.from_regex(r"[A-Za-z0-9]{1,20}", fullmatch=True),
)
def test_canonical_form_is_deterministic_and_idempotent(seed: int, pid: str) -> None:
    once = parse_resource(synthetic_observation(pid, seed))
    assert parse_resource(canonical_bytes(once)) == once
    assert canonical_bytes(parse_resource(synthetic_observation(pid, seed))) == canonical_bytes(
        once
    )


def test_valid_input_is_kept_as_sent() -> None:
    """The canonical form of valid FHIR JSON is the input itself (date-times, element
    order and precision as sent), minus nulls and empty arrays."""
    sent = {**OBS, "issued": "2024-01-02T03:04:05.520+00:00", "note": [], "method": None}
    out = parse_resource(sent)
    assert out == {k: v for k, v in sent.items() if k not in ("note", "method")}
    assert list(out) == [k for k in sent if k not in ("note", "method")]
    assert out["effectiveDateTime"] == "2024-01-02T03:04:05+00:00"
    assert out is not sent and out["code"] is not sent["code"]  # a copy


@pytest.mark.parametrize(
    ("element", "sent", "canonical"),
    [
        ("valueInteger", "5", 5),
        ("valueInteger", 5.0, 5),
        ("valueBoolean", "true", True),
        ("valueBoolean", 1, True),
        ("valueQuantity", {"value": "1.5"}, {"value": 1.5}),
    ],
)
def test_coerced_values_are_written_in_fhir_json_form(
    element: str, sent: object, canonical: object
) -> None:
    base = {k: v for k, v in OBS.items() if k != "valueQuantity"}
    out = parse_resource({**base, element: sent})
    assert out[element] == canonical
    assert type(out[element]) is type(canonical)


def test_primitive_extension_arrays_stay_aligned() -> None:
    ext = {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}
    sent = {"resourceType": "Patient", "name": [{"given": ["A", None], "_given": [None, ext]}]}
    assert parse_resource(sent) == sent


def test_contained_resources_are_checked_like_the_container() -> None:
    eob_coverage = {"resourceType": "Coverage", "id": "coverage", "status": "active",
                    "beneficiary": {"reference": "Patient/p"}, "payor": [{"display": "x"}]}
    out = parse_resource({**OBS, "contained": [eob_coverage]})
    assert out["contained"] == [eob_coverage]
    message = _error({**OBS, "contained": [{**eob_coverage, "status": "on"}]})
    assert "'on' is not a valid code" in message
    assert "at Observation.contained[0].status" in message
