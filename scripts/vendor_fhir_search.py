"""Regenerate medledger's trimmed FHIR R4 search registry and Patient compartment.

Sources (HL7 FHIR R4, version 4.0.1; FHIR is published under CC0, "no rights
reserved"):

- ``search-parameters.json``: the R4 SearchParameter Bundle, as published in the
  spec's definitions (https://hl7.org/fhir/R4/search-parameters.json), in the
  ``hl7.fhir.r4.core#4.0.1`` package and in HAPI FHIR's
  ``hapi-fhir-validation-resources-r4/.../org/hl7/fhir/r4/model/sp/search-parameters.json``.
- ``compartmentdefinition-patient.json``: the R4 Patient CompartmentDefinition
  (https://hl7.org/fhir/R4/compartmentdefinition-patient.json).

Usage::

    python scripts/vendor_fhir_search.py search-parameters.json \
        compartmentdefinition-patient.json

writes ``src/medledger/search/data/search-parameters.r4.json`` and
``src/medledger/search/data/compartment-patient.r4.json``. The trimmed registry keeps,
for the resource types below and the common ``Resource``/``DomainResource``
parameters, each parameter's code, type, FHIRPath expression (only the union
branches for that type, as HAPI FHIR does), reference targets, comparators,
modifiers and composite components (resolved to component codes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# Every type Synthea 3.x emits, the directory types of ADR 5 and a few clinical types
# that real EHR exports carry besides.
TYPES = sorted({
    # Synthea (patient bundles, hospital and practitioner batches)
    "AllergyIntolerance", "CarePlan", "CareTeam", "Claim", "Condition", "Coverage",
    "Device", "DiagnosticReport", "DocumentReference", "Encounter", "ExplanationOfBenefit",
    "ImagingStudy", "Immunization", "Location", "Medication", "MedicationAdministration",
    "MedicationRequest", "Observation", "Organization", "Patient", "Practitioner",
    "PractitionerRole", "Procedure", "Provenance", "SupplyDelivery",
    # directory records (ADR 5)
    "Endpoint", "HealthcareService", "Substance",
    # common clinical types outside Synthea
    "Goal", "RelatedPerson", "ServiceRequest",
})
COMMON = ("Resource", "DomainResource")
KEEP = ("type", "target")
SKIP_COMMON = {"_content", "_query", "_text"}  # full-text and named queries: not offered

OUT = Path(__file__).resolve().parent.parent / "src" / "medledger" / "search" / "data"


def split_union(expression: str) -> list[str]:
    """Top-level ``|`` branches of a FHIRPath expression (not inside parentheses)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expression):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def branch_for(expression: str, rtype: str) -> str | None:
    """The branches of ``expression`` that apply to ``rtype`` (None if none do)."""
    if rtype in COMMON:
        return expression
    keep = [b for b in split_union(expression)
            if b.lstrip("(").startswith((rtype + ".", rtype + " ")) or b == rtype]
    return " | ".join(keep) if keep else None


def trim(bundle: dict[str, Any]) -> dict[str, Any]:
    by_url = {e["resource"]["url"]: e["resource"] for e in bundle["entry"]}
    params: dict[str, dict[str, Any]] = {t: {} for t in (*COMMON, *TYPES)}
    for entry in bundle["entry"]:
        sp = entry["resource"]
        for base in sp["base"]:
            if base not in params or (base in COMMON and sp["code"] in SKIP_COMMON):
                continue
            expression = sp.get("expression")
            if expression is None:
                continue
            expr = branch_for(expression, base)
            if expr is None:
                continue
            out: dict[str, Any] = {"expression": expr}
            out.update({k: sp[k] for k in KEEP if k in sp})
            if sp["type"] == "composite":
                out["component"] = [{"param": by_url[c["definition"]]["code"],
                                     "type": by_url[c["definition"]]["type"],
                                     "expression": c["expression"]}
                                    for c in sp["component"]]
            params[base][sp["code"]] = out
    return {"source": {
        "name": "HL7 FHIR R4 SearchParameter registry (search-parameters.json)",
        "version": "4.0.1", "license": "CC0-1.0",
        "url": "https://hl7.org/fhir/R4/search-parameters.json",
        "generator": "scripts/vendor_fhir_search.py"},
        "params": {t: dict(sorted(p.items())) for t, p in params.items()}}


def trim_compartment(doc: dict[str, Any]) -> dict[str, Any]:
    return {"source": {"name": "HL7 FHIR R4 Patient CompartmentDefinition",
                       "version": "4.0.1", "license": "CC0-1.0", "url": doc["url"],
                       "generator": "scripts/vendor_fhir_search.py"},
            "resource": {r["code"]: r.get("param", []) for r in doc["resource"]}}


def main(sp_path: str, compartment_path: str) -> None:
    bundle = json.loads(Path(sp_path).read_text(encoding="utf-8"))
    compartment = json.loads(Path(compartment_path).read_text(encoding="utf-8"))
    if {e["resource"].get("version") for e in bundle["entry"]} != {"4.0.1"}:
        raise SystemExit(f"{sp_path} is not the FHIR 4.0.1 registry")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "search-parameters.r4.json").write_text(
        json.dumps(trim(bundle), indent=1, sort_keys=False) + "\n", encoding="utf-8")
    (OUT / "compartment-patient.r4.json").write_text(
        json.dumps(trim_compartment(compartment), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}/search-parameters.r4.json and compartment-patient.r4.json")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
