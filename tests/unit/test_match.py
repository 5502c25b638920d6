"""Patient/$match scoring: vectors, string tools, ranking, Bundle and Parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.errors import InvalidInput
from medledger.fhir.match import _NICKNAME_GROUPS as NICKNAME_GROUPS
from medledger.fhir.match import (
    MATCH_GRADE_URL,
    MatchResult,
    find_matches,
    grade_for,
    jaro_winkler,
    match_bundle,
    match_score,
    nickname_of,
    normalize_name,
    parse_match_parameters,
    soundex,
)

CASES = json.loads((Path(__file__).parent / "vectors" / "match_cases.json").read_text())["cases"]
MRN = "http://hospital.example.org/mrn"


def patient(
    pid: str,
    family: str,
    given: str,
    birth: str | None = None,
    gender: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": family, "given": given.split()}],
    }
    if birth:
        out["birthDate"] = birth
    if gender:
        out["gender"] = gender
    out.update(extra)
    return out


# ------------------------------------------------------------------------ vectors


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_match_vector_grade(case: dict[str, Any]) -> None:
    result = match_score(case["candidate"], case["existing"])
    assert result.grade == case["expected_grade"], (result.score, result.reasons)
    assert 0.0 <= result.score <= 1.0
    assert result.grade == grade_for(result.score)
    assert result.reasons


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_match_is_symmetric(case: dict[str, Any]) -> None:
    assert match_score(case["candidate"], case["existing"]) == match_score(
        case["existing"], case["candidate"]
    )


def test_vectors_cover_the_required_situations() -> None:
    names = {c["name"] for c in CASES}
    for needed in (
        "spelling_variant_given_jon_john",
        "spelling_variant_family_smyth_smith",
        "nickname_bob_robert",
        "transposed_day_month",
        "same_name_different_dob",
        "twins_different_given",
        "identical_all_fields",
    ):
        assert needed in names


def test_twins_and_namesakes_are_never_certain() -> None:
    for case in CASES:
        if case["name"].startswith(("twins", "same_name_different_dob")):
            assert match_score(case["candidate"], case["existing"]).grade != "certain"


def test_reasons_carry_no_phi() -> None:
    for case in CASES:
        text = " ".join(match_score(case["candidate"], case["existing"]).reasons).lower()
        for forbidden in ("smith", "john", "1980", "617", "boston", "mrn-", "patel"):
            assert forbidden not in text


# ------------------------------------------------------------------- string tools


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("martha", "marhta", 0.9611),
        ("dwayne", "duane", 0.84),
        ("dixon", "dicksonx", 0.8133),
        ("jon", "john", 0.9333),
        ("abc", "abc", 1.0),
        ("abc", "xyz", 0.0),
        ("", "abc", 0.0),
    ],
)
def test_jaro_winkler_reference_values(a: str, b: str, expected: float) -> None:
    assert jaro_winkler(a, b) == pytest.approx(expected, abs=1e-4)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcdefghij", max_size=12), st.text(alphabet="abcdefghij", max_size=12))
def test_jaro_winkler_bounds(a: str, b: str) -> None:
    sim = jaro_winkler(a, b)
    assert 0.0 <= sim <= 1.0
    assert (sim == 1.0) == (a == b) or (not a and not b)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("Robert", "R163"),
        ("Rupert", "R163"),
        ("Rubin", "R150"),
        ("Ashcraft", "A261"),
        ("Ashcroft", "A261"),
        ("Tymczak", "T522"),
        ("Pfister", "P236"),
        ("Honeyman", "H555"),
        ("Smith", "S530"),
        ("Smyth", "S530"),
        ("Lee", "L000"),
        ("", ""),
    ],
)
def test_soundex(name: str, code: str) -> None:
    assert soundex(name) == code


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("O'Brien-Núñez ", "obrien nunez"),
        ("  MÜLLER ", "muller"),
        ("Straße", "strasse"),
        ("St. John", "st john"),
        ("Zoë  Åsa", "zoe asa"),
    ],
)
def test_normalize_name(raw: str, normal: str) -> None:
    assert normalize_name(raw) == normal


def test_nickname_table() -> None:
    pairs = sum(len(group) - 1 for group in NICKNAME_GROUPS)
    assert pairs >= 40
    for a, b in [
        ("bob", "robert"),
        ("bill", "william"),
        ("liz", "elizabeth"),
        ("peggy", "margaret"),
        ("jim", "james"),
        ("kate", "katherine"),
        ("kate", "catherine"),
    ]:
        assert nickname_of(a, b) and nickname_of(b, a)
    assert not nickname_of("robert", "robert")
    assert not nickname_of("bob", "william")


# ------------------------------------------------------------------ scoring rules


def test_missing_fields_are_neutral() -> None:
    full = patient("a", "Smith", "John", "1980-05-17", "male")
    sparse = patient("b", "Smith", "John", "1980-05-17")
    with_phone = patient(
        "c", "Smith", "John", "1980-05-17", "male", telecom=[{"system": "phone", "value": "1"}]
    )
    assert match_score(sparse, full).grade == "certain"
    # an unusable phone (too short) weighs nothing
    assert match_score(with_phone, full).score == match_score(full, full).score


def test_no_comparable_fields() -> None:
    result = match_score({"resourceType": "Patient"}, patient("a", "Smith", "John"))
    assert result == MatchResult(0.0, None, ("no comparable fields",))


def test_more_evidence_ranks_higher_even_below_certain() -> None:
    base = patient(
        "p",
        "Smith",
        "John",
        "1980-05-17",
        "male",
        address=[{"line": ["1 High St"], "city": "Leeds", "postalCode": "LS1 1AA"}],
    )
    bare = patient("x", "Smith", "Jon", "1980-05-17")
    with_address = dict(bare, address=base["address"])
    assert match_score(with_address, base).score >= match_score(bare, base).score
    assert match_score(with_address, base).grade == "probable"


def test_identifier_disagreeing_with_name_and_dob_is_not_certain() -> None:
    ident = [{"system": MRN, "value": "1"}]
    a = patient("a", "Smith", "John", "1980-05-17", identifier=ident)
    b = patient("b", "Garcia", "Maria", "1991-01-01", identifier=ident)
    assert match_score(a, b).grade is None
    # Same household (address and phone agree): the ceiling keeps it below probable.
    home: dict[str, Any] = {
        "address": [{"line": ["1 High St"], "postalCode": "LS1 1AA"}],
        "telecom": [{"system": "phone", "value": "0113 496 0000"}],
    }
    a = patient("a", "Smith", "John", "1980-05-17", identifier=ident, **home)
    b = patient("b", "Smith", "Mary", "1991-01-01", identifier=ident, **home)
    result = match_score(a, b)
    assert result.grade == "possible"
    assert any(r.startswith("ceiling: identifier agrees") for r in result.reasons)


def test_old_identifiers_are_ignored() -> None:
    a = patient("a", "Smith", "John", identifier=[{"system": MRN, "value": "1", "use": "old"}])
    b = patient("b", "Smith", "John", identifier=[{"system": MRN, "value": "1"}])
    assert not any("identifier" in r for r in match_score(a, b).reasons)


def test_bad_patient_input() -> None:
    with pytest.raises(InvalidInput):
        match_score("not a patient", {})


@settings(max_examples=80, deadline=None)
@given(
    family=st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=10),
    given_name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=10),
    birth=st.dates().map(lambda d: d.isoformat()),
    gender=st.sampled_from(["male", "female", "other", None]),
)
def test_identical_records_with_name_and_dob_are_certain(
    family: str, given_name: str, birth: str, gender: str | None
) -> None:
    p = patient("a", family, given_name, birth, gender)
    result = match_score(p, dict(p))
    assert result.grade == "certain"
    assert result == match_score(p, dict(p))  # deterministic


# ------------------------------------------------------------------------- $match


def _registry() -> list[dict[str, Any]]:
    return [
        patient("p1", "Smith", "John", "1980-05-07", "male"),
        patient("p2", "Smith", "Jon", "1980-05-07", "male"),
        patient("p3", "Smith", "John", "1950-01-01", "male"),
        patient("p4", "Garcia", "Maria", "1990-01-01", "female"),
        patient("p5", "Smith", "John", "1980-07-05", "male"),
    ]


def test_find_matches_sorted_and_filtered() -> None:
    candidate = patient("new", "Smith", "John", "1980-05-07", "male")
    results = find_matches(candidate, _registry())
    ids = [p["id"] for p, _ in results]
    assert ids[0] == "p1"
    assert "p4" not in ids and "p3" not in ids  # ungraded results are left out
    scores = [r.score for _, r in results]
    assert scores == sorted(scores, reverse=True)
    assert [r.grade for _, r in results] == ["certain", "probable", "probable"]
    assert find_matches(candidate, _registry(), count=1) == results[:1]
    assert find_matches(candidate, iter(_registry())) == results  # any iterable


def test_find_matches_only_certain() -> None:
    candidate = patient("new", "Smith", "John", "1980-05-07", "male")
    only = find_matches(candidate, _registry(), only_certain=True)
    assert [p["id"] for p, _ in only] == ["p1"]
    twice = _registry() + [patient("p9", "Smith", "John", "1980-05-07")]
    assert find_matches(candidate, twice, only_certain=True) == []  # ambiguous: answer nothing
    assert find_matches(patient("n", "Nobody", "Here"), _registry(), only_certain=True) == []


@pytest.mark.parametrize("count", [0, -1, True, 1.5])
def test_find_matches_rejects_bad_count(count: Any) -> None:
    with pytest.raises(InvalidInput):
        find_matches(patient("n", "A", "B"), [], count=count)


def test_match_bundle_follows_the_match_spec() -> None:
    candidate = patient("new", "Smith", "John", "1980-05-07", "male")
    results = find_matches(candidate, _registry())
    bundle = match_bundle(results, "https://node.example.org/fhir/")
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    assert bundle["total"] == len(results)
    first = bundle["entry"][0]
    assert first["fullUrl"] == "https://node.example.org/fhir/Patient/p1"
    assert first["resource"]["id"] == "p1"
    assert first["search"]["mode"] == "match"
    assert first["search"]["score"] == results[0][1].score
    assert first["search"]["extension"] == [{"url": MATCH_GRADE_URL, "valueCode": "certain"}]
    assert MATCH_GRADE_URL == "http://hl7.org/fhir/StructureDefinition/match-grade"
    # The Bundle is valid FHIR R4B.
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle)


def test_match_bundle_empty_and_ungraded() -> None:
    assert match_bundle([], "https://x") == {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 0,
        "entry": [],
    }
    entry = match_bundle([({"resourceType": "Patient"}, MatchResult(0.1, None, ()))], "https://x")
    assert "extension" not in entry["entry"][0]["search"]
    assert "fullUrl" not in entry["entry"][0]


def _params(*parameters: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(parameters)}


def test_parse_match_parameters() -> None:
    p = patient("x", "Smith", "John")
    body = _params(
        {"name": "resource", "resource": p},
        {"name": "onlyCertainMatches", "valueBoolean": True},
        {"name": "count", "valueInteger": 3},
    )
    assert parse_match_parameters(body) == (p, True, 3)
    assert parse_match_parameters(_params({"name": "resource", "resource": p})) == (p, False, None)


@pytest.mark.parametrize(
    "body",
    [
        {"resourceType": "Patient"},
        "nonsense",
        _params(),
        _params({"name": "resource", "resource": {"resourceType": "Observation"}}),
        _params({"name": "resource"}),
        _params(
            {"name": "resource", "resource": {"resourceType": "Patient"}},
            {"name": "resource", "resource": {"resourceType": "Patient"}},
        ),
        _params(
            {"name": "resource", "resource": {"resourceType": "Patient"}},
            {"name": "onlyCertainMatches", "valueString": "yes"},
        ),
        _params(
            {"name": "resource", "resource": {"resourceType": "Patient"}},
            {"name": "count", "valueInteger": 0},
        ),
        _params(
            {"name": "resource", "resource": {"resourceType": "Patient"}},
            {"name": "count", "valueDecimal": 2.5},
        ),
        _params({"name": "resource", "resource": {"resourceType": "Patient"}}, {"name": "x"}),
        {"resourceType": "Parameters", "parameter": ["not an object"]},
    ],
)
def test_parse_match_parameters_rejects_bad_input(body: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_match_parameters(body)
    assert "$match" in str(info.value) or "Parameters" in str(info.value)
