"""JSON routes for the web portal and SMART Health Links (consents, shares, access log)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from medledger.api.common import (
    json_body,
    json_body_schema,
    node_of,
    off_loop,
    parse_count,
    query_schema,
    session_of,
)
from medledger.core import policy
from medledger.crypto.canonical import b64d, b64e
from medledger.errors import InvalidInput
from medledger.fhir import shl

router = APIRouter()


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


@router.get("/api/consents")
async def consents(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    patient = request.query_params.get("patient") or session.actor_id
    return _json(node.consents(session, patient))


@router.post("/api/consents", openapi_extra=json_body_schema({
    "type": "object", "required": ["decision"], "properties": {
        "decision": {"enum": ["permit", "deny"]},
        **{k: {"type": "array", "items": {"type": "string"}}
           for k in ("actors", "orgs", "categories", "labels")},
        "start": {"type": ["integer", "null"]}, "end": {"type": ["integer", "null"]}}}))
async def add_consent(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidInput("expected a consent object")
    rule = {"patient": session.actor_id, "decision": body.get("decision"),
            "actors": body.get("actors") or [], "orgs": body.get("orgs") or [],
            "categories": body.get("categories") or [], "labels": body.get("labels") or [],
            "start": body.get("start"), "end": body.get("end")}
    return _json(await node.put_consent(session, rule), 201)


@router.post("/api/consents/{cid}/revoke")
async def revoke_consent(request: Request, cid: str) -> Response:
    node, session = node_of(request), session_of(request)
    return _json(await node.revoke_consent(session, session.actor_id, cid))


@router.get("/api/shares")
async def shares(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    return _json([{k: v for k, v in g.items() if k != "passcode"} | {
        "has_passcode": bool(g["passcode"])} for g in node.shares(session)])


@router.post("/api/shares/publish")
async def publish_share(request: Request) -> Response:
    """A share link made client-side (the CLI, with the patient's own key): the signed
    ``share.create`` tx plus the payload this node keeps and serves (ADR 4)."""
    node, session = node_of(request), session_of(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("tx"), str) or not isinstance(
            body.get("jwe"), str):
        raise InvalidInput("expected {tx: <base64url signed share.create>, jwe, passcode?, "
                           "label?, recipient?}")
    passcode = body.get("passcode")
    label, recipient = body.get("label", ""), body.get("recipient", "")
    if passcode is not None and not isinstance(passcode, str) or not isinstance(
            label, str) or not isinstance(recipient, str):
        raise InvalidInput("passcode, label and recipient must be strings")
    grant = await node.publish_share(session, b64d(body["tx"], field="tx"), body["jwe"],
                                     passcode, label, recipient)
    return _json({k: v for k, v in grant.items() if k != "passcode"}
                 | {"has_passcode": bool(grant["passcode"])}, 201)


MAX_SHARE_LIFETIME_S = 366 * 24 * 3600
DEFAULT_SHARE_LIFETIME_S = 7 * 24 * 3600  # as `medledger share create`: links are time-limited
MAX_LABEL = 80
MAX_RECIPIENT = 200
SELECTION_KEYS = ("categories", "types", "ids")


def _selection(value: Any) -> dict[str, list[str]]:
    """``{categories?, types?, ids?}``, each a list of strings; anything else is a 400."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput("selection must be an object {categories?, types?, ids?}, each a "
                           "list of strings")
    unknown = set(value) - set(SELECTION_KEYS)
    if unknown:
        raise InvalidInput(f"selection has unknown fields {sorted(unknown)}; allowed: "
                           f"{', '.join(SELECTION_KEYS)}")
    out: dict[str, list[str]] = {}
    for key in SELECTION_KEYS:
        items = value.get(key)
        if items is None:
            continue
        if not isinstance(items, list) or not all(isinstance(i, str) and 0 < len(i) <= 200
                                                  for i in items) or len(items) > 1000:
            raise InvalidInput(f"selection.{key} must be a list of non-empty strings")
        out[key] = items
    if out and not any(out.values()):  # lists given, every one empty: nothing ticked
        raise InvalidInput("the selection is empty: choose at least one category, type or "
                           "record (leave selection out to share every record)")
    bad = set(out.get("categories", ())) - set(policy.CATEGORIES)
    if bad:
        raise InvalidInput(f"unknown data categories {sorted(bad)}; known: "
                           f"{', '.join(policy.CATEGORIES)}")
    return out


def _text(body: dict[str, Any], key: str, limit: int) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInput(f"{key} must be text of at most {limit} characters")
    return value


def _share_expiry(body: dict[str, Any], now_s: int) -> int:
    exp, ttl = body.get("exp"), body.get("expires_in_s")
    if exp is not None and ttl is not None:
        raise InvalidInput("give either exp or expires_in_s, not both")
    if exp is None and ttl is None:
        return now_s + DEFAULT_SHARE_LIFETIME_S
    if ttl is not None:
        if not _is_int(ttl) or not 0 < ttl <= MAX_SHARE_LIFETIME_S:
            raise InvalidInput(f"expires_in_s must be a whole number of seconds between 1 and "
                               f"{MAX_SHARE_LIFETIME_S}")
        return now_s + int(ttl)
    if not isinstance(exp, int) or isinstance(exp, bool) or not \
            now_s < exp <= now_s + MAX_SHARE_LIFETIME_S:
        raise InvalidInput("exp must be epoch seconds in the future, at most a year ahead")
    return exp


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@router.post("/api/shares", openapi_extra=json_body_schema({
    "type": "object", "properties": {
        "selection": {"type": "object", "properties": {
            k: {"type": "array", "items": {"type": "string"}} for k in SELECTION_KEYS}},
        "expires_in_s": {"type": "integer"}, "exp": {"type": "integer"},
        "passcode": {"type": ["string", "null"]}, "label": {"type": "string"},
        "recipient": {"type": "string"}}}))
async def create_share(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidInput("expected {selection, expires_in_s | exp, passcode, label}")
    passcode = body.get("passcode") or None  # "" from an empty form field: no passcode
    if passcode is not None and (not isinstance(passcode, str) or not 4 <= len(passcode) <= 64):
        raise InvalidInput("passcode must be text of 4 to 64 characters")
    link, grant = await node.create_share(session, _selection(body.get("selection")),
                                          _share_expiry(body, node.now_s), passcode,
                                          _text(body, "label", MAX_LABEL),
                                          _text(body, "recipient", MAX_RECIPIENT))
    return _json({"shlink": link, "id": grant["id"], "exp": grant["exp"],
                  "label": grant["label"], "records": grant["records"],
                  "qr_svg": shl.qr_svg(link), "qr_png": b64e(shl.qr_png(link))}, 201)


@router.post("/api/shares/{share_id}/revoke")
async def revoke_share(request: Request, share_id: str) -> Response:
    node, session = node_of(request), session_of(request)
    grant = await node.revoke_share(session, share_id)
    return _json({"id": grant["id"], "revoked": grant["revoked"]})


@router.post("/shl/{share_id}", openapi_extra=json_body_schema({
    "type": "object", "required": ["recipient"], "properties": {
        "recipient": {"type": "string"}, "passcode": {"type": "string"}}}))
async def shl_manifest(request: Request, share_id: str) -> Response:
    """SMART Health Links manifest request: {recipient, passcode?} -> {files: [...]}."""
    node = node_of(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("recipient"), str):
        raise InvalidInput("manifest request needs {\"recipient\": \"<who is opening this>\"}")
    passcode = body.get("passcode")
    manifest = await node.open_share(share_id, body["recipient"],
                                     passcode if isinstance(passcode, str) else None)
    return _json(manifest)


@router.get("/api/access-log", openapi_extra=query_schema({"count": {"type": "string"}}))
async def access_log(request: Request) -> Response:
    """The patient's access log as plain events (the portal's table and chart)."""
    node, session = node_of(request), session_of(request)
    count = parse_count(request.query_params.get("count"), 500, "count")
    rows = await off_loop(request, node.audit_log, session, session.actor_id, "", count)
    return _json([ev | {"anchored_height": h} for ev, h in rows])


@router.get("/api/keystore")
async def my_keystore(request: Request) -> Response:
    """Download your own (password-protected) key file, to use from any node or the CLI."""
    node, session = node_of(request), session_of(request)
    path = node.home.user_keystore(session.actor_id)
    if session.kind == "org" or not path.exists():
        raise InvalidInput("no key file for this account is held at this node")
    return Response(path.read_bytes(), media_type="application/json", headers={
        "Content-Disposition": f'attachment; filename="{session.actor_id}.key.json"'})


@router.put("/api/keystore")
async def replace_keystore(request: Request) -> Response:
    """Replace the key file this node holds for you after `medledger key rotate` (with a
    token of the new key)."""
    node, session = node_of(request), session_of(request)
    node.replace_keystore(session, await request.body())
    return _json({"id": session.actor_id, "replaced": True})


@router.get("/api/vocabulary")
async def vocabulary() -> Response:
    """Policy vocabulary the portal's forms offer: categories, sensitivity labels, limits."""
    return _json({"categories": list(policy.CATEGORIES),
                  "labels": {k: policy.LABEL_NAMES[k] for k in ("PSY", "ETH", "HIV")},
                  "break_glass_roles": sorted(n for n, r in policy.ROLES.items()
                                              if r.break_glass),
                  "break_glass_min_reason": policy.BREAK_GLASS_MIN_REASON})

