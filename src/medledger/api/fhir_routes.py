"""FHIR R4 REST routes: CRUD (never delete), history, search, operations, Consent, AuditEvent."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from medledger.api.common import (
    break_glass,
    fhir_json,
    json_body,
    node_of,
    outcome_response,
    session_of,
)
from medledger.api.consent_fhir import fhir_to_rule, rule_to_fhir
from medledger.core.machine import RESOURCE_TYPE_RE
from medledger.errors import InvalidInput, MedledgerError
from medledger.fhir import match
from medledger.fhir.outcome import (
    etag,
    history_bundle,
    searchset_bundle,
    transaction_response_bundle,
)
from medledger.fhir.validate import resource_model
from medledger.node import audit as audit_mod
from medledger.node.service import SearchResult, Stored

router = APIRouter()


def _base(request: Request) -> str:
    return node_of(request).config.base_url + "/fhir"


def _check_type(rtype: str) -> None:
    if not RESOURCE_TYPE_RE.match(rtype):
        raise InvalidInput(f"{rtype!r} is not a FHIR resource type")
    resource_model(rtype)


def _if_match(request: Request) -> int | None:
    value = request.headers.get("if-match")
    if value is None:
        return None
    digits = value.strip().removeprefix("W/").strip('"')
    if not digits.isdigit():
        raise InvalidInput(f"If-Match must look like W/\"3\", got {value!r}")
    return int(digits)


def _record_response(stored: Stored, status: int, base: str) -> Response:
    meta = stored.meta
    headers = {"ETag": etag(meta["v"]), "Last-Modified": stored.last_updated,
               "Location": f"{base}/{meta['type']}/{meta['id']}/_history/{meta['v']}"}
    if meta.get("duplicate_warning"):
        headers["X-Medledger-Warning"] = meta["duplicate_warning"]
    if meta.get("enrollment_secret"):
        headers["X-Medledger-Enrollment-Secret"] = meta["enrollment_secret"]
    return fhir_json(stored.resource, status, headers)


def _searchset(request: Request, result: SearchResult) -> Response:
    found, withheld = result.found, result.withheld
    bundle = searchset_bundle([s.resource for s in found], _base(request), result.total,
                              str(request.url))
    if withheld:
        issues = [{"severity": "information", "code": "suppressed",
                   "diagnostics": f"{w.ref} ({w.category}) withheld: {w.reason}"}
                  for w in withheld]
        bundle.setdefault("entry", []).append({
            "resource": {"resourceType": "OperationOutcome", "issue": issues},
            "search": {"mode": "outcome"}})
    return fhir_json(bundle)


@router.get("/metadata")
async def metadata(request: Request) -> Response:
    node = node_of(request)
    interactions = [{"code": c} for c in ("read", "vread", "update", "create",
                                          "history-instance", "search-type")]
    resources = [{"type": t, "versioning": "versioned", "readHistory": True,
                  "updateCreate": True, "conditionalDelete": "not-supported",
                  "interaction": interactions,
                  "searchParam": [{"name": n, "type": "token" if n != "date" else "date"}
                                  for n in ("patient", "category", "code", "date")]}
                 for t in ("Patient", "Observation", "Condition", "MedicationRequest",
                           "AllergyIntolerance", "Immunization", "Encounter", "Procedure",
                           "DiagnosticReport", "DocumentReference", "CarePlan")]
    return fhir_json({
        "resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
        "date": audit_mod.iso_now(node.clock)[:10], "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "software": {"name": "medledger", "version": "0.1.0"},
        "implementation": {"description": f"medledger node of {node.org.id}",
                           "url": _base(request)},
        "rest": [{"mode": "server", "resource": resources,
                  "security": {"service": [{"coding": [{
                      "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                      "code": "SMART-on-FHIR"}]}]},
                  "interaction": [{"code": "transaction"}],
                  "operation": [{"name": "match", "definition":
                                 "http://hl7.org/fhir/OperationDefinition/Patient-match"},
                                {"name": "everything", "definition":
                                 "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
                                {"name": "summary", "definition":
                                 "http://hl7.org/fhir/uv/ips/OperationDefinition/summary"}]}],
    })


@router.post("")
@router.post("/")
async def transaction(request: Request) -> Response:
    """A transaction Bundle (all or nothing) or a batch (entry by entry)."""
    node, session = node_of(request), session_of(request)
    result = await node.process_bundle(session, await request.body())
    return fhir_json(transaction_response_bundle(result.entries, batch=result.kind == "batch"))


@router.post("/Patient/$match")
async def patient_match(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    resource, only_certain, count = match.parse_match_parameters(await json_body(request))
    found = node.match_patients(session, resource, only_certain, count)
    return fhir_json(match.match_bundle(found, _base(request)))


@router.get("/Patient/{pid}/$everything")
async def everything(request: Request, pid: str) -> Response:
    node, session = node_of(request), session_of(request)
    return _searchset(request, await node.everything(session, pid, break_glass(request)))


@router.get("/Patient/{pid}/$summary")
async def summary(request: Request, pid: str) -> Response:
    node, session = node_of(request), session_of(request)
    return fhir_json(await node.summary(session, pid))


@router.get("/AuditEvent")
async def audit_events(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    params = dict(request.query_params)
    patient = (params.get("patient") or params.get("entity") or "").rsplit("/", 1)[-1]
    if not patient:
        raise InvalidInput("AuditEvent search needs patient=<id>")
    since = params.get("date", "").removeprefix("ge")
    count = params.get("_count", "100")
    if not count.isdigit():
        raise InvalidInput("_count must be a positive integer")
    rows = node.audit_log(session, patient, since, int(count))
    resources = [audit_mod.to_fhir(ev, h) for ev, h in rows]
    return fhir_json(searchset_bundle(resources, _base(request), len(resources),
                                      str(request.url)))


@router.get("/Consent")
async def list_consents(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    patient = request.query_params.get("patient", "").rsplit("/", 1)[-1] or (
        session.actor_id if session.kind == "patient" else "")
    if not patient:
        raise InvalidInput("Consent search needs patient=<id>")
    rules = node.consents(session, patient)
    resources = [rule_to_fhir(r) for r in rules]
    return fhir_json(searchset_bundle(resources, _base(request), len(resources),
                                      str(request.url)))


@router.post("/Consent")
async def create_consent(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    rule = fhir_to_rule(await request.body())
    stored = await node.put_consent(session, rule)
    return fhir_json(rule_to_fhir(stored), 201,
                     {"Location": f"{_base(request)}/Consent/{stored['id']}"})


@router.post("/{rtype}")
async def create(request: Request, rtype: str) -> Response:
    _check_type(rtype)
    node, session = node_of(request), session_of(request)
    stored = await node.put_resource(session, await request.body(), rtype, None,
                                     password=request.headers.get("x-medledger-patient-password"),
                                     break_glass=break_glass(request))
    return _record_response(stored, 201 if stored.created else 200, _base(request))


@router.put("/{rtype}/{rid}")
async def update(request: Request, rtype: str, rid: str) -> Response:
    _check_type(rtype)
    node, session = node_of(request), session_of(request)
    existed = node.store.get(f"rec/{rtype}/{rid}") is not None
    stored = await node.put_resource(session, await request.body(), rtype, rid,
                                     _if_match(request),
                                     password=request.headers.get("x-medledger-patient-password"),
                                     break_glass=break_glass(request))
    return _record_response(stored, 200 if existed else 201, _base(request))


@router.get("/{rtype}/{rid}")
async def read(request: Request, rtype: str, rid: str) -> Response:
    _check_type(rtype)
    node, session = node_of(request), session_of(request)
    stored = await node.read(session, rtype, rid, None, break_glass(request))
    return _record_response(stored, 200, _base(request))


@router.get("/{rtype}/{rid}/_history")
async def history(request: Request, rtype: str, rid: str) -> Response:
    _check_type(rtype)
    node, session = node_of(request), session_of(request)
    versions = await node.history(session, rtype, rid, break_glass(request))
    entries: list[tuple[dict[str, Any], str, str, str]] = [
        (s.resource, str(s.version), s.last_updated, "POST" if s.version == 1 else "PUT")
        for s in versions]
    return fhir_json(history_bundle(entries, base_url=_base(request),
                                    self_link=str(request.url)))


@router.get("/{rtype}/{rid}/_history/{vid}")
async def vread(request: Request, rtype: str, rid: str, vid: str) -> Response:
    _check_type(rtype)
    if not vid.isdigit():
        raise InvalidInput(f"version id must be a number, got {vid!r}")
    node, session = node_of(request), session_of(request)
    stored = await node.read(session, rtype, rid, int(vid), break_glass(request))
    return _record_response(stored, 200, _base(request))


def _search_params(request: Request) -> dict[str, str]:
    """Query parameters. FHIR: a repeated ``date`` is AND (``ge..&le..``, a range), commas
    within one value are OR; repeats are joined with ``&`` for the node."""
    params: dict[str, str] = {}
    for name in request.query_params:
        values = request.query_params.getlist(name)
        if len(values) > 1 and name != "date":
            raise InvalidInput(f"search parameter {name!r} is repeated; give several values "
                               "as one comma-separated list")
        params[name] = "&".join(values)
    return params


@router.get("/{rtype}")
async def search(request: Request, rtype: str) -> Response:
    _check_type(rtype)
    node, session = node_of(request), session_of(request)
    return _searchset(request, await node.search(session, rtype, _search_params(request),
                                                 break_glass(request)))


@router.delete("/{rtype}/{rid}")
async def delete(request: Request, rtype: str, rid: str) -> Response:
    session_of(request)
    return outcome_response(MedledgerError(
        "records are never deleted: the ledger is append-only; write a new version with "
        "status entered-in-error instead"), status=405, code="not-supported")

