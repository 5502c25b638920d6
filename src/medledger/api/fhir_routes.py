"""FHIR R4 REST routes: CRUD (never delete), history, search, operations, Consent, AuditEvent.

Search, ``$match`` and the CapabilityStatement are served by ``medledger.search``."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request, Response

from medledger.api.common import (
    break_glass,
    fhir_json,
    json_body,
    json_body_schema,
    node_of,
    off_loop,
    outcome_response,
    parse_count,
    query_schema,
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
from medledger.node.service import Stored
from medledger.search import bundle as search_bundle
from medledger.search.engine import SearchResult

router = APIRouter()
_IF_MATCH = re.compile(r'(?:W/)?"?([0-9]{1,12})"?')
# a FHIR date or UTC dateTime (events are recorded in UTC), optionally prefixed ``ge``
_SINCE = re.compile(r"(?:ge)?([0-9]{4}(?:-[0-9]{2}(?:-[0-9]{2}(?:T[0-9]{2}:[0-9]{2}"
                    r"(?::[0-9]{2}(?:\.[0-9]{1,9})?)?Z?)?)?)?)")


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
    found = _IF_MATCH.fullmatch(value.strip())
    if found is None:
        raise InvalidInput(f"If-Match must look like W/\"3\" (a version number), got "
                           f"{value[:40]!r}")
    return int(found.group(1))


def _record_response(stored: Stored, status: int, base: str) -> Response:
    meta = stored.meta
    headers = {"ETag": etag(meta["v"]), "Last-Modified": stored.last_updated,
               "Location": f"{base}/{meta['type']}/{meta['id']}/_history/{meta['v']}"}
    if meta.get("duplicate_warning"):
        headers["X-Medledger-Warning"] = meta["duplicate_warning"]
    if meta.get("enrollment_secret"):
        headers["X-Medledger-Enrollment-Secret"] = meta["enrollment_secret"]
    return fhir_json(stored.resource, status, headers)


def _items(request: Request) -> list[tuple[str, str]]:
    """Query parameters in order; repeats are kept (FHIR: repeated parameters are AND)."""
    return list(request.query_params.multi_items())


def _strict(request: Request) -> bool:
    return "handling=strict" in request.headers.get("prefer", "").replace(" ", "")


def _searchset(request: Request, rtype: str, items: list[tuple[str, str]],
               result: SearchResult) -> Response:
    return fhir_json(search_bundle.searchset(result, _base(request), rtype, items,
                                             str(request.url)))


@router.get("/metadata")
async def metadata(request: Request) -> Response:
    node = node_of(request)
    return fhir_json(search_bundle.capability(_base(request), node.org.id,
                                              audit_mod.iso_now(node.clock)[:10], "0.1.0"))


@router.post("")
@router.post("/")
async def transaction(request: Request) -> Response:
    """A transaction Bundle (all or nothing) or a batch (entry by entry)."""
    node, session = node_of(request), session_of(request)
    result = await node.process_bundle(session, await request.body())
    return fhir_json(transaction_response_bundle(result.entries, batch=result.kind == "batch"))


@router.post("/Patient/$match", openapi_extra=json_body_schema({"type": "object"}))
async def patient_match(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    resource, only_certain, count = match.parse_match_parameters(await json_body(request))
    found = await off_loop(request, node.match_patients, session, resource, only_certain,
                           count)
    return fhir_json(match.match_bundle(found, _base(request)))


@router.get("/Patient/{pid}/$everything")
async def everything(request: Request, pid: str) -> Response:
    node, session = node_of(request), session_of(request)
    return _searchset(request, "Patient", [], await off_loop(
        request, node.everything, session, pid, break_glass(request)))


@router.get("/Patient/{pid}/$summary")
async def summary(request: Request, pid: str) -> Response:
    node, session = node_of(request), session_of(request)
    return fhir_json(await off_loop(request, node.summary, session, pid))


@router.get("/AuditEvent", openapi_extra=query_schema({
    "patient": {"type": "string"}, "date": {"type": "string"}, "_count": {"type": "string"}}))
async def audit_events(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    params = dict(request.query_params)
    patient = (params.get("patient") or params.get("entity") or "").rsplit("/", 1)[-1]
    if not patient:
        raise InvalidInput("AuditEvent search needs patient=<id>")
    since = ""
    if params.get("date"):
        found = _SINCE.fullmatch(params["date"])
        if found is None:
            raise InvalidInput("AuditEvent date must be ge<FHIR date or dateTime>, e.g. "
                               "date=ge2024-01-31 or date=ge2024-01-31T08:00:00Z (UTC)")
        since = found.group(1)
    rows = await off_loop(request, node.audit_log, session, patient, since,
                          parse_count(params.get("_count"), 100))
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


@router.put("/{rtype}/{rid}", openapi_extra={**json_body_schema({"type": "object"}), **{
    "parameters": [{"name": "If-Match", "in": "header", "schema": {"type": "string"}}]}})
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
    versions = await off_loop(request, node.history, session, rtype, rid, break_glass(request))
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


@router.get("/{rtype}", openapi_extra=query_schema({
    n: {"type": "string"} for n in ("_id", "_count", "_sort", "_include", "_revinclude",
                                   "_elements", "_summary", "_total", "_page")}))
async def search(request: Request, rtype: str) -> Response:
    _check_type(rtype)
    node, session = node_of(request), session_of(request)
    items = _items(request)
    return _searchset(request, rtype, items, await off_loop(
        request, node.search, session, rtype, items, break_glass(request), "search",
        _strict(request)))


@router.delete("/{rtype}/{rid}")
async def delete(request: Request, rtype: str, rid: str) -> Response:
    session_of(request)
    return outcome_response(MedledgerError(
        "records are never deleted: the ledger is append-only; write a new version with "
        "status entered-in-error instead"), status=405, code="not-supported")

