"""Key recovery through guardians (ADR 7): setup, requests, approvals, completion.

- ``setup``: the patient's key is split k-of-n (``crypto.shamir``); each share is sealed
  to its guardian's X25519 key and kept as a blob (off-chain, fetched from member nodes
  like record blobs); ``recovery.setup`` (signed by the patient) names the hashes.
- ``request``: an organisation caring for the patient (it proofed their identity) or a
  guardian opens ``recovery.request`` with a fresh X25519 key. Either the patient's own
  client made that key (``enc_pub`` given: the node never sees the private half), or
  this node makes it and keeps it sealed under a one-time *recovery code* printed for the
  patient (the code is not stored).
- ``approve``: a guardian opens its share with its own key and re-seals it to the
  request's key; ``recovery.approve`` names the re-sealed share's hash.
- ``finish``: with k approvals, the holder of the request key (the patient, with the
  code) opens the k shares, combines them, checks the result against the patient's
  public keys on the ledger, stores a keystore under a new password and signs
  ``recovery.complete`` with the recovered key.

No guardian alone holds more than one share (k >= 2, enforced on the ledger); no node
can open a share (sealed to guardians, then to the request key); every step is a
ledger tx and an audit event the patient sees. ``on_commit`` deletes shares that are
no longer needed (ended requests, replaced setups).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from medledger.core import state as st
from medledger.core.machine import BlockApplied
from medledger.core.tx import decode_tx
from medledger.crypto import freetext, keys, shamir
from medledger.crypto.canonical import b64d, b64e, loads
from medledger.crypto.kdf import derive_key
from medledger.errors import (
    Conflict,
    Forbidden,
    IntegrityError,
    InvalidInput,
    MedledgerError,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from medledger.node import onboarding
from medledger.node.auth import Session
from medledger.storage.blobs import blob_hash
from medledger.storage.files import write_private

if TYPE_CHECKING:
    from medledger.node.service import Node

DEFAULT_REQUEST_TTL_S = 7 * 86400
MAX_CODE_ATTEMPTS = 5


def fingerprint(enc_pub_b64: str) -> str:
    """A short code guardians read back to the patient before approving."""
    digest = hashlib.sha256(b64d(enc_pub_b64, field="enc_pub")).hexdigest()[:16].upper()
    return "-".join(digest[i:i + 4] for i in range(0, 16, 4))


# ------------------------------------------------------------------ setup

def guardian_keys(state: st.StateReader, guardians: list[str]) -> dict[str, bytes]:
    pubs = {}
    for g in sorted(set(guardians)):
        entry = st.principal(state, g)
        if entry is None or not st.is_active(entry):
            raise InvalidInput(f"guardian {g} is not an active organisation or person on "
                               "the ledger")
        pubs[g] = b64d(entry["enc_pub"], field="enc_pub")
    return pubs


def build_setup(identity: keys.Identity, pubs: dict[str, bytes], threshold: int
                ) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """The ``recovery.setup`` body and the sealed-share blobs, made wherever the patient's
    key is (their own client, or the node for a portal session)."""
    guardians = sorted(pubs)
    words = shamir.split_identity(identity.sign_seed, identity.enc_private, threshold,
                                  len(guardians))
    blobs = [(g, shamir.seal_share(shamir.Share(identity.id, g, w), pubs[g]))
             for g, w in zip(guardians, words, strict=True)]
    body = {"patient": identity.id, "scheme": shamir.SCHEME, "threshold": threshold,
            "guardians": guardians, "shares": {g: blob_hash(b) for g, b in blobs}}
    return body, [(blob_hash(b), b) for _, b in blobs]


def reseal(sealed: bytes, guardian: keys.Identity, patient: str, enc_pub_b64: str) -> bytes:
    """A guardian's share, opened with its own key and sealed to a request's key."""
    share = shamir.open_share(sealed, guardian.enc_private, patient, guardian.id)
    return shamir.seal_share(share, b64d(enc_pub_b64, field="enc_pub"))


async def setup(node: Node, session: Session, guardians: list[str], threshold: int
                ) -> dict[str, Any]:
    identity = node._patient_identity(session, session.actor_id)
    body, blobs = build_setup(identity, guardian_keys(node.store, guardians), threshold)
    node.blobs.put(blobs)
    await node.submit(identity, "recovery.setup", body)
    node._audit(session, "recovery-setup", identity.id, [],
                detail=f"key split {threshold} of {len(body['guardians'])} among "
                       + ", ".join(body["guardians"]))
    return status(node, session)


async def publish_setup(node: Node, session: Session, raw_tx: bytes,
                        blobs: dict[str, bytes]) -> dict[str, Any]:
    """A setup made by the patient's own client (CLI): its tx and sealed shares."""
    tx = decode_tx(raw_tx)
    if tx.kind != "recovery.setup" or tx.signer != session.actor_id:
        raise Forbidden("a recovery setup is published by its patient, signed with their key")
    shares = tx.body.get("shares")
    if not isinstance(shares, dict) or sorted(shares.values()) != sorted(
            blob_hash(b) for b in blobs.values()):
        raise InvalidInput("the sealed shares do not match the setup's share hashes")
    node.blobs.put([(blob_hash(b), b) for b in blobs.values()])
    await node.submit_raw(raw_tx)
    node._audit(session, "recovery-setup", session.actor_id, [],
                detail=f"key split {tx.body.get('threshold')} of {len(shares)}")
    return status(node, session)


# ------------------------------------------------------------------ requests

def _signer(node: Node, session: Session) -> keys.Identity:
    """Who acts: this node's organisation, or a person holding their key in the session."""
    if session.kind == "org" and session.actor_id == node.org.id:
        return node.org
    if session.identity is None:
        raise Forbidden("this session holds no key: log in with your password at your node")
    return session.identity


def _request_file(node: Node, rid: str) -> Path:
    node.home.user_keystore(rid)  # validates the id
    return node.home.path / "recovery" / f"{rid}.json"


async def request(node: Node, session: Session, patient: str, enc_pub: str | None = None,
                  ttl_s: int = DEFAULT_REQUEST_TTL_S) -> dict[str, Any]:
    """Open a recovery request; without ``enc_pub`` this node holds the request key under
    a one-time code (returned once, never stored)."""
    signer = _signer(node, session)
    rid = os.urandom(16).hex()
    code = None
    if enc_pub is None:
        eph = keys.new_identity(rid, "recovery")
        code = onboarding.new_code()
        enc_pub = b64e(eph.enc_public)
        sealed = freetext.seal(_code_key(rid, code), ["recovery", rid, patient],
                               {"enc_private": b64e(eph.enc_private)})
        path = _request_file(node, rid)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, orjson.dumps({"patient": patient, "sealed": sealed,
                                          "attempts_left": MAX_CODE_ATTEMPTS}))
    body = {"patient": patient, "id": rid, "enc_pub": enc_pub, "exp": node.now_s + ttl_s}
    try:
        await node.submit(signer, "recovery.request", body)
    except MedledgerError:
        _request_file(node, rid).unlink(missing_ok=True)
        raise
    node._audit(session, "recovery-request", patient, [],
                detail=f"recovery request {rid[:8]} key {fingerprint(enc_pub)}")
    out = {"id": rid, "patient": patient, "exp": body["exp"],
           "fingerprint": fingerprint(enc_pub)}
    if code is not None:
        out["code"] = code
    return out


def _code_key(rid: str, code: str) -> bytes:
    return derive_key(onboarding.normalise(code).encode("ascii"), f"recovery request {rid}")


async def _blob(node: Node, h: str, ref: str, source: str) -> bytes:
    data = node.blobs.get(h)
    if data is None:
        await node.replica.fetch([(h, ref, source)])
        data = node.blobs.get(h)
    if data is None:
        raise Unavailable(f"a sealed share ({ref}) has not reached this node yet; try again")
    return data


def _home_org(node: Node, principal: str) -> str:
    entry = st.principal(node.store, principal) or {}
    return str(principal if entry.get("kind") == "org" else entry.get("org", ""))


async def approve(node: Node, session: Session, rid: str) -> dict[str, Any]:
    """A guardian re-seals its share to the request's key and approves on the ledger."""
    req = st.recovery_request(node.store, rid)
    if req is None:
        raise NotFound(f"no recovery request {rid}")
    guardian = _signer(node, session)
    setup = st.recovery_setup(node.store, req["patient"])
    if setup is None or setup["id"] != req["setup"] or guardian.id not in setup["guardians"]:
        raise node._deny(session, "recovery-approve", req["patient"], [],
                         f"{guardian.id} is not a guardian of {req['patient']}")
    patient = req["patient"]
    sealed = await _blob(node, setup["shares"][guardian.id],
                         f"recovery/{patient}/setup/key:{guardian.id}",
                         _home_org(node, patient))
    resealed = reseal(sealed, guardian, patient, req["enc_pub"])
    h = blob_hash(resealed)
    node.blobs.put([(h, resealed)])
    try:
        committed = await node.submit(guardian, "recovery.approve", {"id": rid, "share": h})
    except MedledgerError:
        node.blobs.delete([h])
        raise
    node._audit(session, "recovery-approve", patient, [],
                detail=f"guardian {guardian.id} approved recovery request {rid[:8]}")
    return {"id": rid, "approvals": committed.data.decode() if committed.data else ""}


async def publish_approval(node: Node, session: Session, raw_tx: bytes, blob: bytes
                           ) -> dict[str, Any]:
    """An approval made by a guardian's own client (CLI): its tx and re-sealed share."""
    tx = decode_tx(raw_tx)
    if tx.kind != "recovery.approve" or tx.signer != session.actor_id:
        raise Forbidden("an approval is published by its guardian, signed with their key")
    if tx.body.get("share") != blob_hash(blob):
        raise InvalidInput("the re-sealed share does not match the approval's hash")
    node.blobs.put([(blob_hash(blob), blob)])
    committed = await node.submit_raw(raw_tx)
    req = st.recovery_request(node.store, str(tx.body.get("id"))) or {}
    node._audit(session, "recovery-approve", req.get("patient"), [],
                detail=f"guardian {tx.signer} approved recovery request "
                       f"{str(tx.body.get('id'))[:8]}")
    return {"id": tx.body.get("id"), "approvals": committed.data.decode()}


async def sealed_share_for(node: Node, session: Session, patient: str) -> bytes:
    """A guardian's own sealed share (for a client that approves with its own key)."""
    setup = st.recovery_setup(node.store, patient)
    if setup is None or setup["status"] != "active" or session.actor_id not in \
            setup["guardians"]:
        raise Forbidden(f"{session.actor_id} is not a guardian of {patient}")
    return await _blob(node, setup["shares"][session.actor_id],
                       f"recovery/{patient}/setup/key:{session.actor_id}",
                       _home_org(node, patient))


async def approval_shares(node: Node, req: dict[str, Any]) -> dict[str, bytes]:
    """The re-sealed shares of a request (sealed to its key: useless to anyone else)."""
    return {g: await _blob(node, h, f"recovery/{req['patient']}/{req['id']}/key:{g}",
                           _home_org(node, g))
            for g, h in sorted(req["approvals"].items())}


# ------------------------------------------------------------------ completion

def recover_identity(req: dict[str, Any], shares: dict[str, bytes], enc_private: bytes,
                     actor: dict[str, Any]) -> keys.Identity:
    """Open the re-sealed shares with the request key, combine, check against the ledger."""
    patient = req["patient"]
    words = [shamir.open_share(b, enc_private, patient, g).mnemonic
             for g, b in sorted(shares.items())]
    sign_seed, enc_priv = shamir.combine_identity(words)
    identity = keys.Identity(patient, "patient", sign_seed, enc_priv)
    if (b64e(identity.sign_public), b64e(identity.enc_public)) != (actor["sign_pub"],
                                                                   actor["enc_pub"]):
        raise IntegrityError("the recovered key is not the key the ledger holds for "
                             f"{patient}")
    return identity


async def finish(node: Node, patient: str, rid: str, code: str, password: str
                 ) -> keys.Identity:
    """Redeem a node-held request: the recovered key gets the patient's new password."""
    path = _request_file(node, rid)
    if not path.exists():
        raise NotFound("this node holds no recovery request with that id")
    held = orjson.loads(path.read_bytes())
    if held["patient"] != patient:
        raise Unauthenticated("this recovery request is for another patient")
    if held["attempts_left"] <= 0:
        raise Forbidden("this recovery code is locked after too many wrong tries; ask "
                        "for a new request")
    if len(password) < 8:
        raise InvalidInput("choose a password of at least 8 characters")
    try:
        opened = freetext.open_(_code_key(rid, code), ["recovery", rid, patient],
                                held["sealed"])
    except IntegrityError:
        held["attempts_left"] -= 1
        write_private(path, orjson.dumps(held))
        _audit_patient(node, patient, "recovery-complete", "4", "wrong recovery code")
        raise Unauthenticated(f"wrong recovery code; {held['attempts_left']} tries left") \
            from None
    req = st.recovery_request(node.store, rid)
    if req is None or req["status"] != "open":
        raise Conflict(f"recovery request {rid} is {req['status'] if req else 'unknown'}")
    if len(req["approvals"]) < req["threshold"]:
        raise Conflict(f"{len(req['approvals'])} of {req['threshold']} guardian approvals so "
                       "far; recovery needs all of them")
    actor = st.actor(node.store, patient)
    assert actor is not None
    identity = recover_identity(req, await approval_shares(node, req),
                                b64d(opened["enc_private"]), actor)
    await node._off_loop(keys.save_keystore, node.home.user_keystore(patient), identity,
                         password)
    await node.submit(identity, "recovery.complete", {"id": rid})
    path.unlink(missing_ok=True)
    _audit_patient(node, patient, "recovery-complete", "0",
                   f"key recovered with {len(req['approvals'])} guardian approvals "
                   f"({', '.join(sorted(req['approvals']))}); new password set")
    return identity


def _audit_patient(node: Node, patient: str, subtype: str, outcome: str, detail: str) -> None:
    ev = node.auditor.event(subtype, agent=patient, agent_org=node.org.id,
                            agent_role="patient", patient=patient, entity=[],
                            outcome=outcome, purpose="PATRQT", detail=detail)
    node.auditor.record(ev)


async def cancel(node: Node, session: Session, rid: str) -> dict[str, Any]:
    req = st.recovery_request(node.store, rid)
    if req is None:
        raise NotFound(f"no recovery request {rid}")
    signer = _signer(node, session)
    await node.submit(signer, "recovery.cancel", {"id": rid})
    node._audit(session, "recovery-cancel", req["patient"], [],
                detail=f"recovery request {rid[:8]} cancelled by {signer.id}")
    return st.recovery_request(node.store, rid) or {}


# ------------------------------------------------------------------ views

def _request_view(req: dict[str, Any]) -> dict[str, Any]:
    return {**req, "fingerprint": fingerprint(req["enc_pub"]),
            "approved_by": sorted(req["approvals"])}


def status(node: Node, session: Session) -> dict[str, Any]:
    """The caller's recovery: as a patient, their setup and every request (who opened it,
    who approved); as a guardian, the open requests waiting for their approval."""
    me = session.actor_id
    out: dict[str, Any] = {"setup": None, "requests": [], "to_approve": []}
    if session.kind == "patient":
        out["setup"] = st.recovery_setup(node.store, me)
        out["requests"] = sorted((_request_view(r) for r in st.recovery_requests(
            node.store, me)), key=lambda r: r["created_ns"], reverse=True)
    for _, raw in node.store.scan("recoveryreq/"):
        req = loads(raw)
        setup = st.recovery_setup(node.store, req["patient"]) or {}
        if req["status"] == "open" and req["exp"] > node.now_s and me in setup.get(
                "guardians", ()) and setup.get("id") == req["setup"] and \
                me not in req["approvals"]:
            out["to_approve"].append(_request_view(req))
    return out


# ------------------------------------------------------------------ clean-up on commit

def on_commit(node: Node, applied: BlockApplied) -> None:
    """Delete shares nobody needs any more: re-sealed shares of ended requests (and the
    request key this node held), sealed shares of replaced or revoked setups."""
    drop: list[str] = []
    for key, raw in applied.writes.items():
        if raw is None:
            continue
        if key.startswith("recoveryreq/"):
            req = loads(raw)
            if req["status"] in ("completed", "cancelled"):
                drop += list(req["approvals"].values())
                try:
                    _request_file(node, req["id"]).unlink(missing_ok=True)
                except InvalidInput:
                    pass
        elif key.startswith("recovery/"):
            setup = loads(raw)
            if setup["status"] != "active":
                drop += list(setup["shares"].values())
    if drop:
        node.blobs.delete(drop)
