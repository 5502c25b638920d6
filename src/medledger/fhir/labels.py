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

import base64
import binascii
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CATEGORIES",
    "Classification",
    "classify",
    "patient_id_from_reference",
    "patient_of",
    "policy_kind",
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
#
# What is labelled: diagnoses and findings, results of screening instruments (the
# observations and report panels that carry a score or an answer), treatments, care
# plans, notes of a sensitive kind and medicines that disclose the condition. What is
# not: the routine screening *procedures* themselves ("depression screening",
# "HIV screening", "screening for domestic abuse"), done at most wellness visits and
# saying nothing of the outcome, and contraception (routine care a prescriber needs
# to see). Every code Synthea 3.3.0 emits was reviewed against this rule (its modules:
# mental health, self harm, veteran MDD/PTSD/substance use, opioid addiction and OUD
# treatment, HIV, pregnancy, homelessness/PRAPARE).
#
# SNOMED CT codes carry their display as Synthea writes it: clinical notes (base64
# text in DocumentReference.content and DiagnosticReport.presentedForm) are labelled
# when they mention one of them, since a note repeats the encounter's diagnoses,
# treatments and medicines in plain words.

_PSY_LOINC = frozenset(
    {
        "44249-1",  # PHQ-9 quick depression assessment panel
        "44261-6",  # PHQ-9 total score
        "55757-9",  # PHQ-2 panel
        "55758-7",  # PHQ-2 total score
        "89206-7",  # PHQ-9 modified for teens panel
        "89204-2",  # PHQ-9 modified for teens total score
        "73831-0",  # adolescent depression screening assessment
        "73832-8",  # adult depression screening assessment
        "69737-5",  # GAD-7 panel
        "70274-6",  # GAD-7 total score
        "71354-5",  # Edinburgh postnatal depression scale total
        # PHQ-9 items (PHQ-2 asks the first two: 44250-9, 44255-8)
        "44250-9", "44251-7", "44252-5", "44253-3", "44254-1",
        "44255-8", "44258-2", "44259-0", "44260-8",
        # GAD-7 items
        "69725-0", "68509-9", "69733-4", "69734-2", "69735-9", "69689-8", "69736-7",
        # note types
        "75443-2",  # mental health outpatient note
        "84215-3",  # mental health telehealth note
        "87626-8",  # suicide prevention note
    }
)
_ETH_LOINC = frozenset(
    {
        "72109-2",  # AUDIT-C panel
        "75626-2",  # AUDIT-C total score
        "75624-7",  # AUDIT total score
        "82666-9",  # DAST-10 panel
        "82667-7",  # DAST-10 total score
        "68517-2",  # single-question drug use screen
        "65750-2",  # drugs of abuse 5 panel, urine
        # DSM-5 opioid use disorder criteria: Synthea's own codes, sent as LOINC
        "99999-0", "99999-1", "99999-2", "99999-3", "99999-4", "99999-5",
        "99999-6", "99999-7", "99999-8", "99999-9", "99999-10", "99999-11",
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
        "20447-9",  # HIV 1 RNA (viral load)
        "55277-8",  # HIV status
        "24467-3",  # CD4 T-helper cell count (HIV monitoring)
    }
)
_SDV_LOINC = frozenset(
    {
        "76504-0",  # HARK (humiliation, afraid, rape, kick) total score
        "28245-9",  # abuse status [OMAHA]
    }
)
_SEX_LOINC = frozenset({"76690-7"})  # sexual orientation
# Questions whose "yes" (LA33-6) is sensitive, wherever they are asked (PRAPARE).
_YES_LOINC = {"76501-6": "SDV"}  # afraid of your partner or ex-partner
_LOINC_YES = "LA33-6"

_SNOMED: dict[str, tuple[str, str]] = {
    # mental health: diagnoses and findings
    "35489007": ("PSY", "Depressive disorder"),
    "370143000": ("PSY", "Major depression disorder"),
    "36923009": ("PSY", "Major depression, single episode"),
    "197480006": ("PSY", "Anxiety disorder"),
    "21897009": ("PSY", "Generalized anxiety disorder"),
    "48694002": ("PSY", "Anxiety"),
    "80583007": ("PSY", "Severe anxiety (panic) (finding)"),
    "231504006": ("PSY", "Mixed anxiety and depressive disorder"),
    "58214004": ("PSY", "Schizophrenia"),
    "13746004": ("PSY", "Bipolar disorder"),
    "47505003": ("PSY", "Posttraumatic stress disorder"),
    "69322001": ("PSY", "Psychotic disorder"),
    "74732009": ("PSY", "Mental disorder"),
    "192127007": ("PSY", "Child attention deficit disorder"),
    "6471006": ("PSY", "Suicidal thoughts (finding)"),
    "225444004": ("PSY", "At risk for suicide (finding)"),
    "44301001": ("PSY", "Suicide"),
    "287182007": ("PSY", "Attempted suicide - suffocation"),
    "287185009": ("PSY", "Attempted suicide - cut/stab"),
    "287191006": ("PSY", "Suicide - suffocation"),
    "287193009": ("PSY", "Suicide - firearms"),
    "86849004": ("PSY", "Suicidal deliberate poisoning"),
    "112001000119100": ("PSY", "positive screening for PHQ-9"),
    "112011000119102": ("PSY", "negative screening for PHQ9"),
    # mental health: treatment and care
    "10029008": ("PSY", "Suicide precautions"),
    "183401008": ("PSY", "Anti-suicide psychotherapy"),
    "415665002": ("PSY", "Suicide prevention"),
    "768835002": ("PSY", "Depression care management"),
    "88848003": ("PSY", "Psychiatric follow-up"),
    "90407005": ("PSY", "Evaluation of psychiatric state of patient"),
    "225337009": ("PSY", "Suicide Risk Assessment"),
    "304822001": ("PSY", "Psychodynamic Interpersonal Therapy"),
    "385724002": ("PSY", "Coping Support Management"),
    "425680009": ("PSY", "Cognitive behavioral therapy by multidisciplinary team"),
    "718347000": ("PSY", "Mental health care plan"),
    "736254008": ("PSY", "Psychiatry care plan"),
    "737434004": ("PSY", "Major depressive disorder clinical management plan"),
    "79094001": ("PSY", "Initial Psychiatric Interview with mental status evaluation"),
    "183402001": ("PSY", "Potential suicide care (regime/therapy)"),
    "406185000": ("PSY", "Trauma Therapy"),
    "76168009": ("PSY", "Group psychotherapy (regime/therapy)"),
    "228557008": ("PSY", "Cognitive and behavioral therapy (regime/therapy)"),
    "386522008": ("PSY", "Overactivity/inattention behavior management"),
    "405783006": ("PSY", "Psychological assessment"),
    # substance use: diagnoses and findings
    "7200002": ("ETH", "Alcoholism"),
    "15167005": ("ETH", "Alcohol abuse"),
    "66590003": ("ETH", "Alcohol dependence"),
    "191816009": ("ETH", "Drug dependence"),
    "26416006": ("ETH", "Drug abuse"),
    "6525002": ("ETH", "Dependent drug abuse (disorder)"),
    "5602001": ("ETH", "Opioid abuse (disorder)"),
    "75544000": ("ETH", "Opioid dependence"),
    "55680006": ("ETH", "Drug overdose"),
    "361055000": ("ETH", "Misuses drugs (finding)"),
    # substance use: treatment
    "56876005": ("ETH", "Drug rehabilitation and detoxification"),
    "266707007": ("ETH", "Drug addiction therapy"),
    "60112009": ("ETH", "Drug addiction counseling"),
    "61480009": ("ETH", "Drug detoxification"),
    "24165007": ("ETH", "Alcoholism counseling"),
    "313071005": ("ETH", "Counseling for substance abuse (procedure)"),
    "408935001": ("ETH", "Substance abuse prevention education (procedure)"),
    "408936000": ("ETH", "Substance abuse prevention management (procedure)"),
    # HIV: diagnoses, results, care
    "86406008": ("HIV", "Human immunodeficiency virus infection (disorder)"),
    "165816005": ("HIV", "Human immunodeficiency virus positive (finding)"),
    "165815009": ("HIV", "Human immunodeficiency virus negative (finding)"),
    "62479008": ("HIV", "Acquired immune deficiency syndrome (disorder)"),
    "91947003": ("HIV", "Asymptomatic human immunodeficiency virus infection"),
    "313077009": ("HIV", "Human immunodeficiency virus counseling (procedure)"),
    "315124004": ("HIV", "Human immunodeficiency virus viral load (procedure)"),
    "446987006": ("HIV", "Determination of susceptibility of Human immunodeficiency virus 1"),
    "313660005": ("HIV", "Absolute CD4 count procedure (procedure)"),
    # sexual and domestic violence
    "706893006": ("SDV", "Victim of intimate partner abuse (finding)"),
    # reproductive health
    "714812005": ("SEX", "Induced termination of pregnancy"),
    "386394001": ("SEX", "Pregnancy termination care"),
    "10383002": ("SEX", "Counseling for termination of pregnancy"),
}
# Routine screenings as notes name them: a phrase found inside one of these does not
# label a note ("anxiety" is in "assessment of anxiety (procedure)").
_ROUTINE_NOTE_TEXT = (
    "assessment of anxiety (procedure)",
    "depression screening (procedure)",
    "depression screening using patient health questionnaire two-item score (procedure)",
    "depression screening using patient health questionnaire nine item score (procedure)",
    "assessment of substance use (procedure)",
    "assessment using alcohol use disorders identification test - consumption (procedure)",
    "screening for drug abuse (procedure)",
    "screening for domestic abuse (procedure)",
    "human immunodeficiency virus screening (procedure)",
    "mental health screening (procedure)",
)
# Phrases that label a clinical note: the displays above as notes write them, and the
# social history's wording of substance use.
_NOTE_PHRASES: tuple[tuple[str, str], ...] = tuple(sorted(
    {(display.lower(), label) for label, display in _SNOMED.values()
     if not any(display.lower() in routine for routine in _ROUTINE_NOTE_TEXT)}
    | {("history of opioid addiction", "ETH")}
))
_NOTE_MAX_BYTES = 256 * 1024  # longer attachments are documents, not notes: not scanned

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
              "lurasidone", "paliperidone", "chlorpromazine", "methylphenidate",
              "atomoxetine")
_ETH_DRUGS = ("buprenorphine", "methadone", "naltrexone", "naloxone", "disulfiram",
              "acamprosate")
# ritonavir alone is not listed: it also boosts nirmatrelvir (COVID-19)
_HIV_DRUGS = ("tenofovir", "emtricitabine", "efavirenz", "dolutegravir", "bictegravir",
              "raltegravir", "darunavir", "atazanavir", "lopinavir", "abacavir",
              "zidovudine", "lamivudine", "rilpivirine", "nevirapine", "didanosine",
              "stavudine", "zalcitabine", "indinavir", "nelfinavir", "saquinavir",
              "fosamprenavir", "elvitegravir")


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
    """HL7 v3 ActCode sensitivity labels of a resource: derived from its codes, sensitive
    answers, medicines and note text, unioned with ``meta.security``."""
    labels: set[str] = set()
    for system, code in _label_codings(resource):
        labels.update(_labels_of_coding(system, code))
    labels.update(_answer_labels(resource))
    labels.update(_medication_labels(resource))
    labels.update(_note_labels(resource))
    meta = resource.get("meta")
    if isinstance(meta, Mapping):
        for coding in _as_list(meta.get("security")):
            if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
                labels.add(coding["code"])
    return frozenset(labels)


def policy_kind(resource: Mapping[str, Any]) -> tuple[str, frozenset[str]]:
    """``(category, labels)`` of ``classify(resource)``: what policy decides a write on,
    from the resource's content alone (references and id play no part), so a Bundle's
    resources are labelled where they are validated (the worker pool)."""
    labels = sensitivity_labels(resource)
    return _category(str(resource.get("resourceType", "")), resource, labels), labels


def patient_of(resource: Mapping[str, Any]) -> str | None:
    """The patient a resource is about (``classify(resource).patient_id``, without the
    labelling work)."""
    return _patient_id(str(resource.get("resourceType", "")), resource)


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
_LABEL_CODE_ELEMENTS = (*_SEARCH_CODE_ELEMENTS, "valueCodeableConcept", "reasonCode", "type",
                        "category")
# Codes nested in backbone elements: CarePlan activities, Claim/EOB items and diagnoses,
# Observation components. A claim item billing a screening instrument (a LOINC panel)
# holds no result, so it does not label the claim (see the rule above).
_LABEL_NESTED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("component", ("code", "valueCodeableConcept")),
    ("activity", ("detail",)),
    ("item", ("productOrService",)),
    ("diagnosis", ("diagnosisCodeableConcept",)),
    ("procedure", ("procedureCodeableConcept",)),
)


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
    for outer, inner in _LABEL_NESTED:
        for item in _as_list(resource.get(outer)):
            if not isinstance(item, Mapping):
                continue
            for element in inner:
                value = item.get(element)
                if element == "detail" and isinstance(value, Mapping):
                    yield from _codings(value.get("code"))
                    yield from _codings(value.get("reasonCode"))
                elif element == "productOrService":
                    yield from ((s, c) for s, c in _codings(value) if s != LOINC)
                else:
                    yield from _codings(value)


def _answer_labels(resource: Mapping[str, Any]) -> Iterator[str]:
    """Labels of questions answered "yes" (``_YES_LOINC``), as observations or components."""
    for item in (resource, *_as_list(resource.get("component"))):
        if not isinstance(item, Mapping):
            continue
        for system, code in _codings(item.get("code")):
            label = _YES_LOINC.get(code) if system == LOINC else None
            answers = {answer for _s, answer in _codings(item.get("valueCodeableConcept"))}
            if label is not None and _LOINC_YES in answers:
                yield label


def _note_labels(resource: Mapping[str, Any]) -> Iterator[str]:
    """Labels of the sensitive diagnoses, treatments and medicines a note mentions."""
    texts = [text for text in _note_texts(resource)]
    if not texts:
        return
    text = " ".join(texts)
    for phrase, label in _NOTE_PHRASES:
        if phrase in text:
            yield label
    for label, names in (("PSY", _PSY_DRUGS), ("ETH", _ETH_DRUGS), ("HIV", _HIV_DRUGS)):
        if any(name in text for name in names):
            yield label


def _note_texts(resource: Mapping[str, Any]) -> Iterator[str]:
    """Lower-cased text of the plain-text attachments of a DocumentReference or a
    DiagnosticReport (``presentedForm``)."""
    attachments: list[Any] = list(_as_list(resource.get("presentedForm")))
    for content in _as_list(resource.get("content")):
        if isinstance(content, Mapping):
            attachments.append(content.get("attachment"))
    for attachment in attachments:
        if not isinstance(attachment, Mapping):
            continue
        content_type, data = attachment.get("contentType"), attachment.get("data")
        if not (isinstance(content_type, str) and content_type.startswith("text/")
                and isinstance(data, str) and len(data) <= _NOTE_MAX_BYTES * 4 // 3 + 4):
            continue
        try:
            yield base64.b64decode(data, validate=True).decode("utf-8").lower()
        except (binascii.Error, ValueError):
            continue  # not base64 text: nothing to read


def _icd10_in(code: str, first: str, last: str) -> bool:
    """Whether an ICD-10 code's category (letter + 2 digits) lies in [first, last]."""
    head = code.upper().replace(".", "")[:3]
    return len(head) == 3 and first <= head <= last


def _labels_of_coding(system: str, code: str) -> Iterable[str]:
    if system == LOINC:
        for label, codes in (("PSY", _PSY_LOINC), ("ETH", _ETH_LOINC), ("HIV", _HIV_LOINC),
                             ("SDV", _SDV_LOINC), ("SEX", _SEX_LOINC)):
            if code in codes:
                yield label
    elif system == SNOMED:
        found = _SNOMED.get(code)
        if found is not None:
            yield found[0]
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
    for element in ("subject", "patient", "beneficiary", "for"):  # "for": Task
        ref = resource.get(element)
        if isinstance(ref, Mapping):
            pid = patient_id_from_reference(ref.get("reference"))
            if pid is not None:
                return pid
    if resource_type == "Provenance":  # the patient among its targets (Synthea: all of them)
        for ref in _as_list(resource.get("target")):
            value = ref.get("reference") if isinstance(ref, Mapping) else None
            if isinstance(value, str) and not value.startswith("urn:"):
                pid = patient_id_from_reference(value)
                if pid is not None:
                    return pid
    return None


def _category(resource_type: str, resource: Mapping[str, Any], labels: frozenset[str]) -> str:
    if resource_type == "Observation":
        return _observation_category(resource, labels)
    if resource_type == "Condition" and "PSY" in labels:
        return "mental-health"
    if resource_type == "DiagnosticReport":
        if any("PSY" in _labels_of_coding(system, code)
               for system, code in _codings(resource.get("code"))):
            return "mental-health"  # a mental-health instrument's panel (PHQ-2, GAD-7)
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
