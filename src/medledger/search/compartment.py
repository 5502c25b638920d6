"""Patient compartment membership, per the FHIR R4 Patient CompartmentDefinition.

``patient_refs(resource)`` is the set of patient ids whose compartment the resource
is in: for its type, the definition names search parameters (``Observation``:
subject, performer; ``Provenance``: patient, i.e. ``target``; ``Encounter``:
patient…); each is evaluated like a search parameter and only references to a
``Patient`` count. A Patient is in its own compartment (and, per the definition,
in that of the patients it links to). The write path uses an empty set to mean a
directory record (ADR 5).
"""

from __future__ import annotations

from typing import Any

from medledger.search.extract import Extracted, add_values, evaluator
from medledger.search.registry import compartment_params, registry


def patient_refs(resource: dict[str, Any]) -> set[str]:
    rtype = str(resource.get("resourceType", ""))
    out: set[str] = set()
    if rtype == "Patient" and isinstance(resource.get("id"), str):
        out.add(resource["id"])
    for code in compartment_params().get(rtype, ()):
        if code == "{def}":
            continue
        param = registry().param(rtype, code)
        if param is None or param.type != "reference":
            continue
        values = Extracted()
        add_values(values, param, evaluator(param.path, rtype)(resource))
        out.update(rid for _, t, rid in values.refs if t == "Patient")
    return out


def in_patient_compartment(rtype: str) -> bool:
    """True when resources of ``rtype`` can belong to a patient's compartment."""
    return bool(compartment_params().get(rtype)) or rtype == "Patient"
