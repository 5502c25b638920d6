"""fhir.outcome: response shapes are valid FHIR R4B."""

from __future__ import annotations

from medledger.fhir.outcome import (
    etag,
    history_bundle,
    operation_outcome,
    searchset_bundle,
    transaction_response_bundle,
)
from medledger.fhir.synthetic import synthetic_observation
from medledger.fhir.validate import parse_resource


def test_operation_outcome() -> None:
    oo = operation_outcome("error", "invalid", "bad status", "Observation.status")
    assert parse_resource(oo, "OperationOutcome") == oo
    assert oo["issue"][0]["expression"] == ["Observation.status"]
    bare = operation_outcome("information", "informational", "ok")
    assert "expression" not in bare["issue"][0]
    assert parse_resource(bare) == bare


def test_searchset_bundle() -> None:
    resources = [synthetic_observation("p1", seed) for seed in range(3)]
    bundle = searchset_bundle(
        resources,
        "https://node.example/fhir/",
        total=10,
        self_link="https://node.example/fhir/Observation?patient=p1",
        next_link="https://node.example/fhir/Observation?patient=p1&_page=2",
    )
    parse_resource(bundle, "Bundle")
    assert bundle["total"] == 10
    assert (
        bundle["entry"][0]["fullUrl"]
        == f"https://node.example/fhir/Observation/{resources[0]['id']}"
    )
    assert [link["relation"] for link in bundle["link"]] == ["self", "next"]
    empty = searchset_bundle([], "https://n/fhir", 0, "https://n/fhir/Patient")
    assert "entry" not in empty
    parse_resource(empty)


def test_history_bundle_sets_meta_and_etag() -> None:
    obs = synthetic_observation("p1", 1)
    bundle = history_bundle(
        [
            (obs, "2", "2024-02-01T00:00:00Z", "PUT"),
            (obs, "1", "2024-01-01T00:00:00Z", "POST"),
        ],
        base_url="https://n/fhir",
    )
    parse_resource(bundle, "Bundle")
    first, second = bundle["entry"]
    assert first["resource"]["meta"]["versionId"] == "2"
    assert first["request"] == {"method": "PUT", "url": f"Observation/{obs['id']}"}
    assert second["request"] == {"method": "POST", "url": "Observation"}
    assert second["response"]["status"] == "201 Created"
    assert first["response"]["etag"] == 'W/"2"' == etag(2)
    assert "versionId" not in obs.get("meta", {})  # input untouched


def test_transaction_response_bundle() -> None:
    bundle = transaction_response_bundle(
        [
            ("Patient/p1/_history/1", 'W/"1"', "2024-01-01T00:00:00Z", "201 Created"),
            ("Observation/o1/_history/3", 'W/"3"', "2024-01-01T00:00:00Z", "200 OK"),
        ]
    )
    parse_resource(bundle, "Bundle")
    assert bundle["type"] == "transaction-response"
    assert bundle["entry"][1]["response"]["location"] == "Observation/o1/_history/3"
    batch = transaction_response_bundle([("", "", "", "400 Bad Request")], batch=True)
    assert batch["type"] == "batch-response"
    assert batch["entry"][0] == {"response": {"status": "400 Bad Request"}}
    parse_resource(batch)
