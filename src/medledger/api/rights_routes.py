"""Patient-rights routes: erasure, accounting of disclosures, key recovery, onboarding.

Thin: parse, call ``node.erasure`` / ``node.disclosures`` / ``node.recovery`` /
``node.onboarding``, answer FHIR (Parameters, Bundle) or portal JSON.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from medledger.api.common import fhir_json, json_body, node_of, session_of
from medledger.core import state as st
from medledger.crypto.canonical import b64d, b64e
from medledger.errors import InvalidInput, NotFound
from medledger.node import audit as audit_mod
from medledger.node import disclosures, erasure, onboarding, recovery

router = APIRouter()


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


# ------------------------------------------------------------------ erasure

@router.post("/fhir/Patient/{pid}/$erase")
async def erase(request: Request, pid: str) -> Response:
    """Crypto-shred a patient's records on every node (ADR 4): Parameters in (basis and
    one scope), Parameters out (what the ledger recorded)."""
    node, session = node_of(request), session_of(request)
    req = erasure.parse_erase_parameters(await json_body(request))
    entry = await erasure.erase(node, session, pid, req)
    found = node.store.tx(bytes.fromhex(entry["tx"]))
    return fhir_json(erasure.erasure_parameters(entry, found[0] if found else None))


@router.get("/api/erasures")
async def my_erasures(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    patient = request.query_params.get("patient") or session.actor_id
    return _json(erasure.erasures(node, session, patient))


# ------------------------------------------------------------------ accounting of disclosures

@router.get("/fhir/Patient/{pid}/$disclosures")
async def disclosures_fhir(request: Request, pid: str) -> Response:
    """Every disclosure outside treatment by the patient's own organisations, each with
    its ledger inclusion proof and the key of its sealed free text."""
    node, session = node_of(request), session_of(request)
    q = request.query_params
    entries = disclosures.disclosures(node, session, pid, q.get("start"), q.get("end"))
    return fhir_json(disclosures.to_bundle(entries, node.config.base_url + "/fhir"))


@router.get("/api/disclosures")
async def my_disclosures(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    q = request.query_params
    entries = disclosures.disclosures(node, session, session.actor_id, q.get("start"),
                                      q.get("end"))
    return _json([{k: v for k, v in e.items() if k not in ("event", "proof")}
                  | {"proved": e["proof"] is not None} for e in entries])


@router.get("/api/disclosures.pdf")
async def my_disclosures_pdf(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    q = request.query_params
    period = disclosures.parse_period(q.get("start"), q.get("end"), node.now_s)
    entries = disclosures.disclosures(node, session, session.actor_id, period[0], period[1])
    pdf = disclosures.render_pdf(entries, session.actor_id, period, node.org.id,
                                 audit_mod.iso_now(node.clock))
    return Response(pdf, media_type="application/pdf", headers={
        "Content-Disposition": f'attachment; filename="disclosures-{session.actor_id}.pdf"',
        "Cache-Control": "no-store"})


# ------------------------------------------------------------------ onboarding

@router.post("/api/onboarding/{pid}/code")
async def activation_code(request: Request, pid: str) -> Response:
    """An activation code for an imported patient (this node's organisation only)."""
    node, session = node_of(request), session_of(request)
    body = await json_body(request) if await request.body() else {}
    days = body.get("valid_days", 14) if isinstance(body, dict) else None
    if not isinstance(days, int) or isinstance(days, bool):
        raise InvalidInput("valid_days must be a whole number of days")
    return _json(onboarding.issue_code(node, session, pid, days * 86400), 201)


def _login_response(request: Request, node: Any, identity: Any) -> Response:
    token, session = node.auth.login(identity)
    resp = _json({"access_token": token, "token_type": "bearer",
                  "expires_in": int(session.expires_s - node.clock()),
                  "actor": session.actor_id, "kind": session.kind, "role": session.role,
                  "org": session.org, "scope": " ".join(sorted(session.scopes))})
    resp.set_cookie("medledger_token", token, httponly=True, samesite="strict",
                    max_age=node.config.token_ttl_s, secure=request.url.scheme == "https")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _fields(body: Any, *names: str) -> list[str]:
    if not isinstance(body, dict) or not all(isinstance(body.get(n), str) and body[n]
                                             for n in names):
        raise InvalidInput("expected {" + ", ".join(f'"{n}": "..."' for n in names) + "}")
    return [str(body[n]) for n in names]


@router.post("/auth/activate")
async def activate(request: Request) -> Response:
    """Redeem an activation code with a new password; signs the patient in."""
    node = node_of(request)
    pid, code, password = _fields(await json_body(request), "id", "code", "password")
    return _login_response(request, node, await onboarding.activate(node, pid, code,
                                                                     password))


# ------------------------------------------------------------------ key recovery

@router.get("/api/recovery")
async def recovery_status(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    return _json(recovery.status(node, session))


@router.get("/api/recovery/keys")
async def guardian_keys(request: Request) -> Response:
    """Public X25519 keys of would-be guardians (ledger state), for a client-side setup."""
    node = node_of(request)
    session_of(request)
    ids = [i for i in request.query_params.get("ids", "").split(",") if i]
    out = {}
    for i in ids[:16]:
        entry = st.principal(node.store, i)
        if entry is None:
            raise NotFound(f"no organisation or person {i} on the ledger")
        out[i] = entry["enc_pub"]
    return _json(out)


@router.post("/api/recovery/setup")
async def recovery_setup(request: Request) -> Response:
    """``{guardians, threshold}`` (a portal session: the node splits the session's key), or
    ``{tx, shares: {hash: b64}}`` (split and signed by the patient's own client)."""
    node, session = node_of(request), session_of(request)
    body = await json_body(request)
    if isinstance(body, dict) and isinstance(body.get("tx"), str):
        shares = body.get("shares")
        if not isinstance(shares, dict):
            raise InvalidInput("shares must map hashes to base64 sealed shares")
        blobs = {str(h): b64d(str(v), field="share") for h, v in shares.items()}
        return _json(await recovery.publish_setup(node, session, b64d(body["tx"], field="tx"),
                                                  blobs), 201)
    if not isinstance(body, dict) or not isinstance(body.get("guardians"), list) or \
            not isinstance(body.get("threshold"), int):
        raise InvalidInput("expected {guardians: [ids], threshold: k}")
    return _json(await recovery.setup(node, session, [str(g) for g in body["guardians"]],
                                      body["threshold"]), 201)


@router.get("/api/recovery/share")
async def my_sealed_share(request: Request) -> Response:
    """A guardian's own sealed share of ``patient``'s key (opened by its own client)."""
    node, session = node_of(request), session_of(request)
    patient = request.query_params.get("patient", "")
    return _json({"patient": patient, "share": b64e(
        await recovery.sealed_share_for(node, session, patient))})


@router.post("/api/recovery/requests")
async def recovery_request(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("patient"), str):
        raise InvalidInput("expected {patient, enc_pub?, valid_days?}")
    days = body.get("valid_days", 7)
    enc_pub = body.get("enc_pub")
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 30:
        raise InvalidInput("valid_days must be 1-30")
    if enc_pub is not None and not isinstance(enc_pub, str):
        raise InvalidInput("enc_pub must be a base64url X25519 public key")
    return _json(await recovery.request(node, session, body["patient"], enc_pub,
                                        days * 86400), 201)


@router.post("/api/recovery/requests/{rid}/approve")
async def recovery_approve(request: Request, rid: str) -> Response:
    node, session = node_of(request), session_of(request)
    body = await json_body(request) if await request.body() else {}
    if isinstance(body, dict) and isinstance(body.get("tx"), str):
        share = body.get("share")
        if not isinstance(share, str):
            raise InvalidInput("share must be the base64 re-sealed share")
        return _json(await recovery.publish_approval(node, session,
                                                     b64d(body["tx"], field="tx"),
                                                     b64d(share, field="share")))
    return _json(await recovery.approve(node, session, rid))


@router.post("/api/recovery/requests/{rid}/cancel")
async def recovery_cancel(request: Request, rid: str) -> Response:
    node, session = node_of(request), session_of(request)
    return _json(await recovery.cancel(node, session, rid))


@router.get("/recovery/requests/{rid}/shares")
async def recovery_shares(request: Request, rid: str) -> Response:
    """The approvals' re-sealed shares: sealed to the request's key, so only the client
    holding that key (the patient's) opens them; no sign-in (the patient has no key).
    With the patient's public keys, which the client checks the recovered key against:
    served here, under the request's unguessable id, and not by patient id, which
    would tell anyone whether an id exists."""
    node = node_of(request)
    req = st.recovery_request(node.store, rid)
    actor = st.actor(node.store, req["patient"]) if req is not None else None
    if req is None or actor is None:
        raise NotFound(f"no recovery request {rid}")
    shares = await recovery.approval_shares(node, req)
    keys = {"id": req["patient"], "sign_pub": actor["sign_pub"], "enc_pub": actor["enc_pub"]}
    return _json({"request": req, "shares": {g: b64e(b) for g, b in shares.items()},
                  "keys": keys})


@router.post("/auth/recover")
async def recover(request: Request) -> Response:
    """Finish a recovery this node holds the key of: the code printed for the patient and
    a new password; signs the patient in with their recovered key."""
    node = node_of(request)
    pid, rid, code, password = _fields(await json_body(request), "id", "request", "code",
                                       "password")
    return _login_response(request, node, await recovery.finish(node, pid, rid, code,
                                                                password))
