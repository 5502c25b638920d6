"""Classification of FHIR resources for policy: category, sensitivity labels, patient.

This module owns the mapping from a (validated) FHIR resource to the plaintext
metadata that ``core.policy`` decides on:

* ``category`` — one coarse clinical category per resource (``vital-signs``,
  ``mental-health``, ``medications`` ...), see :data:`CATEGORIES`;
* ``labels`` — HL7 v3 ActCode sensitivity labels (``PSY`` mental health,
  ``ETH`` substance use, ``HIV``, ``SDV`` sexual/domestic violence, ``STD``),
  derived from the resource's codes and unioned with any codes already in
  ``meta.security``;
* ``patient_id``, ``date`` and ``codes`` (``system|code`` tokens) for in-memory
  search.  ``codes`` and ``date`` are PHI: they stay inside the encrypted record
  and must never be written to the ledger in plaintext.

Pure and deterministic: a function of the resource dict only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CATEGORIES",
    "Classification",
    "classify",
    "patient_id_from_reference",
    "sensitivity_labels",
]

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10_SYSTEMS = frozenset({"http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm"})
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"

CATEGORIES = frozenset(
    {
        "demographics",
        "vital-signs",
        "laboratory",
        "medications",
        "allergies",
        "conditions",
        "procedures",
        "immunizations",
        "encounters",
        "mental-health",
        "social-history",
        "documents",
        "care-plan",
        "claims",
        "consent",
        "other",
    }
)

_CATEGORY_BY_TYPE: dict[str, str] = {
    "Patient": "demographics",
    "RelatedPerson": "demographics",
    "Medication": "medications",
    "MedicationRequest": "medications",
    "MedicationStatement": "medications",
    "MedicationAdministration": "medications",
    "MedicationDispense": "medications",
    "AllergyIntolerance": "allergies",
    "Condition": "conditions",
    "Procedure": "procedures",
    "Immunization": "immunizations",
    "Encounter": "encounters",
    "DocumentReference": "documents",
    "Composition": "documents",
    "DiagnosticReport": "documents",
    "CarePlan": "care-plan",
    "CareTeam": "care-plan",
    "Goal": "care-plan",
    "Claim": "claims",
    "ExplanationOfBenefit": "claims",
    "Coverage": "claims",
    "Consent": "consent",
}

# -- sensitivity code sets --------------------------------------------------------------------

_PSY_LOINC = frozenset(
    {
        "44249-1",  # PHQ-9 quick depression assessment panel
        "44261-6",  # PHQ-9 total score
        "55757-9",  # PHQ-2 panel
        "55758-7",  # PHQ-2 total score
        "73831-0",  # adolescent depression screening assessment
        "73832-8",  # adult depression screening assessment
        "69737-5",  # GAD-7 panel
        "70274-6",  # GAD-7 total score
        "89204-2",  # PHQ-9 modified for teens total score
        "71354-5",  # Edinburgh postnatal depression scale total
        # PHQ-9 items
        "44250-9",
        "44251-7",
        "44252-5",
        "44253-3",
        "44254-1",
        "44255-8",
        "44258-2",
        "44259-0",
        "44260-8",
        # GAD-7 items
        "69725-0",
        "68509-9",
        "69733-4",
        "69734-2",
        "69735-9",
        "69689-8",
        "69736-7",
    }
)
_PSY_SNOMED = frozenset(
    {
        "35489007",  # depressive disorder
        "370143000",  # major depressive disorder
        "36923009",  # major depression, single episode
        "197480006",  # anxiety disorder
        "21897009",  # generalized anxiety disorder
        "48694002",  # anxiety
        "231504006",  # mixed anxiety and depressive disorder
        "58214004",  # schizophrenia
        "13746004",  # bipolar disorder
        "47505003",  # posttraumatic stress disorder
        "69322001",  # psychotic disorder
        "74732009",  # mental disorder
    }
)
_ETH_LOINC = frozenset(
    {
        "72109-2",  # AUDIT-C panel
        "75626-2",  # AUDIT-C total score
        "75624-7",  # AUDIT total score
        "82666-9",  # DAST-10 total score
        "68517-2",  # single-question drug use screen
    }
)
_ETH_SNOMED = frozenset(
    {
        "7200002",  # alcoholism
        "15167005",  # alcohol abuse
        "66590003",  # alcohol dependence
        "191816009",  # drug dependence
        "26416006",  # drug abuse
        "6525002",  # dependent drug abuse
        "5602001",  # opioid abuse
        "75544000",  # opioid dependence
        "55680006",  # drug overdose
    }
)
_HIV_LOINC = frozenset(
    {
        "75622-1",  # HIV 1+2 Ab + HIV1 p24 Ag screen
        "7917-8",  # HIV 1 Ab
        "5221-7",  # HIV 1 Ab western blot
        "56888-1",  # HIV 1+2 Ab + HIV1 p24 Ag
        "68961-2",  # HIV 1 Ab
        "25836-8",  # HIV 1 RNA copies
        "20447-9",  # HIV 1 RNA
    }
)
_HIV_SNOMED = frozenset(
    {
        "86406008",  # HIV infection
        "165816005",  # HIV positive
        "62479008",  # AIDS
        "91947003",  # asymptomatic HIV infection
    }
)
_SDV_SNOMED = frozenset({"706893006"})  # victim of intimate partner abuse

_VITAL_SIGN_LOINC = frozenset(
    {
        "85353-1",
        "8867-4",
        "85354-9",
        "8480-6",
        "8462-4",
        "29463-7",
        "8310-5",
        "9279-1",
        "8302-2",
        "39156-5",
        "59408-5",
        "2708-6",
        "8287-5",
        "9843-4",
        "72514-3",
    }
)
_LAB_LOINC = frozenset({"4548-4", "2339-0", "2345-7", "2093-3", "2571-8", "18262-6", "2085-9"})
_SOCIAL_LOINC = frozenset({"72166-2", "76689-9", "63586-2", "93025-5"})

_OBS_CATEGORY_MAP = {
    "vital-signs": "vital-signs",
    "laboratory": "laboratory",
    "social-history": "social-history",
}


@dataclass(frozen=True, slots=True)
class Classification:
    """What policy and search need to know about one resource.

    ``codes`` and ``date`` are PHI and stay encrypted; ``resource_type``,
    ``patient_id``, ``category`` and ``labels`` are the plaintext metadata.
    """

    resource_type: str
    patient_id: str | None
    category: str
    labels: frozenset[str]
    date: str | None
    codes: tuple[str, ...]


def classify(resource: Mapping[str, Any]) -> Classification:
    """Classify a FHIR resource dict (ideally the output of ``parse_resource``)."""
    resource_type = str(resource.get("resourceType", ""))
    labels = sensitivity_labels(resource)
    return Classification(
        resource_type=resource_type,
        patient_id=_patient_id(resource_type, resource),
        category=_category(resource_type, resource, labels),
        labels=labels,
        date=_date(resource_type, resource),
        codes=tuple(_search_codes(resource)),
    )


# Medicines whose mere prescription discloses the condition (matched on the drug
# name in coding.display / text: RxNorm clinical-drug codes are too many to list).
_PSY_DRUGS = ("sertraline", "fluoxetine", "citalopram", "escitalopram", "paroxetine",
              "venlafaxine", "duloxetine", "bupropion", "mirtazapine", "trazodone",
              "amitriptyline", "nortriptyline", "lithium", "quetiapine", "olanzapine",
              "risperidone", "aripiprazole", "haloperidol", "clozapine", "ziprasidone",
              "lurasidone", "paliperidone", "chlorpromazine", "methylphenidate")
_ETH_DRUGS = ("buprenorphine", "methadone", "naltrexone", "disulfiram", "acamprosate")
_HIV_DRUGS = ("tenofovir", "emtricitabine", "efavirenz", "dolutegravir", "bictegravir",
              "raltegravir", "darunavir", "atazanavir", "lopinavir", "abacavir",
              "zidovudine", "lamivudine", "rilpivirine", "nevirapine")


def _medication_text(resource: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for cc in _as_list(resource.get("medicationCodeableConcept")):
        if isinstance(cc, Mapping):
            parts.append(str(cc.get("text", "")))
            parts.extend(str(c.get("display", "")) for c in _as_list(cc.get("coding"))
                         if isinstance(c, Mapping))
    return " ".join(parts).lower()


def _medication_labels(resource: Mapping[str, Any]) -> Iterable[str]:
    text = _medication_text(resource)
    if not text.strip():
        return
    for label, names in (("PSY", _PSY_DRUGS), ("ETH", _ETH_DRUGS), ("HIV", _HIV_DRUGS)):
        if any(name in text for name in names):
            yield label


def sensitivity_labels(resource: Mapping[str, Any]) -> frozenset[str]:
    """HL7 v3 ActCode sensitivity labels of a resource: derived from codes ∪ meta.security."""
    labels: set[str] = set()
    for system, code in _label_codings(resource):
        labels.update(_labels_of_coding(system, code))
    labels.update(_medication_labels(resource))
    meta = resource.get("meta")
    if isinstance(meta, Mapping):
        for coding in _as_list(meta.get("security")):
            if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
                labels.add(coding["code"])
    return frozenset(labels)


def patient_id_from_reference(reference: object) -> str | None:
    """The patient id in a reference string: ``Patient/<id>``, ``.../Patient/<id>[/_history/n]``
    or ``urn:uuid:<id>``; ``None`` for anything else."""
    if not isinstance(reference, str) or not reference:
        return None
    if reference.startswith("urn:uuid:"):
        return reference.removeprefix("urn:uuid:") or None
    parts = reference.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


# -- internals ---------------------------------------------------------------------------------


def _as_list(value: object) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _codings(concept: object) -> Iterator[tuple[str, str]]:
    for cc in _as_list(concept):
        if not isinstance(cc, Mapping):
            continue
        for coding in _as_list(cc.get("coding")):
            if isinstance(coding, Mapping):
                code = coding.get("code")
                if isinstance(code, str):
                    system = coding.get("system")
                    yield (system if isinstance(system, str) else ""), code


_SEARCH_CODE_ELEMENTS = ("code", "vaccineCode", "medicationCodeableConcept")
_LABEL_CODE_ELEMENTS = (*_SEARCH_CODE_ELEMENTS, "valueCodeableConcept", "reasonCode", "type")


def _search_codes(resource: Mapping[str, Any]) -> Iterator[str]:
    seen: set[str] = set()
    for element in _SEARCH_CODE_ELEMENTS:
        for system, code in _codings(resource.get(element)):
            token = f"{system}|{code}"
            if token not in seen:
                seen.add(token)
                yield token


def _label_codings(resource: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for element in _LABEL_CODE_ELEMENTS:
        yield from _codings(resource.get(element))
    for component in _as_list(resource.get("component")):
        if isinstance(component, Mapping):
            yield from _codings(component.get("code"))


def _icd10_in(code: str, first: str, last: str) -> bool:
    """Whether an ICD-10 code's category (letter + 2 digits) lies in [first, last]."""
    head = code.upper().replace(".", "")[:3]
    return len(head) == 3 and first <= head <= last


def _labels_of_coding(system: str, code: str) -> Iterable[str]:
    if system == LOINC:
        if code in _PSY_LOINC:
            yield "PSY"
        if code in _ETH_LOINC:
            yield "ETH"
        if code in _HIV_LOINC:
            yield "HIV"
    elif system == SNOMED:
        if code in _PSY_SNOMED:
            yield "PSY"
        if code in _ETH_SNOMED:
            yield "ETH"
        if code in _HIV_SNOMED:
            yield "HIV"
        if code in _SDV_SNOMED:
            yield "SDV"
    elif system in ICD10_SYSTEMS:
        if _icd10_in(code, "F10", "F19"):
            yield "ETH"
        elif _icd10_in(code, "F01", "F99"):
            yield "PSY"
        if _icd10_in(code, "B20", "B24") or _icd10_in(code, "Z21", "Z21"):
            yield "HIV"
        if code.upper().replace(".", "").startswith("O987"):
            yield "HIV"
        if _icd10_in(code, "A50", "A64"):
            yield "STD"
        if _icd10_in(code, "T74", "T74") or _icd10_in(code, "T76", "T76"):
            yield "SDV"


def _patient_id(resource_type: str, resource: Mapping[str, Any]) -> str | None:
    if resource_type == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) else None
    for element in ("subject", "patient", "beneficiary"):
        ref = resource.get(element)
        if isinstance(ref, Mapping):
            pid = patient_id_from_reference(ref.get("reference"))
            if pid is not None:
                return pid
    return None


def _category(resource_type: str, resource: Mapping[str, Any], labels: frozenset[str]) -> str:
    if resource_type == "Observation":
        return _observation_category(resource, labels)
    if resource_type == "Condition" and "PSY" in labels:
        return "mental-health"
    if resource_type == "DiagnosticReport":
        for system, code in _codings(resource.get("category")):
            if code == "LAB" or (system == OBSERVATION_CATEGORY and code == "laboratory"):
                return "laboratory"
        return "documents"
    return _CATEGORY_BY_TYPE.get(resource_type, "other")


def _observation_category(resource: Mapping[str, Any], labels: frozenset[str]) -> str:
    if "PSY" in labels:
        return "mental-health"
    declared = {code for _system, code in _codings(resource.get("category"))}
    for code in ("vital-signs", "laboratory", "social-history"):
        if code in declared:
            return _OBS_CATEGORY_MAP[code]
    if "ETH" in labels:
        return "social-history"
    loinc = {code for system, code in _codings(resource.get("code")) if system == LOINC}
    if loinc & _VITAL_SIGN_LOINC:
        return "vital-signs"
    if loinc & _LAB_LOINC:
        return "laboratory"
    if loinc & _SOCIAL_LOINC:
        return "social-history"
    return "other"


_DATE_PATHS: tuple[tuple[str, ...], ...] = (
    ("effectiveDateTime",),
    ("effectivePeriod", "start"),
    ("effectiveInstant",),
    ("onsetDateTime",),
    ("onsetPeriod", "start"),
    ("performedDateTime",),
    ("performedPeriod", "start"),
    ("occurrenceDateTime",),
    ("authoredOn",),
    ("recordedDate",),
    ("period", "start"),
    ("billablePeriod", "start"),
    ("issued",),
    ("dateTime",),
    ("date",),
    ("recorded",),
    ("created",),
)


def _date(resource_type: str, resource: Mapping[str, Any]) -> str | None:
    if resource_type == "Patient":
        birth = resource.get("birthDate")
        return birth if isinstance(birth, str) else None
    for path in _DATE_PATHS:
        node: object = resource
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, str):
            return node
    return None
