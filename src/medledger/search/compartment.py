"""Patient compartment membership, per the FHIR R4 Patient CompartmentDefinition.

``patient_refs(resource)`` is the set of patient ids whose compartment the resource
is in: for its type, the definition names search parameters (``Observation``:
subject, performer; ``Provenance``: patient, i.e. ``target``; ``Encounter``:
patient…); each is evaluated like a search parameter and only references to a
``Patient`` count. A Patient is in its own compartment (and, per the definition,
in that of the patients it links to).

``directory_type(rtype)``: whether a resource of that type that names no patient is a
directory record (ADR 5) -- every type the definition leaves outside the compartment,
and the staff groupings (CareTeam, Group) that are in it only when they name a patient.
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


# Outside the compartment by definition, but their content can be a patient's (a
# Binary's bytes, a Bundle's entries, a Task's focus): without a patient they are
# refused rather than shown to every member's staff.
_NEVER_DIRECTORY = frozenset({
    "Binary", "Bundle", "Contract", "GuidanceResponse", "Linkage", "MessageHeader",
    "OperationOutcome", "Subscription", "Task"})
# In the compartment only through an optional reference (a clinic's care team, a group
# of staff): naming no patient, they are directory records.
_PATIENT_OPTIONAL = frozenset({"CareTeam", "Group"})


def directory_type(rtype: str) -> bool:
    """True when a resource of ``rtype`` that names no patient is a directory record."""
    params = compartment_params()
    if rtype not in params or rtype in _NEVER_DIRECTORY:
        return False
    return rtype in _PATIENT_OPTIONAL or not params[rtype]


def in_patient_compartment(rtype: str) -> bool:
    """True when resources of ``rtype`` can belong to a patient's compartment."""
    return bool(compartment_params().get(rtype)) or rtype == "Patient"
