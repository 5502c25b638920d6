"""Deterministic Synthea-style synthetic FHIR data for tests, demos and benchmarks.

This module owns fake-but-realistic patient records: ``synthetic_patient_bundle``
builds a FHIR ``transaction`` Bundle in the shape Synthea emits (``urn:uuid:``
fullUrls, ``POST <Type>`` requests, narrative text, identifiers, codings with
display) and ``synthetic_observation`` builds a single ~1.5 KiB vital-signs
Observation.  Everything is a function of the seed (``random.Random(seed)``):
no clock, no global randomness.  No real person's data is involved.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

__all__ = ["MRN_SYSTEM", "synthetic_observation", "synthetic_patient_bundle"]

MRN_SYSTEM = "http://hospital.example.org/mrn"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
SYNTHEA_ID = "https://github.com/synthetichealth/synthea"
NPI = "http://hl7.org/fhir/sid/us-npi"

_GIVEN_F = ("Maria", "Aisha", "Emily", "Sofia", "Olivia", "Hannah", "Mei", "Fatima", "Grace", "Zoe")
_GIVEN_M = ("James", "Omar", "Liam", "Mateo", "Noah", "Ethan", "Kenji", "David", "Samuel", "Ravi")
_FAMILY = (
    "Smith",
    "Garcia",
    "Nguyen",
    "Okafor",
    "Müller",
    "Rossi",
    "Kowalski",
    "Haddad",
    "Johnson",
    "O'Brien",
    "Tanaka",
    "Silva",
)
_CITIES = (
    ("Boston", "MA", "02118", 42.3371, -71.0726),
    ("Springfield", "MA", "01103", 42.1015, -72.5898),
    ("Worcester", "MA", "01608", 42.2626, -71.8023),
    ("Cambridge", "MA", "02139", 42.3647, -71.1042),
    ("Lowell", "MA", "01852", 42.6334, -71.3162),
)
_STREETS = ("Maple", "Oak", "Washington", "Beacon", "Elm", "Harbor", "Chestnut", "Main")
_PRACTITIONERS = (
    ("9999912345", "Dr. Alice Park"),
    ("9999923456", "Dr. Benjamin Osei"),
    ("9999934567", "Dr. Carmen Ruiz"),
)
_ORG = ("c3a2f2b4-4a1e-3d7e-9b7e-0b3f2f1a9e01", "GENERAL HOSPITAL EXAMPLE")

_MEDS_HTN = (
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("310798", "hydrochlorothiazide 25 MG Oral Tablet"),
    ("197361", "amlodipine 5 MG Oral Tablet"),
)
_MED_DEPRESSION = ("312940", "sertraline 50 MG Oral Tablet")
_ALLERGIES = (
    ("91935009", "Allergy to peanuts", "food"),
    ("91936005", "Allergy to penicillin", "medication"),
    ("300916003", "Latex allergy", "environment"),
    ("232347008", "Dander (animal) allergy", "environment"),
)
_VACCINES = (
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("113", "Td (adult) preservative free"),
    ("133", "Pneumococcal conjugate PCV 13"),
    ("208", "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, 30 mcg/0.3mL dose"),
)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": display}


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)], "text": display}


def _narrative(summary: str) -> dict[str, Any]:
    return {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{summary}</div>',
    }


def _meta(profile: str, rng: random.Random) -> dict[str, Any]:
    return {
        "profile": [f"http://hl7.org/fhir/us/core/StructureDefinition/{profile}"],
        "source": f"#synthea-{rng.getrandbits(32):08x}",
    }


def _quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def _practitioner_ref(rng: random.Random) -> dict[str, Any]:
    npi, name = rng.choice(_PRACTITIONERS)
    return {"identifier": {"system": NPI, "value": npi}, "display": name}


def _org_ref() -> dict[str, Any]:
    return {"identifier": {"system": SYNTHEA_ID, "value": _ORG[0]}, "display": _ORG[1]}


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{resource['id']}",
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }


# -- resources ---------------------------------------------------------------------------------


def _patient(rng: random.Random, pid: str) -> dict[str, Any]:
    gender = rng.choice(("female", "male"))
    given = rng.choice(_GIVEN_F if gender == "female" else _GIVEN_M)
    middle = rng.choice(_GIVEN_F if gender == "female" else _GIVEN_M)
    family = rng.choice(_FAMILY)
    birth = date(1940, 1, 1) + timedelta(days=rng.randrange(0, 65 * 365))
    city, state, postal, lat, lon = rng.choice(_CITIES)
    mrn = f"MRN-{rng.randrange(10**7, 10**8)}"
    phone = f"555-{rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}"
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": _meta("us-core-patient", rng),
        "text": _narrative(
            f"Generated by Synthea-style generator. {given} {family}, {gender}, born {birth}."
        ),
        "identifier": [
            {"system": SYNTHEA_ID, "value": pid},
            {
                "type": _concept(
                    "http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical Record Number"
                ),
                "system": MRN_SYSTEM,
                "value": mrn,
            },
            {
                "type": _concept(
                    "http://terminology.hl7.org/CodeSystem/v2-0203", "SS", "Social Security Number"
                ),
                "system": "http://hl7.org/fhir/sid/us-ssn",
                "value": f"999-{rng.randrange(10, 99)}-{rng.randrange(1000, 9999)}",
            },
        ],
        "name": [
            {
                "use": "official",
                "family": family,
                "given": [given, middle],
                "prefix": ["Ms." if gender == "female" else "Mr."],
            }
        ],
        "telecom": [{"system": "phone", "value": phone, "use": "home"}],
        "gender": gender,
        "birthDate": birth.isoformat(),
        "address": [
            {
                "extension": [
                    {
                        "url": "http://hl7.org/fhir/StructureDefinition/geolocation",
                        "extension": [
                            {"url": "latitude", "valueDecimal": round(lat + rng.random() / 50, 6)},
                            {
                                "url": "longitude",
                                "valueDecimal": round(lon + rng.random() / 50, 6),
                            },
                        ],
                    }
                ],
                "line": [f"{rng.randrange(1, 999)} {rng.choice(_STREETS)} Street"],
                "city": city,
                "state": state,
                "postalCode": postal,
                "country": "US",
            }
        ],
        "maritalStatus": _concept(
            "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
            *rng.choice((("M", "Married"), ("S", "Never Married"), ("D", "Divorced"))),
        ),
        "multipleBirthBoolean": False,
        "communication": [
            {"language": _concept("urn:ietf:bcp:47", "en-US", "English (United States)")}
        ],
    }


def _encounter(rng: random.Random, pid: str, start: datetime) -> dict[str, Any]:
    eid = _uuid(rng)
    end = start + timedelta(minutes=rng.choice((15, 30, 45)))
    practitioner = _practitioner_ref(rng)
    return {
        "resourceType": "Encounter",
        "id": eid,
        "meta": _meta("us-core-encounter", rng),
        "text": _narrative(
            f"Encounter for check up on {start.date()} with {practitioner['display']}."
        ),
        "identifier": [{"use": "official", "system": SYNTHEA_ID, "value": eid}],
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "AMB",
            "display": "ambulatory",
        },
        "type": [_concept(SNOMED, "185349003", "Encounter for check up (procedure)")],
        "subject": {"reference": f"urn:uuid:{pid}"},
        "participant": [
            {
                "type": [
                    _concept(
                        "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                        "PPRF",
                        "primary performer",
                    )
                ],
                "period": {"start": _iso(start), "end": _iso(end)},
                "individual": practitioner,
            }
        ],
        "period": {"start": _iso(start), "end": _iso(end)},
        "location": [{"location": {"display": _ORG[1]}}],
        "serviceProvider": _org_ref(),
    }


def _observation(
    rng: random.Random,
    pid: str,
    eid: str | None,
    when: datetime,
    category: tuple[str, str],
    code: tuple[str, str],
    value: dict[str, Any] | None = None,
    components: list[dict[str, Any]] | None = None,
    profile: str = "vital-signs",
) -> dict[str, Any]:
    oid = _uuid(rng)
    cat_code, cat_display = category
    code_code, code_display = code
    shown = f"{value['value']} {value['unit']}" if value else "see components"
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"profile": [f"http://hl7.org/fhir/StructureDefinition/{profile}"]},
        "text": _narrative(f"{code_display}: {shown} on {when.date()}."),
        "identifier": [{"system": SYNTHEA_ID, "value": oid}],
        "status": "final",
        "category": [
            {"coding": [_coding(OBS_CATEGORY, cat_code, cat_display)], "text": cat_display}
        ],
        "code": _concept(LOINC, code_code, code_display),
        "subject": {"reference": f"urn:uuid:{pid}"},
        "effectiveDateTime": _iso(when),
        "issued": _iso(when + timedelta(minutes=rng.randrange(1, 90))),
        "performer": [_practitioner_ref(rng)],
    }
    if eid is not None:
        obs["encounter"] = {"reference": f"urn:uuid:{eid}"}
    if value is not None:
        obs["valueQuantity"] = value
    if components is not None:
        obs["component"] = components
    return obs


_VITALS = ("vital-signs", "Vital signs")
_LAB = ("laboratory", "Laboratory")


def _vital_signs(
    rng: random.Random, pid: str, eid: str | None, when: datetime, hypertensive: bool
) -> list[dict[str, Any]]:
    systolic = rng.randrange(135, 170) if hypertensive else rng.randrange(105, 130)
    diastolic = rng.randrange(85, 105) if hypertensive else rng.randrange(65, 84)
    bp_components = [
        {
            "code": _concept(LOINC, "8480-6", "Systolic blood pressure"),
            "valueQuantity": _quantity(systolic, "mm[Hg]", "mm[Hg]"),
        },
        {
            "code": _concept(LOINC, "8462-4", "Diastolic blood pressure"),
            "valueQuantity": _quantity(diastolic, "mm[Hg]", "mm[Hg]"),
        },
    ]
    return [
        _observation(
            rng,
            pid,
            eid,
            when,
            _VITALS,
            ("8867-4", "Heart rate"),
            _quantity(rng.randrange(55, 100), "/min", "/min"),
            profile="heartrate",
        ),
        _observation(
            rng,
            pid,
            eid,
            when,
            _VITALS,
            ("85354-9", "Blood pressure panel with all children optional"),
            components=bp_components,
            profile="bp",
        ),
        _observation(
            rng,
            pid,
            eid,
            when,
            _VITALS,
            ("29463-7", "Body weight"),
            _quantity(round(rng.uniform(50.0, 110.0), 1), "kg", "kg"),
            profile="bodyweight",
        ),
        _observation(
            rng,
            pid,
            eid,
            when,
            _VITALS,
            ("8310-5", "Body temperature"),
            _quantity(round(rng.uniform(36.2, 37.6), 1), "Cel", "Cel"),
            profile="bodytemp",
        ),
        _observation(
            rng,
            pid,
            eid,
            when,
            _VITALS,
            ("9279-1", "Respiratory rate"),
            _quantity(rng.randrange(12, 20), "/min", "/min"),
            profile="resprate",
        ),
    ]


def _labs(rng: random.Random, pid: str, eid: str, when: datetime) -> list[dict[str, Any]]:
    return [
        _observation(
            rng,
            pid,
            eid,
            when,
            _LAB,
            ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
            _quantity(round(rng.uniform(4.8, 8.5), 1), "%", "%"),
            profile="Observation",
        ),
        _observation(
            rng,
            pid,
            eid,
            when,
            _LAB,
            ("2339-0", "Glucose [Mass/volume] in Blood"),
            _quantity(rng.randrange(70, 180), "mg/dL", "mg/dL"),
            profile="Observation",
        ),
    ]


def _phq9(rng: random.Random, pid: str, eid: str, when: datetime) -> dict[str, Any]:
    score = rng.randrange(0, 27)
    return _observation(
        rng,
        pid,
        eid,
        when,
        ("survey", "Survey"),
        ("44261-6", "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]"),
        {"value": score, "unit": "{score}", "system": UCUM, "code": "{score}"},
        profile="Observation",
    )


def _condition(
    rng: random.Random, pid: str, eid: str, onset: datetime, code: str, display: str
) -> dict[str, Any]:
    cid = _uuid(rng)
    return {
        "resourceType": "Condition",
        "id": cid,
        "meta": _meta("us-core-condition", rng),
        "text": _narrative(f"{display}, onset {onset.date()}."),
        "identifier": [{"system": SYNTHEA_ID, "value": cid}],
        "clinicalStatus": {"coding": [_coding(CLINICAL_STATUS, "active", "Active")]},
        "verificationStatus": {"coding": [_coding(VERIFICATION_STATUS, "confirmed", "Confirmed")]},
        "category": [
            _concept(
                "http://terminology.hl7.org/CodeSystem/condition-category",
                "encounter-diagnosis",
                "Encounter Diagnosis",
            )
        ],
        "code": _concept(SNOMED, code, display),
        "subject": {"reference": f"urn:uuid:{pid}"},
        "encounter": {"reference": f"urn:uuid:{eid}"},
        "onsetDateTime": _iso(onset),
        "recordedDate": _iso(onset),
        "recorder": _practitioner_ref(rng),
    }


def _medication_request(
    rng: random.Random,
    pid: str,
    eid: str,
    when: datetime,
    med: tuple[str, str],
    reason_id: str,
    per_day: int,
) -> dict[str, Any]:
    mid = _uuid(rng)
    rx_code, rx_display = med
    return {
        "resourceType": "MedicationRequest",
        "id": mid,
        "meta": _meta("us-core-medicationrequest", rng),
        "text": _narrative(f"{rx_display}, {per_day} per day, prescribed {when.date()}."),
        "identifier": [{"system": SYNTHEA_ID, "value": mid}],
        "status": "active",
        "intent": "order",
        "category": [
            _concept(
                "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                "community",
                "Community",
            )
        ],
        "medicationCodeableConcept": _concept(RXNORM, rx_code, rx_display),
        "subject": {"reference": f"urn:uuid:{pid}"},
        "encounter": {"reference": f"urn:uuid:{eid}"},
        "authoredOn": _iso(when),
        "requester": _practitioner_ref(rng),
        "reasonReference": [{"reference": f"urn:uuid:{reason_id}"}],
        "dosageInstruction": [
            {
                "sequence": 1,
                "text": f"Take {per_day} tablet(s) by mouth daily",
                "timing": {"repeat": {"frequency": per_day, "period": 1.0, "periodUnit": "d"}},
                "asNeededBoolean": False,
                "route": _concept(SNOMED, "26643006", "Oral route"),
                "doseAndRate": [
                    {
                        "type": _concept(
                            "http://terminology.hl7.org/CodeSystem/dose-rate-type",
                            "ordered",
                            "Ordered",
                        ),
                        "doseQuantity": {"value": 1.0},
                    }
                ],
            }
        ],
        "dispenseRequest": {
            "numberOfRepeatsAllowed": 3,
            "quantity": {"value": 30.0, "unit": "tablet"},
            "expectedSupplyDuration": {
                "value": 30.0,
                "unit": "days",
                "system": UCUM,
                "code": "d",
            },
        },
    }


def _allergy(rng: random.Random, pid: str, when: datetime) -> dict[str, Any]:
    aid = _uuid(rng)
    code, display, category = rng.choice(_ALLERGIES)
    return {
        "resourceType": "AllergyIntolerance",
        "id": aid,
        "meta": _meta("us-core-allergyintolerance", rng),
        "text": _narrative(f"{display}, recorded {when.date()}."),
        "identifier": [{"system": SYNTHEA_ID, "value": aid}],
        "clinicalStatus": {
            "coding": [
                _coding(
                    "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                    "active",
                    "Active",
                )
            ]
        },
        "verificationStatus": {
            "coding": [
                _coding(
                    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                    "confirmed",
                    "Confirmed",
                )
            ]
        },
        "type": "allergy",
        "category": [category],
        "criticality": rng.choice(("low", "high")),
        "code": _concept(SNOMED, code, display),
        "patient": {"reference": f"urn:uuid:{pid}"},
        "recordedDate": _iso(when),
        "reaction": [
            {
                "manifestation": [_concept(SNOMED, "247472004", "Wheal (finding)")],
                "severity": rng.choice(("mild", "moderate")),
            }
        ],
    }


def _immunization(rng: random.Random, pid: str, eid: str, when: datetime) -> dict[str, Any]:
    iid = _uuid(rng)
    code, display = rng.choice(_VACCINES)
    return {
        "resourceType": "Immunization",
        "id": iid,
        "meta": _meta("us-core-immunization", rng),
        "text": _narrative(f"{display} administered {when.date()}."),
        "identifier": [{"system": SYNTHEA_ID, "value": iid}],
        "status": "completed",
        "vaccineCode": _concept(CVX, code, display),
        "patient": {"reference": f"urn:uuid:{pid}"},
        "encounter": {"reference": f"urn:uuid:{eid}"},
        "occurrenceDateTime": _iso(when),
        "primarySource": True,
        "lotNumber": f"LOT{rng.randrange(10000, 99999)}",
        "site": _concept("http://terminology.hl7.org/CodeSystem/v3-ActSite", "LA", "left arm"),
        "route": _concept(
            "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration",
            "IM",
            "Injection, intramuscular",
        ),
        "performer": [{"actor": _practitioner_ref(rng)}],
    }


# -- public ------------------------------------------------------------------------------------


def synthetic_patient_bundle(seed: int, n_encounters: int = 3) -> dict[str, Any]:
    """A Synthea-style transaction Bundle for one synthetic patient, determined by ``seed``.

    Contains the Patient, ``n_encounters`` check-up Encounters each with five vital
    signs and two labs, hypertension (always) and, depending on the seed,
    depression (+ PHQ-9 and sertraline), alcoholism and HIV Conditions,
    antihypertensive MedicationRequests, an AllergyIntolerance and Immunizations.
    """
    rng = random.Random(seed)
    pid = _uuid(rng)
    patient = _patient(rng, pid)
    resources: list[dict[str, Any]] = [patient]
    start = datetime(2015, 1, 5, 8, 0, tzinfo=UTC) + timedelta(days=rng.randrange(0, 365))
    has_depression = rng.random() < 0.35
    has_aud = rng.random() < 0.2
    has_hiv = rng.random() < 0.15
    screen_phq9 = has_depression or rng.random() < 0.3
    encounter_ids: list[str] = []
    when = start
    for n in range(max(1, n_encounters)):
        encounter = _encounter(rng, pid, when)
        eid = encounter["id"]
        encounter_ids.append(eid)
        resources.append(encounter)
        resources.extend(_vital_signs(rng, pid, eid, when, hypertensive=True))
        resources.extend(_labs(rng, pid, eid, when))
        if screen_phq9 and n % 2 == 0:
            resources.append(_phq9(rng, pid, eid, when))
        if n % 4 == 0:
            resources.append(_immunization(rng, pid, eid, when))
        when += timedelta(days=rng.randrange(60, 240), minutes=rng.randrange(0, 480))
    first = encounter_ids[0]
    htn = _condition(rng, pid, first, start, "38341003", "Hypertension")
    resources.append(htn)
    for i, med in enumerate(rng.sample(_MEDS_HTN, rng.randrange(1, 3))):
        resources.append(_medication_request(rng, pid, first, start, med, htn["id"], 1 + i % 2))
    if has_depression:
        dep = _condition(rng, pid, first, start, "35489007", "Depressive disorder")
        resources.append(dep)
        resources.append(_medication_request(rng, pid, first, start, _MED_DEPRESSION, dep["id"], 1))
    if has_aud:
        resources.append(_condition(rng, pid, first, start, "7200002", "Alcoholism"))
    if has_hiv:
        resources.append(
            _condition(rng, pid, first, start, "86406008", "Human immunodeficiency virus infection")
        )
    resources.append(_allergy(rng, pid, start))
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [_entry(resource) for resource in resources],
    }


def synthetic_observation(patient_id: str, seed: int) -> dict[str, Any]:
    """One ~1.5 KiB vital-signs Observation (heart rate) about ``Patient/<patient_id>``."""
    rng = random.Random(seed)
    when = datetime(2020, 1, 1, 8, 0, tzinfo=UTC) + timedelta(
        minutes=rng.randrange(0, 5 * 365 * 24 * 60)
    )
    obs = _observation(
        rng,
        patient_id,
        None,
        when,
        _VITALS,
        ("8867-4", "Heart rate"),
        _quantity(rng.randrange(55, 100), "/min", "/min"),
        profile="heartrate",
    )
    obs["subject"] = {"reference": f"Patient/{patient_id}"}
    obs["interpretation"] = [
        _concept(
            "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "N", "Normal"
        )
    ]
    obs["referenceRange"] = [
        {
            "low": _quantity(60, "/min", "/min"),
            "high": _quantity(100, "/min", "/min"),
            "text": "Normal adult resting heart rate",
        }
    ]
    obs["bodySite"] = _concept(SNOMED, "368209003", "Right arm")
    obs["method"] = _concept(SNOMED, "258104002", "Measured (qualifier value)")
    return obs
