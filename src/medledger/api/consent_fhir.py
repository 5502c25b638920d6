"""Translate between ledger consent rules and FHIR R4 Consent resources."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from medledger.core.policy import CATEGORIES
from medledger.errors import InvalidInput
from medledger.fhir.validate import parse_resource

CATEGORY_SYSTEM = "http://medledger.example/fhir/CodeSystem/category"
ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def _iso(epoch: int | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(value: str | None, field: str) -> int | None:
    if not value:
        return None
    try:
        text = value if "T" in value else value + "T00:00:00+00:00"
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(f"Consent.provision.period.{field} is not a date/time: {value}") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def rule_to_fhir(rule: dict[str, Any]) -> dict[str, Any]:
    provision: dict[str, Any] = {"type": rule["decision"]}
    period = {k: v for k, v in (("start", _iso(rule.get("start"))),
                                ("end", _iso(rule.get("end")))) if v}
    if period:
        provision["period"] = period
    actors = [f"Practitioner/{a}" for a in rule.get("actors", [])] + \
             [f"Organization/{o}" for o in rule.get("orgs", [])]
    if actors:
        provision["actor"] = [{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                 "v3-ParticipationType", "code": "IRCP"}]},
            "reference": {"reference": ref}} for ref in actors]
    if rule.get("labels"):
        provision["securityLabel"] = [{"system": ACTCODE, "code": lab} for lab in rule["labels"]]
    if rule.get("categories"):
        provision["code"] = [{"coding": [{"system": CATEGORY_SYSTEM, "code": c}]}
                             for c in rule["categories"]]
    return {
        "resourceType": "Consent", "id": rule["id"],
        "meta": {"versionId": str(rule.get("version", 1))},
        "status": "active" if rule.get("status") == "active" else "inactive",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{rule['patient']}"},
        "policyRule": {"coding": [{"system": ACTCODE,
                                   "code": "OPTIN" if rule["decision"] == "permit"
                                   else "OPTOUT"}]},
        "provision": provision,
    }


def fhir_to_rule(data: Any) -> dict[str, Any]:
    consent = parse_resource(data, "Consent")
    patient = str(consent.get("patient", {}).get("reference", ""))
    if not patient.startswith("Patient/"):
        raise InvalidInput("Consent.patient must reference Patient/<id>")
    provision = consent.get("provision") or {}
    decision = provision.get("type")
    if decision not in ("permit", "deny"):
        raise InvalidInput("Consent.provision.type must be permit or deny")
    actors, orgs = [], []
    for actor in provision.get("actor", []):
        ref = str(actor.get("reference", {}).get("reference", ""))
        kind, _, ident = ref.partition("/")
        if kind in ("Practitioner", "PractitionerRole") and ident:
            actors.append(ident)
        elif kind == "Organization" and ident:
            orgs.append(ident)
        else:
            raise InvalidInput(f"Consent.provision.actor reference {ref!r} must be "
                               "Practitioner/<id> or Organization/<id>")
    if provision.get("provision"):
        raise InvalidInput("nested Consent.provision.provision is not supported; post one "
                           "Consent per rule")
    cats = []
    for concept in provision.get("code", []):
        for c in concept.get("coding", []):
            if c.get("system") != CATEGORY_SYSTEM or not c.get("code"):
                raise InvalidInput("Consent.provision.code codings must use system "
                                   f"{CATEGORY_SYSTEM} with a code (one of the data "
                                   "categories); anything else would silently widen the rule")
            cats.append(c["code"])
    bad = set(cats) - set(CATEGORIES)
    if bad:
        raise InvalidInput(f"unknown data categories {sorted(bad)}; known: {', '.join(CATEGORIES)}")
    labels = []
    for c in provision.get("securityLabel", []):
        if not c.get("code"):
            raise InvalidInput("Consent.provision.securityLabel entries need a code (e.g. PSY)")
        labels.append(c["code"])
    period = provision.get("period") or {}
    return {"id": consent.get("id"), "patient": patient.removeprefix("Patient/"),
            "decision": decision, "actors": actors, "orgs": orgs, "categories": cats,
            "labels": labels, "start": _epoch(period.get("start"), "start"),
            "end": _epoch(period.get("end"), "end")}
