"""fhir.bundle: transaction/batch planning (FHIR R4 http.html#transaction).

Semantics are driven by tests/unit/vectors/bundles.json (conditional creates,
updates and references, processing order, contained resources, batch independence,
negative cases); the tests below cover the API around them.
"""

from __future__ import annotations

import copy
import gc
import itertools
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.errors import InvalidInput, MedledgerError, NotFound
from medledger.fhir import bundle as fb
from medledger.fhir.bundle import (
    Query,
    bundle_match,
    finish_plan,
    parse_if_match,
    parse_query,
    plan_bundle,
    plan_transaction,
    read_bundle,
    rewrite_references,
)
from medledger.fhir.synthetic import synthetic_patient_bundle

CASES: list[dict[str, Any]] = orjson.loads(
    (Path(__file__).parent / "vectors" / "bundles.json").read_bytes()
)["cases"]
NPI = "http://hl7.org/fhir/sid/us-npi"


def _counter() -> Callable[[], str]:
    numbers = itertools.count(1)
    return lambda: f"new-{next(numbers)}"


def _resolver(stored: dict[str, list[str]]) -> Callable[[Query], Iterable[str]]:
    asked: list[str] = []

    def resolve(query: Query) -> Iterable[str]:
        asked.append(str(query))
        return stored.get(str(query), ())

    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


def _refs(resource: Any) -> list[str]:
    return sorted({ref for _, ref in fb._reference_sites(resource)})


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bundle_vector(case: dict[str, Any]) -> None:
    original = copy.deepcopy(case["bundle"])
    resolve = _resolver(case["stored"])
    expect = case["expect"]
    if "error" in expect:
        with pytest.raises(MedledgerError) as info:
            plan_bundle(case["bundle"], _counter(), resolve)
        assert info.value.http_status == expect["error"]["status"], str(info.value)
        for fragment in expect["error"]["contains"]:
            assert fragment in str(info.value)
        return
    plan = plan_bundle(case["bundle"], _counter(), resolve)
    assert case["bundle"] == original  # a dict argument is never mutated
    assert plan.kind == case["bundle"]["type"]
    assert len(plan.entries) == len(expect["entries"])
    for got, want in zip(plan.entries, expect["entries"], strict=True):
        assert (got.index, got.action) == (want["index"], want["action"]), got
        if "target" in want:
            assert got.target == want["target"]
        if "references" in want:
            assert got.resource is not None
            assert _refs(got.resource) == want["references"]
        if "contained" in want:
            assert got.resource is not None
            assert [c["id"] for c in got.resource["contained"]] == want["contained"]
        for key in ("if_match", "if_none_match"):
            if key in want:
                assert getattr(got, key) == want[key]
        if "condition" in want:
            assert str(got.condition) == want["condition"]
        if want["action"] == "fail":
            assert got.problem is not None and got.resource is None
            assert got.problem.http_status == want["status"]
            for fragment in want["contains"]:
                assert fragment in str(got.problem)
        else:
            assert got.problem is None
        if want["action"] == "write":
            assert got.resource is not None and got.resource["id"] == got.resource_id


def test_vectors_cover_negative_cases() -> None:
    negative = [c for c in CASES if c["name"].startswith(("error:", "tampered:"))]
    assert len(negative) >= 10
    assert {c["expect"]["error"]["status"] for c in negative} == {400, 404, 412}


def test_each_distinct_query_is_asked_once() -> None:
    entries = []
    for i in range(20):
        entries.append({
            "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}",
            "resource": {"resourceType": "Encounter", "status": "finished",
                         "class": {"code": "AMB"}, "subject": {"reference": "Patient/p"},
                         "participant": [{"individual": {
                             "reference": f"Practitioner?identifier={NPI}|{i % 2}"}}]},
            "request": {"method": "POST", "url": "Encounter"}})
    resolve = _resolver({f"Practitioner?identifier={NPI}|0": ["a"],
                         f"Practitioner?identifier={NPI}|1": ["b"]})
    plan = plan_bundle({"resourceType": "Bundle", "type": "transaction", "entry": entries},
                       _counter(), resolve)
    assert sorted(resolve.asked) == [f"Practitioner?identifier={NPI}|0",  # type: ignore[attr-defined]
                                     f"Practitioner?identifier={NPI}|1"]
    assert [e.resource["participant"][0]["individual"]["reference"]  # type: ignore[index]
            for e in plan.entries[:2]] == ["Practitioner/a", "Practitioner/b"]


def test_two_steps_queries_then_answers() -> None:
    case = next(c for c in CASES if c["name"].startswith("synthea-shaped"))
    draft = read_bundle(orjson.dumps(case["bundle"]), _counter())
    assert sorted(str(q) for q in draft.queries) == sorted(case["stored"])
    plan = finish_plan(draft, {q: case["stored"][str(q)] for q in draft.queries})
    assert [e.action for e in plan.entries] == ["write"] * 3
    with pytest.raises(ValueError, match="already planned"):
        finish_plan(draft, {})


def test_owned_bytes_release_raw_entries_as_they_are_drafted() -> None:
    """Planning from bytes keeps one copy of each entry (the validated one), not two."""
    bundle = synthetic_patient_bundle(3, n_encounters=2)
    parsed: list[Any] = []
    original_parse = fb.parse_json

    def spy(data: bytes | str) -> Any:
        parsed.append(original_parse(data))
        return parsed[-1]

    fb.parse_json = spy  # type: ignore[assignment]
    try:
        draft = read_bundle(orjson.dumps(bundle), _counter())
    finally:
        fb.parse_json = original_parse  # type: ignore[assignment]
    assert parsed[0]["entry"] == [None] * len(bundle["entry"])
    assert all(d.resource is not None for d in draft.drafts)


def test_released_entries_are_freed() -> None:
    class Tracked(dict):  # type: ignore[type-arg]
        pass

    raw = Tracked(resourceType="Patient", gender="female")
    ref = weakref.ref(raw)
    entries: list[Any] = [{"fullUrl": "urn:uuid:x-1", "resource": raw,
                           "request": {"method": "POST", "url": "Patient"}}]
    del raw
    original_parse = fb.parse_json
    fb.parse_json = lambda data: {"resourceType": "Bundle", "type": "batch",  # type: ignore
                                  "entry": entries}
    try:
        draft = read_bundle(b"{}", _counter())
    finally:
        fb.parse_json = original_parse  # type: ignore[assignment]
    gc.collect()
    assert ref() is None  # the raw resource is gone, the validated copy stays
    assert draft.drafts[0].resource == {"resourceType": "Patient", "gender": "female",
                                        "id": "x-1"}


def test_plan_transaction_returns_writes_and_raises_on_any_problem() -> None:
    bundle = synthetic_patient_bundle(2, n_encounters=40)
    plan = plan_transaction(bundle, _counter())
    assert len(plan) >= 300
    assert len({f"{p.resource_type}/{p.resource_id}" for p in plan}) == len(plan)
    for entry in plan:
        assert not any(r.startswith("urn:") for r in _refs(entry.resource))
    # the same bundle plans the same writes (idempotent Synthea loads)
    assert [p.resource for p in plan_transaction(bundle, _counter())] == [
        p.resource for p in plan]
    # a batch given to plan_transaction is all-or-nothing too
    bad = copy.deepcopy(bundle)
    bad["type"] = "batch"
    bad["entry"][5]["resource"]["status"] = "done"
    with pytest.raises(InvalidInput, match=r"^Bundle.entry\[5\] \(urn:uuid:"):
        plan_transaction(bad, _counter())


def test_bad_entry_is_named_with_index_fullurl_and_path() -> None:
    bundle = synthetic_patient_bundle(4, n_encounters=3)
    bad = bundle["entry"][5]
    bad["resource"]["status"] = "done"
    with pytest.raises(InvalidInput) as info:
        plan_bundle(bundle, _counter())
    message = str(info.value)
    assert message.startswith(f"Bundle.entry[5] ({bad['fullUrl']}, Observation): ")
    assert "'done' is not a valid code" in message and "at Observation.status" in message


@pytest.mark.parametrize(
    ("bundle", "fragment"),
    [
        ({"resourceType": "Patient"}, "expected a Bundle"),
        ([], "expected a Bundle resource"),
        (b"{not json", "malformed JSON"),
        ({"resourceType": "Bundle", "type": "collection"}, "Bundle.type must be 'transaction'"),
        ({"resourceType": "Bundle", "type": "batch", "entry": {}}, "Bundle.entry must be an array"),
    ],
)
def test_rejects_bad_bundles(bundle: Any, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        plan_bundle(bundle, _counter())


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("not an object", "must be a JSON object"),
        ({"resource": {"resourceType": "Patient"}}, "missing request"),
        ({"request": {"method": "TRACE", "url": "Patient"}}, "request.method must be one of"),
        ({"request": {"method": "POST"}, "resource": {"resourceType": "Patient"}},
         "missing request.url"),
        ({"request": {"method": "POST", "url": "Patient"}}, "POST needs a resource"),
        ({"request": {"method": "POST", "url": "Observation"},
          "resource": {"resourceType": "Patient"}}, "does not match resourceType 'Patient'"),
        ({"request": {"method": "POST", "url": "Patient/a"},
          "resource": {"resourceType": "Patient"}}, "POST goes to the type"),
        ({"request": {"method": "PUT", "url": "Patient"},
          "resource": {"resourceType": "Patient"}}, "PUT needs an id or a search"),
        ({"request": {"method": "PUT", "url": "Patient/a"},
          "resource": {"resourceType": "Patient", "id": "b"}},
         "resource.id 'b' does not match request.url id 'a'"),
        ({"request": {"method": "PUT", "url": "Patient/" + "x" * 65},
          "resource": {"resourceType": "Patient"}}, "is not a valid FHIR id"),
        ({"request": {"method": "POST", "url": "Patientt"},
          "resource": {"resourceType": "Patientt"}}, "unknown resourceType 'Patientt'"),
        ({"fullUrl": "", "request": {"method": "POST", "url": "Patient"},
          "resource": {"resourceType": "Patient"}}, "fullUrl must be a non-empty string"),
        ({"request": {"method": "PUT", "url": "Patient/a", "ifMatch": "abc"},
          "resource": {"resourceType": "Patient"}}, "version ETag"),
        ({"request": {"method": "PUT", "url": "Patient/a", "ifNoneExist": "x=1"},
          "resource": {"resourceType": "Patient"}}, "ifNoneExist applies to POST"),
    ],
)
def test_rejects_bad_entries(entry: Any, fragment: str) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    with pytest.raises(InvalidInput) as info:
        plan_bundle(bundle, _counter())
    assert str(info.value).startswith("Bundle.entry[0]")
    assert fragment in str(info.value)
    # in a batch the same entry fails alone, with a 400
    bundle["type"] = "batch"
    (planned,) = plan_bundle(bundle, _counter()).entries
    assert planned.action == "fail" and planned.problem is not None
    assert planned.problem.http_status == 400 and fragment in str(planned.problem)


def test_batch_entries_keep_bundle_order_for_the_response() -> None:
    case = next(c for c in CASES if c["name"].startswith("batch: entries independent"))
    plan = plan_bundle(case["bundle"], _counter(), _resolver(case["stored"]))
    assert [e.index for e in plan.in_request_order()] == list(range(len(case["bundle"]["entry"])))
    assert [e.index for e in plan.writes()] == [2]


@pytest.mark.parametrize(
    ("text", "params"),
    [
        (f"identifier={NPI}|1", (("identifier", f"{NPI}|1"),)),
        ("name=a%20b&_id=x", (("_id", "x"), ("name", "a b"))),
        ("identifier=urn:phone|+1555", (("identifier", "urn:phone|+1555"),)),
        ("identifier:of-type=a|b|c&", (("identifier:of-type", "a|b|c"),)),
    ],
)
def test_parse_query(text: str, params: tuple[tuple[str, str], ...]) -> None:
    query = parse_query("Practitioner", text)
    assert query == Query("Practitioner", params)
    assert parse_query("Practitioner", "&".join(f"{k}={v}" for k, v in reversed(params))) == query


@pytest.mark.parametrize("text", ["", "identifier", "=x", "identifier=", "_sort=name",
                                  "_count=1&identifier=a", "_include=x"])
def test_parse_query_refuses(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_query("Practitioner", text)


def test_bundle_match_tokens() -> None:
    res = {"resourceType": "Practitioner", "id": "a",
           "identifier": [{"system": NPI, "value": "1"}, {"value": "local-7"}]}
    for text, expected in [(f"identifier={NPI}|1", True), (f"identifier={NPI}|2", False),
                           ("identifier=1", True), ("identifier=|local-7", True),
                           ("identifier=|1", False), (f"identifier={NPI}|", True),
                           ("identifier=urn:x|", False), (f"identifier=x,{NPI}|1", True),
                           ("_id=a", True), ("_id=b,a", True), ("_id=b", False),
                           (f"_id=a&identifier={NPI}|1", True),
                           (f"_id=b&identifier={NPI}|1", False)]:
        assert bundle_match(parse_query("Practitioner", text), res) is expected, text
    assert bundle_match(parse_query("Practitioner", "name=x"), res) is None
    assert bundle_match(parse_query("Organization", "_id=a"), res) is False


_tokens = st.sampled_from(["a", "b", "urn:x", ""])


@settings(max_examples=200, deadline=None)
@given(identifiers=st.lists(st.tuples(_tokens, _tokens), max_size=3),
       system=_tokens, value=_tokens, rid=st.sampled_from(["r1", "r2"]))
def test_in_bundle_index_agrees_with_bundle_match(
        identifiers: list[tuple[str, str]], system: str, value: str, rid: str) -> None:
    """The planner's identifier index (O(1) lookups) answers like bundle_match."""
    idents = [{k: v for k, v in (("system", s), ("value", v)) if v} for s, v in identifiers]
    resource = {"resourceType": "Practitioner", "id": rid, "identifier": [i for i in idents if i]}
    token = f"{system}|{value}" if system else (f"|{value}" if value else "")
    if not token or token == "|":
        return
    query = parse_query("Practitioner", f"identifier={token}")
    index = fb._OwnWrites()
    index.add(resource)
    assert (rid in (index.matches(query) or set())) is bundle_match(query, resource)


@pytest.mark.parametrize(("value", "expected"),
                         [('W/"3"', 3), ('"12"', 12), ("7", 7), (' W/"1" ', 1)])
def test_parse_if_match(value: str, expected: int) -> None:
    assert parse_if_match(value) == expected


@pytest.mark.parametrize("value", ["abc", 'W/"x"', 3, None])
def test_parse_if_match_refuses(value: object) -> None:
    with pytest.raises(InvalidInput):
        parse_if_match(value)


def test_conditional_reference_errors_are_404_and_412() -> None:
    entry = {"fullUrl": "urn:uuid:e-1",
             "resource": {"resourceType": "Encounter", "status": "finished",
                          "class": {"code": "AMB"},
                          "serviceProvider": {"reference": "Organization?identifier=s|1"}},
             "request": {"method": "POST", "url": "Encounter"}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    with pytest.raises(NotFound):
        plan_bundle(bundle, _counter())
    with pytest.raises(MedledgerError) as info:
        plan_bundle(bundle, _counter(), lambda q: ["o1", "o2"])
    assert info.value.http_status == 412


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


def test_a_transaction_rewrites_every_site_of_a_reference() -> None:
    """The planner rewrites references where the worker found them (``ref_sites``):
    repeated, inside lists, nested, inside a contained resource, next to ones it keeps."""
    patient = {"fullUrl": "urn:uuid:p-1", "resource": {"resourceType": "Patient"},
               "request": {"method": "POST", "url": "Patient"}}
    pref = {"reference": "urn:uuid:p-1"}
    report = {"resourceType": "DiagnosticReport", "status": "final",
              "code": {"text": "panel"}, "subject": dict(pref),
              "performer": [{"reference": "Organization?identifier=s|1"}, dict(pref)],
              "contained": [{"resourceType": "Observation", "id": "o", "status": "final",
                             "code": {"text": "x"}, "subject": dict(pref)}],
              "result": [{"reference": "#o"}],
              "extension": [{"url": "http://example.org/x",
                             "valueReference": {"reference": "urn:uuid:p-1"}}]}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        patient, {"fullUrl": "urn:uuid:r-1", "resource": report,
                  "request": {"method": "POST", "url": "DiagnosticReport"}}]}
    plan = plan_transaction(bundle, _counter(), lambda q: ["org-9"])
    out = next(p.resource for p in plan if p.resource_type == "DiagnosticReport")
    assert out["subject"] == {"reference": "Patient/p-1"}
    assert out["performer"] == [{"reference": "Organization/org-9"},
                                {"reference": "Patient/p-1"}]
    assert out["contained"][0]["subject"] == {"reference": "Patient/p-1"}
    assert out["result"] == [{"reference": "#o"}]
    assert out["extension"][0]["valueReference"] == {"reference": "Patient/p-1"}
    assert report["subject"] == pref  # the caller's Bundle is not mutated


def test_ids_are_drawn_on_the_loop_in_entry_order() -> None:
    """The worker's draft (``read_entries``) draws no ids; ``assign_ids`` draws them in
    entry order, so the node's keyed id sequence gives a retried Bundle the same ids."""
    bundle = synthetic_patient_bundle(5, n_encounters=3)
    for i, entry in enumerate(bundle["entry"]):
        if i % 4 == 1:  # creates with no id of their own: assign_ids draws theirs
            del entry["fullUrl"]
    data = orjson.dumps(bundle)
    draft = fb.read_entries(data)
    waiting = [d.index for d in draft.drafts if d.needs_id]
    assert waiting == list(range(1, len(bundle["entry"]), 4))
    assert all(d.resource_id is None for d in draft.drafts if d.needs_id)
    whole = read_bundle(data, _counter())
    assert [(d.index, d.resource_id, d.resource) for d in fb.assign_ids(
        draft, _counter()).drafts] == [(d.index, d.resource_id, d.resource)
                                       for d in whole.drafts]
    assert [d.resource_id for d in whole.drafts if d.index in waiting] == [
        f"new-{i}" for i in range(1, len(waiting) + 1)]


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_a_bundle_read_in_parts_is_the_bundle_read_whole(parts: int) -> None:
    """Slices validated on several workers join to what one reader drafts: the same
    entries, the same queries, and new ids drawn in entry order whatever the split."""
    bundle = synthetic_patient_bundle(5, n_encounters=3)
    for i, entry in enumerate(bundle["entry"]):
        if i % 4 == 1:  # creates with no id of their own: assign_ids draws theirs
            del entry["fullUrl"]
    data = orjson.dumps(bundle)
    whole = read_bundle(data, _counter())
    joined = fb.assign_ids(fb.join([fb.read_entries(data, k, parts) for k in range(parts)]),
                           _counter())
    assert [(d.index, d.resource_id, d.resource) for d in joined.drafts] == [
        (d.index, d.resource_id, d.resource) for d in whole.drafts]
    assert joined.queries == whole.queries


def test_a_transaction_read_in_parts_raises_its_first_problem_in_each() -> None:
    """Each slice raises its own first problem (the node raises the lowest slice's: the
    transaction's first problem in entry order)."""
    bundle = synthetic_patient_bundle(4, n_encounters=2)
    bundle["entry"][1]["request"]["method"] = "PATCH"
    bundle["entry"][-1]["request"]["method"] = "DELETE"
    data = orjson.dumps(bundle)
    with pytest.raises(InvalidInput, match=r"Bundle.entry\[1\].*PATCH"):
        fb.read_entries(data, 0, 2)
    with pytest.raises(InvalidInput, match=rf"Bundle.entry\[{len(bundle['entry']) - 1}\]"):
        fb.read_entries(data, 1, 2)


def test_a_transaction_raises_its_first_problem() -> None:
    """Entries are read in order: the first bad one is the one raised."""
    bundle = synthetic_patient_bundle(4, n_encounters=2)
    bundle["entry"][1]["request"]["method"] = "PATCH"
    bundle["entry"][-1]["request"]["method"] = "DELETE"
    data = orjson.dumps(bundle)
    with pytest.raises(InvalidInput, match=r"Bundle.entry\[1\].*PATCH"):
        fb.read_entries(data)
    with pytest.raises(InvalidInput, match=r"Bundle.entry\[1\]"):
        read_bundle(data, _counter())


def test_the_node_raises_the_first_slice_failure_once_every_slice_has_ended() -> None:
    """The node reads a large Bundle's slices at once: the failure raised is the first
    in entry order, and only after every slice has ended (none left running)."""
    import asyncio

    from medledger.node.bundles import _all_then_first_failure

    ended: list[int] = []

    async def job(k: int, delay: float, fail: bool) -> int:
        await asyncio.sleep(delay)
        ended.append(k)
        if fail:
            raise InvalidInput(f"slice {k}")
        return k

    async def run(*jobs: tuple[float, bool]) -> list[Any]:
        return await _all_then_first_failure(job(k, d, f) for k, (d, f) in enumerate(jobs))

    assert asyncio.run(run((0.02, False), (0.0, False))) == [0, 1]
    ended.clear()
    with pytest.raises(InvalidInput, match="slice 1"):
        asyncio.run(run((0.0, False), (0.03, True), (0.0, True), (0.05, False)))
    assert sorted(ended) == [0, 1, 2, 3]
