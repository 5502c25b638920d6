"""fhir.synthetic: deterministic, valid, realistic Synthea-style data."""

from __future__ import annotations

import itertools
from collections import Counter

from medledger.fhir.bundle import plan_transaction
from medledger.fhir.labels import classify
from medledger.fhir.synthetic import MRN_SYSTEM, synthetic_observation, synthetic_patient_bundle
from medledger.fhir.validate import canonical_bytes, parse_resource


def _no_new_ids() -> str:
    raise AssertionError("synthetic bundles use urn:uuid fullUrls; no new ids needed")


def test_seeds_0_to_20_validate_and_plan() -> None:
    labels: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    for seed in range(21):
        bundle = synthetic_patient_bundle(seed)
        plan = plan_transaction(bundle, _no_new_ids)
        assert len(plan) == len(bundle["entry"])
        patient_id = plan[0].resource_id
        for entry in plan:
            size = len(canonical_bytes(entry.resource))
            assert 700 <= size <= 3072, (entry.resource_type, size)
            c = classify(entry.resource)
            assert c.patient_id == patient_id
            labels.update(c.labels)
            categories[c.category] += 1
    assert {"PSY", "ETH", "HIV"} <= set(labels)
    assert {
        "demographics",
        "encounters",
        "vital-signs",
        "laboratory",
        "mental-health",
        "conditions",
        "medications",
        "allergies",
        "immunizations",
    } <= set(categories)


def test_deterministic_per_seed() -> None:
    assert synthetic_patient_bundle(7) == synthetic_patient_bundle(7)
    assert synthetic_patient_bundle(7) != synthetic_patient_bundle(8)
    assert synthetic_observation("p", 3) == synthetic_observation("p", 3)


def test_patient_is_realistic() -> None:
    patient = synthetic_patient_bundle(3)["entry"][0]["resource"]
    assert patient["resourceType"] == "Patient"
    assert any(i["system"] == MRN_SYSTEM for i in patient["identifier"])
    assert patient["name"][0]["family"] and patient["name"][0]["given"]
    assert patient["gender"] in ("male", "female")
    assert patient["birthDate"] and patient["address"] and patient["telecom"]
    assert patient["text"]["div"].startswith("<div")


def test_vital_signs_codes_present() -> None:
    bundle = synthetic_patient_bundle(0, n_encounters=2)
    codes = {
        e["resource"]["code"]["coding"][0]["code"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
    }
    assert {"8867-4", "85354-9", "29463-7", "8310-5", "9279-1", "4548-4", "2339-0"} <= codes


def test_large_bundle_has_300_plus_resources() -> None:
    bundle = synthetic_patient_bundle(11, n_encounters=40)
    assert len(bundle["entry"]) >= 300


def test_synthetic_observation() -> None:
    obs = synthetic_observation("patient-1", 5)
    canonical = parse_resource(obs, "Observation")
    assert 1200 <= len(canonical_bytes(canonical)) <= 2000
    c = classify(canonical)
    assert (c.category, c.labels, c.patient_id) == ("vital-signs", frozenset(), "patient-1")
    ids = {synthetic_observation("p", seed)["id"] for seed in itertools.islice(range(50), 50)}
    assert len(ids) == 50
