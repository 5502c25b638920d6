"""Property-based API fuzzing (schemathesis) from the node's own OpenAPI schema, against a
real node process, unauthenticated and as a practitioner and a patient: no 5xx, and every
error response is a FHIR OperationOutcome (the SMART Health Links wrong-passcode answer
keeps the SHL spec's ``{remainingAttempts}`` shape). Bounded: a few examples per route."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from helpers import PASSWORD, NodeHandle, load_patient, running_node
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("MEDLEDGER_FUZZ_EXAMPLES", "8"))
_NODE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("fuzz") / "home") as node:
        load_patient(node, 1, n_encounters=1)
        _NODE["node"] = node
        _NODE["tokens"] = {
            "practitioner": _token(node, "dr-house"),
            "patient": _token(node, node.patients[0]),
        }
        yield node


def _token(node: NodeHandle, who: str) -> str:
    resp = httpx.post(node.url + "/auth/login", json={"id": who, "password": PASSWORD})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def _check(case: Any, response: Any) -> None:
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        doc = response.json()
        if case.path.startswith("/shl/") and response.status_code == 401:
            assert "remainingAttempts" in doc, doc
            return
        assert doc.get("resourceType") == "OperationOutcome", f"{where}: {doc}"
        assert doc["issue"][0]["diagnostics"], doc


def test_api_fuzz(fuzz_node: NodeHandle) -> None:
    """Every operation of the schema, ``EXAMPLES`` generated cases each, each case sent
    anonymously, as a practitioner and as the patient."""
    api = schemathesis.openapi.from_url(fuzz_node.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) > 30, [op.label for op in operations]
    auth = [{}] + [{"Authorization": f"Bearer {t}"} for t in _NODE["tokens"].values()]
    for operation in operations:

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            for headers in auth:
                _check(case, case.call(headers=headers, timeout=60))

        fuzz()
