"""Onboarding of imported patients: key escrow until activation, one-time activation codes.

A patient registered without a password (a bulk import, a registration by staff) has
their keystore written under an *escrow secret* derived from this organisation's key
(``derive_key(org key, "patient key escrow v1:" + id)``): nobody knows a password for
it, only this node can open it, and this node opens it for exactly one purpose -
activation (ADR 7). ``<home>/onboarding/<patient>.json`` marks the escrow and holds
the current activation code's verifier.

The organisation issues an *activation code* (``issue_code``): 100 random bits shown
once as text (``XXXXX-XXXXX-XXXXX-XXXXX``) and as a QR code, kept here only as an
HMAC under a node key, valid for ``ttl`` (14 days by default) and for
``MAX_ATTEMPTS`` wrong tries; a new code replaces the old. The patient redeems it with
a password of their choice (``activate``): the keystore is re-encrypted under that
password, the escrow ends and the code is spent. Issuing, every failed try and the
activation are audit events (anchored on the ledger, shown to the patient).
"""

from __future__ import annotations

import base64
import hmac
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import segno

from medledger.core import state as st
from medledger.crypto import keys
from medledger.crypto.canonical import b64e, canonical
from medledger.crypto.kdf import derive_key
from medledger.errors import (
    Conflict,
    Forbidden,
    Gone,
    InvalidInput,
    MedledgerError,
    NotFound,
    Unauthenticated,
)
from medledger.node.auth import Session
from medledger.node.home import Home
from medledger.storage.files import write_private

if TYPE_CHECKING:
    from medledger.node.service import Node

DEFAULT_TTL_S = 14 * 86400
MAX_TTL_S = 90 * 86400
MAX_ATTEMPTS = 5
CODE_BYTES = 13  # 104 bits -> 21 base32 characters, 20 shown (100 bits)
# The escrow secret is a 256-bit key, not a password: stretching it adds nothing against
# guessing, so the escrow keystore takes scrypt's smallest cost (~1 ms, against ~0.1 s
# of CPU for a password's). Activation re-encrypts under the patient's password at
# ``keys.DEFAULT_SCRYPT_N``.
ESCROW_SCRYPT_N = 2**10


def escrow_secret(org_secret: bytes, patient: str) -> str:
    """The keystore password of an escrowed patient key: only this node can derive it."""
    return b64e(derive_key(org_secret, f"patient key escrow v1:{patient}"))


def marker(home: Home, patient: str) -> Path:
    home.user_keystore(patient)  # validates the id (it names a file)
    return home.path / "onboarding" / f"{patient}.json"


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, orjson.dumps(doc))


def _read(home: Home, patient: str) -> dict[str, Any] | None:
    path = marker(home, patient)
    return dict(orjson.loads(path.read_bytes())) if path.exists() else None


def escrow_keystore(home: Home, org_secret: bytes, identity: keys.Identity, now: float,
                    scrypt_n: int = ESCROW_SCRYPT_N) -> None:
    """Write a new patient's keystore under the escrow secret (never a password anyone
    knows) and mark it escrowed. Called from the registration path (``Node``) for every
    patient registered without a password."""
    keys.save_keystore(home.user_keystore(identity.id), identity,
                       escrow_secret(org_secret, identity.id), scrypt_n, True)
    _write(marker(home, identity.id), {"patient": identity.id, "escrowed_at": now,
                                       "code": None})


def is_escrowed(home: Home, patient: str) -> bool:
    return marker(home, patient).exists()


def _org_secrets(node: Node) -> tuple[bytes, ...]:
    """What escrow secrets and code verifiers are derived from: the organisation's
    ``secret_root`` (local secrets must survive a key rotation, like the seal and
    passcode keys), then every key it has held (escrows made under the key that was
    current then)."""
    return tuple(dict.fromkeys((node.org.secret_root, *node.org.enc_privates)))


def _verifier(secret: bytes, patient: str, code: str) -> bytes:
    key = derive_key(secret, "activation code verifier v1")
    return hmac.new(key, canonical([patient, normalise(code)]), "sha256").digest()


def _unlock_escrow(path: Path, secrets: tuple[bytes, ...], patient: str) -> keys.Identity:
    for secret in secrets[:-1]:
        try:
            return keys.load_keystore(path, escrow_secret(secret, patient))
        except Unauthenticated:
            continue
    return keys.load_keystore(path, escrow_secret(secrets[-1], patient))


def normalise(code: str) -> str:
    return "".join(c for c in code.upper() if c.isalnum())


def new_code() -> str:
    raw = base64.b32encode(os.urandom(CODE_BYTES)).decode("ascii")[:20]
    return "-".join(raw[i:i + 5] for i in range(0, 20, 5))


def issue_code(node: Node, session: Session, patient: str, ttl_s: int = DEFAULT_TTL_S
               ) -> dict[str, Any]:
    """A fresh activation code for an escrowed patient of this node's organisation."""
    if session.kind != "org" or session.actor_id != node.org.id:
        raise node._deny(session, "activation-code", patient, [],
                         "only this node's organisation issues activation codes")
    if not 3600 <= ttl_s <= MAX_TTL_S:
        raise InvalidInput(f"an activation code is valid for 1 hour to {MAX_TTL_S // 86400} "
                           "days")
    pat = st.actor(node.store, patient)
    if pat is None or pat["kind"] != "patient":
        raise NotFound(f"Patient/{patient} is not registered")
    state = _read(node.home, patient)
    if state is None:
        raise Conflict(f"{patient} has no escrowed key at this node: they were enrolled with "
                       "a password, activated already, or registered at another node")
    code = new_code()
    exp = node.now_s + ttl_s
    state["code"] = {"verifier": b64e(_verifier(node.org.secret_root, patient, code)),
                     "exp": exp,
                     "attempts_left": MAX_ATTEMPTS, "issued_at": node.now_s}
    _write(marker(node.home, patient), state)
    node._audit(session, "activation-code", patient, [f"Patient/{patient}"],
                detail=f"activation code issued, valid until {exp}")
    link = f"{node.config.base_url}/#activate/{patient}"
    text = f"medledger activation\npatient: {patient}\ncode: {code}\nat: {link}"
    qr = segno.make(f"{link}/{code}", error="m")
    return {"patient": patient, "code": code, "exp": exp, "url": link, "text": text,
            "qr_svg": qr.svg_inline(scale=4), "qr_png": b64e(_png(qr))}


def _png(qr: segno.QRCode) -> bytes:
    import io
    buf = io.BytesIO()
    qr.save(buf, kind="png", scale=4)
    return buf.getvalue()


async def activate(node: Node, patient: str, code: str, password: str) -> keys.Identity:
    """Redeem an activation code: the escrowed key gets the patient's own password."""
    state = _read(node.home, patient)
    ticket = (state or {}).get("code")
    if state is None or ticket is None:
        raise Unauthenticated("no activation is pending for this id at this node (ask your "
                              "organisation for a code)")
    if ticket["exp"] <= node.now_s:
        raise Gone("this activation code expired; ask your organisation for a new one")
    if ticket["attempts_left"] <= 0:
        raise Gone("this activation code is locked after too many wrong tries; ask your "
                   "organisation for a new one")
    if len(password) < 8:
        raise InvalidInput("choose a password of at least 8 characters")
    expected = base64.urlsafe_b64decode(ticket["verifier"] + "=" * (-len(ticket["verifier"]) % 4))
    if not any(hmac.compare_digest(_verifier(secret, patient, code), expected)
               for secret in _org_secrets(node)):
        ticket["attempts_left"] -= 1
        _write(marker(node.home, patient), state)
        _audit_patient(node, patient, "activate", "4", "wrong activation code")
        raise Unauthenticated(f"wrong activation code; {ticket['attempts_left']} tries left")
    path = node.home.user_keystore(patient)
    escrowed: keys.Identity = await node._off_loop(_unlock_escrow, path, _org_secrets(node),
                                                   patient)
    # the escrow ends with new keys: whoever held or copied the escrowed key (it was
    # sealed to the organisation) can no longer sign as the patient; the old encryption
    # key stays in the patient's keystore, so what was sealed to it still opens
    identity = keys.rotated(escrowed)
    pending = path.with_name(f".{path.name}.next")
    await node._off_loop(keys.save_keystore, pending, identity, password)
    try:
        await node.submit(escrowed, "key.rotate", {
            "id": patient, "sign_pub": b64e(identity.sign_public),
            "enc_pub": b64e(identity.enc_public)})
    except MedledgerError:  # nothing changed: the code stays valid for another try
        pending.unlink(missing_ok=True)
        raise
    pending.replace(path)
    marker(node.home, patient).unlink(missing_ok=True)  # the code is spent, escrow ends
    _audit_patient(node, patient, "activate", "0",
                   "escrow ended: the patient set a password and the keys were renewed")
    return identity


def _audit_patient(node: Node, patient: str, subtype: str, outcome: str, detail: str) -> None:
    ev = node.auditor.event(subtype, agent=patient, agent_org=node.org.id,
                            agent_role="patient", patient=patient, entity=[f"Patient/{patient}"],
                            outcome=outcome, purpose="PATRQT", detail=detail)
    node.auditor.record(ev)


def check_not_escrowed(home: Home, patient: str) -> None:
    if is_escrowed(home, patient):
        raise Forbidden(f"{patient}'s key is escrowed until they activate their account")
