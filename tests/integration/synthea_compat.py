"""Load real Synthea patients into a node *as it imports today* (until issue 10 lands).

Synthea transaction Bundles do not import yet (directory resources, conditional
references, Provenance). This turns one into what does: ``urn:uuid:`` references
become ``Type/id``, conditional references (``Practitioner?identifier=…``) keep only
their display, and resources without a patient (Medication, Provenance) are left
out; the Patient is created first (with a password), the rest is one transaction
Bundle of PUTs (ids kept). Replace with the real import once main has it.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any

import orjson
from helpers import PASSWORD, NodeHandle

from medledger.fhir.labels import classify

DATA = Path(__file__).parent / "data"
_UUID = re.compile(rb'"urn:uuid:([0-9a-f-]{36})"')


def synthea_bundle(name: str) -> dict[str, Any]:
    raw = gzip.decompress((DATA / f"synthea-{name}.json.gz").read_bytes())
    doc = orjson.loads(raw)
    types = {e["fullUrl"].removeprefix("urn:uuid:"): e["resource"]["resourceType"]
             for e in doc["entry"]}
    raw = _UUID.sub(lambda m: b'"%s/%s"' % (types.get(m.group(1).decode(), "Unknown")
                                            .encode(), m.group(1)), raw)
    return orjson.loads(raw)  # type: ignore[no-any-return]


def _drop_conditional(node: Any) -> Any:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and "?" in ref:
            node = {k: v for k, v in node.items() if k != "reference"}
        return {k: _drop_conditional(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_drop_conditional(v) for v in node]
    return node


def importable(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Patient, the other resources the node stores today) of a Synthea patient."""
    resources = [_drop_conditional(e["resource"]) for e in synthea_bundle(name)["entry"]]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    rest = [r for r in resources if r["resourceType"] != "Patient"
            and classify(r).patient_id == patient["id"]]
    return patient, rest


def load_synthea(node: NodeHandle, name: str, who: str = "dr-house"
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    patient, rest = importable(name)
    with node.client(who) as c:
        c.request("PUT", f"/fhir/Patient/{patient['id']}", patient,
                  headers={"X-Medledger-Patient-Password": PASSWORD})
        c.post("/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r,
             "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in rest]})
    node.patients.append(patient["id"])
    return patient, rest
