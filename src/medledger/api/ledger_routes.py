"""Auth, admin and ledger routes: tokens (issue, revoke), enrolment and removal, key
rotation, status, blocks, proofs, raw txs, export.

The ledger is members-only (``core.policy.ledger``): every ``/ledger/*`` route but
``/ledger/status`` needs a bearer token, and what it shows depends on who holds it.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from medledger.api.common import (
    check_browser_write,
    client_address,
    fhir_json,
    json_body,
    json_body_schema,
    node_of,
    off_loop,
    session_of,
)
from medledger.core.machine import HASH_RE
from medledger.crypto.canonical import b64e
from medledger.errors import InvalidInput, Unauthenticated
from medledger.node.auth import ASSERTION_TYPE, Session

router = APIRouter()


def _token_response(token: str, session: Any, node: Any) -> Response:
    body = {"access_token": token, "token_type": "bearer",
            "expires_in": int(session.expires_s - node.clock()),
            "scope": " ".join(sorted(session.scopes)), "actor": session.actor_id,
            "kind": session.kind, "role": session.role, "org": session.org}
    resp = Response(orjson.dumps(body), media_type="application/json",
                    headers={"Cache-Control": "no-store"})
    return resp


@router.post("/auth/token")
async def token(request: Request) -> Response:
    node = node_of(request)
    form = await request.form()
    if form.get("grant_type") != "client_credentials":
        raise InvalidInput("grant_type must be client_credentials")
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise InvalidInput(f"client_assertion_type must be {ASSERTION_TYPE}")
    assertion = form.get("client_assertion")
    if not isinstance(assertion, str) or not assertion:
        raise InvalidInput("client_assertion is missing")
    scope = form.get("scope")
    tok, session = node.auth.exchange(assertion, scope if isinstance(scope, str) else None)
    return _token_response(tok, session, node)


@router.post("/auth/login", openapi_extra=json_body_schema({
    "type": "object", "required": ["id", "password"],
    "properties": {"id": {"type": "string"}, "password": {"type": "string"}}}))
async def login(request: Request) -> Response:
    node = node_of(request)
    # a login from another site (login CSRF) is refused too; non-browser clients send no Origin
    check_browser_write(request, origin_required=False)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not isinstance(
            body.get("password"), str):
        raise InvalidInput("login needs {\"id\": ..., \"password\": ...}")
    tok, session = await node.login(body["id"], body["password"], client_address(request))
    resp = _token_response(tok, session, node)
    resp.set_cookie("medledger_token", tok, httponly=True, samesite="strict",
                    max_age=node.config.token_ttl_s, secure=request.url.scheme == "https")
    return resp


@router.post("/auth/revoke")
async def revoke(request: Request) -> Response:
    """OAuth 2.0 token revocation (RFC 7009): ``token=<bearer token>``, form-encoded. The
    token itself is the credential; the answer is 200 whether or not it was live (an
    unknown token is not an error, and the answer reveals nothing about it)."""
    node = node_of(request)
    form = await request.form()
    token = form.get("token")
    if not isinstance(token, str) or not token:
        raise InvalidInput("token revocation needs token=<the bearer token> (form-encoded)")
    node.auth.revoke(token)
    return Response(b"", status_code=200, headers={"Cache-Control": "no-store"})


@router.post("/auth/logout")
async def logout(request: Request) -> Response:
    node = node_of(request)
    tok = request.cookies.get("medledger_token")
    if tok:
        check_browser_write(request)
        node.auth.logout(tok)
    resp = Response(b"{}", media_type="application/json")
    resp.delete_cookie("medledger_token")
    return resp


@router.get("/auth/me")
async def me(request: Request) -> Response:
    s = session_of(request)
    return fhir_json({"actor": s.actor_id, "kind": s.kind, "role": s.role, "org": s.org,
                      "scope": " ".join(sorted(s.scopes)), "expires_at": int(s.expires_s)})


@router.post("/admin/practitioners")
async def add_practitioner(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidInput("expected {id, role, password}")
    for f in ("id", "role", "password"):
        if not isinstance(body.get(f), str):
            raise InvalidInput(f"field {f!r} is required")
    identity = await node.register_practitioner(session, body["id"], body["role"],
                                                body["password"])
    keystore = node.home.user_keystore(identity.id).read_bytes()
    return fhir_json({"id": identity.id, "role": body["role"], "org": node.org.id,
                      "keystore": orjson.loads(keystore)}, 201)


@router.post("/admin/practitioners/{actor_id}/remove")
async def remove_practitioner(request: Request, actor_id: str) -> Response:
    """Deactivate a practitioner of this organisation (``actor.deactivate``)."""
    node, session = node_of(request), session_of(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("reason"), str):
        raise InvalidInput("expected {\"reason\": \"left\" | \"key-compromised\" | ...}")
    entry = await node.deactivate(session, actor_id, body["reason"])
    return fhir_json({"id": entry["id"], "status": entry["status"],
                      "reason": entry.get("deactivated_reason")})


@router.post("/admin/keys/rotate")
async def rotate_org_keys(request: Request) -> Response:
    """Rotate this organisation's keys (``key.rotate``); old encryption keys are kept."""
    node, session = node_of(request), session_of(request)
    return fhir_json(await node.rotate_org_keys(session))


@router.post("/admin/rewrap")
async def rewrap(request: Request) -> Response:
    """Re-wrap this node's record keys to an organisation that joined later."""
    node, session = node_of(request), session_of(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("org"), str):
        raise InvalidInput("expected {\"org\": \"<organisation id>\"}")
    return fhir_json({"org": body["org"], "rewrapped": await node.rewrap_for(session,
                                                                             body["org"])})


@router.get("/ledger/status")
async def status(request: Request) -> Response:
    node = node_of(request)
    return fhir_json({"chain": node.chain, "org": node.org.id, "mode": node.config.mode,
                      "height": node.store.height, "app_hash": node.store.app_hash.hex(),
                      "header_hash": node.store.last_header_hash.hex(),
                      "serving": node.integrity_failure is None,
                      "problem": node.integrity_failure or ""})


@router.get("/ledger/orgs")
async def orgs(request: Request) -> Response:
    """The organisations: all of each entry for members; their id, name, keys, status and
    approvals for anyone else (a joining organisation watches its approvals)."""
    node = node_of(request)
    try:
        session: Session | None = session_of(request)
    except Unauthenticated:
        session = None
    return fhir_json(node.ledger_orgs(session))


@router.get("/ledger/blocks/{height}")
async def block(request: Request, height: int) -> Response:
    node, session = node_of(request), session_of(request)
    return fhir_json(node.ledger_block(session, height))


@router.get("/ledger/proof/tx/{tx_hash}")
async def tx_proof(request: Request, tx_hash: str) -> Response:
    node, session = node_of(request), session_of(request)
    try:
        digest = bytes.fromhex(tx_hash)
    except ValueError as exc:
        raise InvalidInput("tx hash must be hex") from exc
    return fhir_json(node.ledger_tx_proof(session, digest))


@router.get("/ledger/proof/audit/{event_id}")
async def audit_proof(request: Request, event_id: str) -> Response:
    node, session = node_of(request), session_of(request)
    return fhir_json(node.ledger_audit_proof(session, event_id))


@router.post("/ledger/tx")
async def submit_tx(request: Request) -> Response:
    """Submit a tx signed by the client itself (e.g. a patient's consent from the CLI),
    with the signer's bearer token (or a member organisation's, relaying it)."""
    node, session = node_of(request), session_of(request)
    raw = await request.body()
    committed = await node.submit_client_tx(session, raw)
    return fhir_json({"code": committed.code, "height": committed.height,
                      "hash": committed.tx_hash.hex(), "data": committed.data.decode()})


@router.get("/ledger/patients/{pid}/sealed")
async def sealed(request: Request, pid: str) -> Response:
    node, session = node_of(request), session_of(request)
    records = await off_loop(request, node.export_sealed, session, pid)
    return fhir_json({"patient": pid, "chain": node.chain, "records": records})


@router.post("/replica/blobs")
async def replica_blobs(request: Request) -> Response:
    """Sealed blobs for another member node's replication fetcher (ADR 4): member
    organisations only; what is erased is gone."""
    node, session = node_of(request), session_of(request)
    body = await json_body(request)
    hashes = body.get("hashes") if isinstance(body, dict) else None
    if not isinstance(hashes, list) or not all(
            isinstance(h, str) and HASH_RE.match(h) for h in hashes):
        raise InvalidInput("expected {\"hashes\": [<sha-256 hex>, ...]}")
    blobs = node.serve_blobs(session, hashes)
    return fhir_json({"blobs": {h: b64e(d) for h, d in blobs.items()}})

