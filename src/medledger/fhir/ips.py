"""International Patient Summary (IPS): one patient's records as a FHIR document.

This module owns how a patient's resources become an IPS document Bundle
(http://hl7.org/fhir/uv/ips): a ``document`` Bundle whose first entry is a
Composition of LOINC type 60591-5 "Patient summary Document", followed by the
Patient and every resource the sections point at. Sections (LOINC codes):

==================  =======  ==========================================  ========
section             code     resources                                   required
==================  =======  ==========================================  ========
Problems            11450-4  Condition                                   yes
Allergies           48765-2  AllergyIntolerance                          yes
Medications         10160-0  MedicationStatement, MedicationRequest      yes
Immunizations       11369-6  Immunization                                no
Results             30954-2  laboratory Observation, DiagnosticReport    no
Vital signs         8716-3   vital-signs Observation                     no
==================  =======  ==========================================  ========

A required section with nothing in it carries ``emptyReason`` (list-empty-reason
"unavailable"); optional empty sections are left out. Entries are referenced by
their ``fullUrl`` and references between included resources are rewritten to
those fullUrls, so the document resolves on its own. Resources of other patients
are refused, entered-in-error records are left out.

Pure and deterministic: the timestamp and the Composition id are arguments, and
``urn:uuid`` fullUrls are name-based (UUIDv5) when resource ids are not UUIDs.
"""

from __future__ import annotations

import copy
import html
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medledger.errors import InvalidInput

__all__ = [
    "IPS_SECTIONS",
    "IpsSection",
    "international_patient_summary",
]

LOINC = "http://loinc.org"
EMPTY_REASON_SYSTEM = "http://terminology.hl7.org/CodeSystem/list-empty-reason"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
IPS_BUNDLE_PROFILE = "http://hl7.org/fhir/uv/ips/StructureDefinition/Bundle-uv-ips"
IPS_COMPOSITION_PROFILE = "http://hl7.org/fhir/uv/ips/StructureDefinition/Composition-uv-ips"
DOCUMENT_ID_SYSTEM = "urn:ietf:rfc:3986"
# Namespace for name-based fullUrls of resources whose ids are not UUIDs.
_FULLURL_NAMESPACE = uuid.UUID("6f1c8a52-3c1e-5b8e-9d0a-6d65646c6467")

_INSTANT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True)
class IpsSection:
    """One IPS section: its LOINC code, title and which resources belong in it."""

    key: str
    code: str
    display: str
    title: str
    resource_types: tuple[str, ...]
    required: bool
    observation_category: str | None = None


IPS_SECTIONS: tuple[IpsSection, ...] = (
    IpsSection("problems", "11450-4", "Problem list - Reported", "Problems", ("Condition",), True),
    IpsSection(
        "allergies",
        "48765-2",
        "Allergies and adverse reactions Document",
        "Allergies and Intolerances",
        ("AllergyIntolerance",),
        True,
    ),
    IpsSection(
        "medications",
        "10160-0",
        "History of Medication use Narrative",
        "Medication Summary",
        ("MedicationStatement", "MedicationRequest"),
        True,
    ),
    IpsSection(
        "immunizations",
        "11369-6",
        "History of Immunization Narrative",
        "Immunizations",
        ("Immunization",),
        False,
    ),
    IpsSection(
        "results",
        "30954-2",
        "Relevant diagnostic tests/laboratory data Narrative",
        "Results",
        ("Observation", "DiagnosticReport"),
        False,
        observation_category="laboratory",
    ),
    IpsSection(
        "vital-signs",
        "8716-3",
        "Vital signs",
        "Vital Signs",
        ("Observation",),
        False,
        observation_category="vital-signs",
    ),
)

_PATIENT_REFERENCE_FIELDS = ("subject", "patient")


# ------------------------------------------------------------------------ helpers


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _codings(concept: Any) -> list[Mapping[str, Any]]:
    if not isinstance(concept, Mapping):
        return []
    return [c for c in _as_list(concept.get("coding")) if isinstance(c, Mapping)]


def _concept_text(concept: Any) -> str:
    if not isinstance(concept, Mapping):
        return ""
    if isinstance(concept.get("text"), str) and concept["text"]:
        return str(concept["text"])
    for coding in _codings(concept):
        if coding.get("display"):
            return str(coding["display"])
    for coding in _codings(concept):
        if coding.get("code"):
            return str(coding["code"])
    return ""


def _key(resource: Mapping[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _full_url(resource_type: str, resource_id: str, base_url: str | None) -> str:
    if base_url is not None:
        return f"{base_url.rstrip('/')}/{resource_type}/{resource_id}"
    try:
        return f"urn:uuid:{uuid.UUID(resource_id)}"
    except ValueError:
        return f"urn:uuid:{uuid.uuid5(_FULLURL_NAMESPACE, f'{resource_type}/{resource_id}')}"


def _check_resource(resource: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(resource, Mapping) or not isinstance(resource.get("resourceType"), str):
        raise InvalidInput(f"{where} is not a FHIR resource (a JSON object with resourceType)")
    rid = resource.get("id")
    if not isinstance(rid, str) or not _ID_RE.match(rid):
        raise InvalidInput(
            f"{where} ({resource['resourceType']}) needs an id of 1-64 letters, digits, '-' or '.'"
        )
    return resource


def _entered_in_error(resource: Mapping[str, Any]) -> bool:
    if resource.get("status") == "entered-in-error":
        return True
    verification = resource.get("verificationStatus")
    return any(c.get("code") in ("entered-in-error", "refuted") for c in _codings(verification))


def _referenced_patient(resource: Mapping[str, Any]) -> str | None:
    for field in _PATIENT_REFERENCE_FIELDS:
        ref = resource.get(field)
        if isinstance(ref, Mapping) and isinstance(ref.get("reference"), str):
            return str(ref["reference"])
    return None


def _observation_categories(resource: Mapping[str, Any]) -> set[str]:
    return {
        str(c.get("code"))
        for concept in _as_list(resource.get("category"))
        for c in _codings(concept)
        if c.get("code")
    }


def _section_for(resource: Mapping[str, Any]) -> IpsSection | None:
    rtype = resource["resourceType"]
    for section in IPS_SECTIONS:
        if rtype not in section.resource_types:
            continue
        if rtype == "Observation" and section.observation_category is not None:
            if section.observation_category in _observation_categories(resource):
                return section
            continue
        return section
    return None


def _references(node: Any) -> Iterable[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def _rewrite_references(node: Any, urls: Mapping[str, str]) -> Any:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in urls:
                out[key] = urls[value]
            else:
                out[key] = _rewrite_references(value, urls)
        return out
    if isinstance(node, list):
        return [_rewrite_references(item, urls) for item in node]
    return copy.deepcopy(node)


# ---------------------------------------------------------------------- narrative


def _value_text(resource: Mapping[str, Any]) -> str:
    quantity = resource.get("valueQuantity")
    if isinstance(quantity, Mapping) and "value" in quantity:
        unit = quantity.get("unit") or quantity.get("code") or ""
        return f"{quantity['value']} {unit}".strip()
    if isinstance(resource.get("valueString"), str):
        return str(resource["valueString"])
    if "valueCodeableConcept" in resource:
        return _concept_text(resource["valueCodeableConcept"])
    parts = []
    for component in _as_list(resource.get("component")):
        if isinstance(component, Mapping):
            text = _value_text(component)
            if text:
                parts.append(f"{_concept_text(component.get('code'))} {text}".strip())
    return ", ".join(parts)


def _describe(resource: Mapping[str, Any], by_key: Mapping[str, Mapping[str, Any]]) -> str:
    rtype = resource["resourceType"]
    if rtype in ("MedicationStatement", "MedicationRequest"):
        name = _concept_text(resource.get("medicationCodeableConcept"))
        ref = resource.get("medicationReference")
        if not name and isinstance(ref, Mapping):
            target = by_key.get(str(ref.get("reference", "")))
            name = _concept_text(target.get("code")) if target else str(ref.get("display", ""))
        return name or "Medication"
    if rtype == "Immunization":
        text = _concept_text(resource.get("vaccineCode")) or "Immunization"
        date = resource.get("occurrenceDateTime")
        return f"{text} ({date})" if isinstance(date, str) else text
    text = _concept_text(resource.get("code")) or rtype
    if rtype == "Observation":
        value = _value_text(resource)
        date = resource.get("effectiveDateTime")
        text = f"{text}: {value}" if value else text
        return f"{text} ({date})" if isinstance(date, str) else text
    if rtype == "Condition":
        status = _concept_text(resource.get("clinicalStatus"))
        return f"{text} ({status})" if status else text
    if rtype == "AllergyIntolerance":
        criticality = resource.get("criticality")
        return f"{text} (criticality {criticality})" if isinstance(criticality, str) else text
    return text


def _narrative(lines: Sequence[str], empty: str) -> dict[str, str]:
    if not lines:
        body = f"<p>{html.escape(empty)}</p>"
    else:
        body = "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


# -------------------------------------------------------------------------- public


def international_patient_summary(
    patient: Mapping[str, Any],
    resources: Sequence[Mapping[str, Any]],
    now_iso: str,
    composition_id: str,
    *,
    base_url: str | None = None,
    author: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the IPS document Bundle for ``patient`` from their ``resources``.

    ``now_iso`` is the document time (an instant with a timezone, e.g.
    ``2025-01-31T12:00:00Z``); ``composition_id`` names the Composition and the
    document identifier. With ``base_url`` entries get RESTful fullUrls
    (``{base_url}/{type}/{id}``), otherwise ``urn:uuid`` ones. ``author`` is the
    Composition author reference (default: the medledger node, by display).
    """
    _check_resource(patient, "patient")
    if patient["resourceType"] != "Patient":
        raise InvalidInput(f"an IPS is about a Patient, got {patient['resourceType']}")
    if not isinstance(now_iso, str) or not _INSTANT_RE.match(now_iso):
        raise InvalidInput(
            f"IPS document time must be an instant with a timezone, got {now_iso!r}",
            hint="e.g. 2025-01-31T12:00:00Z",
        )
    if not isinstance(composition_id, str) or not _ID_RE.match(composition_id):
        raise InvalidInput("IPS composition id must be 1-64 letters, digits, '-' or '.'")

    patient_key = _key(patient)
    patient_url = _full_url("Patient", patient["id"], base_url)
    by_key: dict[str, Mapping[str, Any]] = {}
    for index, resource in enumerate(resources):
        _check_resource(resource, f"resources[{index}]")
        key = _key(resource)
        if key == patient_key:
            continue
        if key in by_key:
            raise InvalidInput(f"resources list {key} twice; pass each version once")
        by_key[key] = resource

    # Which records go into which section, in the order given.
    members: dict[str, list[str]] = {section.key: [] for section in IPS_SECTIONS}
    for key, resource in by_key.items():
        section = _section_for(resource)
        if section is None or _entered_in_error(resource):
            continue
        owner = _referenced_patient(resource)
        if owner is not None and not _is_same_patient(owner, patient_key, patient_url):
            raise InvalidInput(
                f"{key} belongs to {owner}, not {patient_key}; an IPS holds one patient only"
            )
        members[section.key].append(key)

    # Resources the section entries point at (Medication, Practitioner ...), transitively.
    included: list[str] = [key for keys in members.values() for key in keys]
    seen = set(included)
    frontier = list(included)
    while frontier:
        for ref in _references(by_key[frontier.pop(0)]):
            if ref in by_key and ref not in seen:
                seen.add(ref)
                included.append(ref)
                frontier.append(ref)

    urls = {patient_key: patient_url}
    for key in included:
        rtype, rid = key.split("/", 1)
        urls[key] = _full_url(rtype, rid, base_url)
    composition_url = _full_url("Composition", composition_id, base_url)

    sections: list[dict[str, Any]] = []
    for section in IPS_SECTIONS:
        keys = members[section.key]
        if not keys and not section.required:
            continue
        block: dict[str, Any] = {
            "title": section.title,
            "code": {
                "coding": [{"system": LOINC, "code": section.code, "display": section.display}]
            },
            "text": _narrative(
                [_describe(by_key[k], by_key) for k in keys],
                f"No information about {section.title.lower()} is available.",
            ),
        }
        if keys:
            block["entry"] = [{"reference": urls[k]} for k in keys]
        else:
            block["emptyReason"] = {
                "coding": [
                    {"system": EMPTY_REASON_SYSTEM, "code": "unavailable", "display": "Unavailable"}
                ]
            }
        sections.append(block)

    patient_name = _patient_display(patient)
    composition: dict[str, Any] = {
        "resourceType": "Composition",
        "id": composition_id,
        "meta": {"profile": [IPS_COMPOSITION_PROFILE]},
        "text": _narrative([f"Patient summary for {patient_name}, {now_iso}"], ""),
        "status": "final",
        "type": {
            "coding": [{"system": LOINC, "code": "60591-5", "display": "Patient summary Document"}]
        },
        "subject": {"reference": urls[patient_key], "display": patient_name},
        "date": now_iso,
        "author": [dict(author) if author is not None else {"display": "medledger"}],
        "title": f"International Patient Summary for {patient_name}",
        "section": sections,
    }

    entries = [
        {"fullUrl": composition_url, "resource": composition},
        {"fullUrl": urls[patient_key], "resource": _rewrite_references(patient, urls)},
    ]
    entries.extend(
        {"fullUrl": urls[key], "resource": _rewrite_references(by_key[key], urls)}
        for key in included
    )
    return {
        "resourceType": "Bundle",
        "id": composition_id,
        "meta": {"profile": [IPS_BUNDLE_PROFILE]},
        "identifier": {"system": DOCUMENT_ID_SYSTEM, "value": composition_url},
        "type": "document",
        "timestamp": now_iso,
        "entry": entries,
    }


def _is_same_patient(reference: str, patient_key: str, patient_url: str) -> bool:
    return reference in (patient_key, patient_url) or reference.endswith("/" + patient_key)


def _patient_display(patient: Mapping[str, Any]) -> str:
    for name in _as_list(patient.get("name")):
        if not isinstance(name, Mapping):
            continue
        if isinstance(name.get("text"), str) and name["text"]:
            return str(name["text"])
        parts = [str(g) for g in _as_list(name.get("given")) if isinstance(g, str)]
        if isinstance(name.get("family"), str):
            parts.append(name["family"])
        if parts:
            return " ".join(parts)
    return f"Patient/{patient['id']}"
