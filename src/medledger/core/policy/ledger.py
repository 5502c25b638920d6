"""The members-only ledger: who may see blocks, txs, proofs, and submit txs or fetch blobs.

The raw ledger holds policy metadata — pseudonymous patient ids, categories,
sensitivity labels, who read whose record when — so it is served to member
organisations only (their nodes and operators: active ``org`` principals). A patient
gets inclusion proofs of the txs that concern them alone and of their own audit
events; any authenticated principal gets block *headers* (to cross-check a proof's
header at a second node). ``/ledger/status`` stays public and carries no per-patient
data. ADR 1 lists what members can read and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medledger.core import state as st
from medledger.core.policy.roles import Caller, Decision, allow, deny

OTHER = "*"  # a part of a tx that concerns no single patient (practitioners, orgs, ...)
MEMBERS_ONLY = ("the raw ledger is served to member organisations only; a patient gets "
                "proofs of their own records and audit events")
# txs a client may not submit as raw bytes (what must go through a node endpoint instead)
NOT_RAW = {"share.create": "publish a share link at its issuing node (POST "
                           "/api/shares/publish): the node keeps its payload"}


def is_member(caller: Caller) -> bool:
    return caller.kind == "org" and caller.active


def decide_block(caller: Caller) -> Decision:
    """A block: members see its txs (hashes, result codes and logs); any other active
    principal its header only."""
    if is_member(caller):
        return allow("member", "member organisation")
    if caller.active:
        return allow("header", "block headers only")
    return deny(MEMBERS_ONLY)


def tx_subjects(state: st.StateReader, kind: str, signer: str,
                body: Mapping[str, Any]) -> frozenset[str]:
    """The patients a tx concerns, ``OTHER`` for any part that concerns no single patient."""
    out: set[str] = set()
    if kind in ("batch", "import.part"):
        for op in body.get("ops") or []:
            if isinstance(op, dict) and isinstance(op.get("body"), dict):
                out |= tx_subjects(state, str(op.get("kind")), signer, op["body"])
            else:
                out.add(OTHER)
        return frozenset(out or {OTHER})
    if kind == "record.put":
        out.add(str(body["patient"]) if body.get("patient") else OTHER)
    elif kind == "actor.register":
        out.add(str(body.get("id")) if body.get("kind") == "patient" else OTHER)
    elif kind in ("consent.put", "consent.revoke", "share.create", "record.erase"):
        out.add(str(body.get("patient")))
    elif kind in ("share.revoke", "share.attempt"):
        grant = st.share(state, str(body.get("id")))
        out.add(str(grant["patient"]) if grant else OTHER)
    elif kind in ("key.rotate", "actor.deactivate"):
        target = st.actor(state, str(body.get("id")))
        out.add(str(target["id"]) if target and target["kind"] == "patient" else OTHER)
    elif kind == "record.rewrap":
        for item in body.get("items") or []:
            meta = st.record_head(state, str(item.get("type")), str(item.get("id"))) \
                if isinstance(item, dict) else None
            out.add(str(meta["patient"]) if meta and meta["patient"] else OTHER)
    elif kind == "audit.anchor":
        out |= {str(e.get("patient")) if isinstance(e, dict) and e.get("patient") else OTHER
                for e in body.get("events") or []}
    return frozenset(out or {OTHER})


def decide_tx_proof(state: st.StateReader, caller: Caller, kind: str, signer: str,
                    body: Mapping[str, Any]) -> Decision:
    """A tx and its inclusion proof: members; a patient for a tx that concerns them alone
    (the raw tx is in the proof, so one naming other patients stays with members)."""
    if is_member(caller):
        return allow("member", "member organisation")
    if caller.kind == "patient" and caller.active and tx_subjects(
            state, kind, signer, body) == {caller.id}:
        return allow("patient-self", "a tx about the patient alone")
    return deny(MEMBERS_ONLY)


def decide_audit_proof(caller: Caller, event: Mapping[str, Any]) -> Decision:
    """An anchored audit event and its proof: members, and the patient it is about."""
    if is_member(caller):
        return allow("member", "member organisation")
    if caller.kind == "patient" and caller.active and event.get("patient") == caller.id:
        return allow("patient-self", "the patient's own access log")
    return deny(MEMBERS_ONLY)


def decide_tx_submission(caller: Caller, signer: str, kind: str) -> Decision:
    """``POST /ledger/tx``: a tx signed by the caller itself, or relayed by a member
    organisation; the refusal of a tx then goes only to whoever could sign it."""
    if kind in NOT_RAW:
        return deny(NOT_RAW[kind])
    if not caller.active:
        return deny(f"{caller.id} is not active")
    if caller.id == signer or is_member(caller):
        return allow("signer" if caller.id == signer else "member", "may submit")
    return deny(f"a tx signed by someone else is submitted by its signer (or a member "
                f"organisation), not by {caller.id}")


def decide_blob_serving(caller: Caller, local_org: str) -> Decision:
    """Sealed blobs (replication, ADR 4): other member organisations' nodes only."""
    if is_member(caller) and caller.id != local_org:
        return allow("member", "replication to a member node")
    return deny("sealed blobs are served to other member organisations' nodes only")


PUBLIC_ORG_FIELDS = ("id", "name", "status", "approvals", "sign_pub", "enc_pub")


def org_view(entry: Mapping[str, Any], member: bool) -> dict[str, Any]:
    """An organisation as listed: all of it to members; to anyone else its identity, keys
    and status (a joining organisation watches its approvals) but not where its node
    runs or its validator key."""
    if member:
        return dict(entry)
    view = {k: entry.get(k) for k in PUBLIC_ORG_FIELDS}
    view["validator"] = bool(entry.get("validator_pub"))
    return view
