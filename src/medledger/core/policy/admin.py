"""Everything else a node is asked to allow: consent and audit-log access, sealed export,
share links, ``$match``, and running the node (practitioners, keys, re-wrapping).

Each function answers for a ``Caller`` (ledger entry + token scopes) and, where the
answer depends on which node is asked, the id of the organisation running it.
"""

from __future__ import annotations

from typing import Any

from medledger.core import state as st
from medledger.core.policy.roles import Caller, Decision, allow, deny
from medledger.core.policy.scopes import scope_denial


def decide_patient_self(caller: Caller, patient: str, what: str) -> Decision:
    """Something only the patient themself may do (``what``: "export their records")."""
    if caller.kind == "patient" and caller.id == patient and caller.active:
        return allow("patient-self", what)
    return deny(f"only patient {patient} may {what}")


def decide_consent_change(caller: Caller, patient: str) -> Decision:
    """Consents are put and revoked by the patient (the tx is signed with their key)."""
    decision = decide_patient_self(caller, patient, "change their consents")
    if decision.allowed:
        refused = scope_denial(caller.scopes, "Consent", "c")
        if refused is not None:
            return deny(refused, basis="scope")
    return decision


def decide_consent_read(state: st.StateReader, caller: Caller, patient: str,
                        local_org: str) -> Decision:
    """A patient's consent rules — which can themselves reveal sensitive facts — for the
    patient, practitioners of an organisation caring for them, and this node's
    organisation."""
    refused = scope_denial(caller.scopes, "Consent", "r")
    if caller.kind == "patient":
        if caller.id != patient:
            return deny("patients may see only their own consents")
        return deny(refused, basis="scope") if refused else allow("patient-self", "own")
    if caller.kind == "practitioner":
        if refused is not None:
            return deny(refused, basis="scope")
        if not st.has_care(state, patient, caller.org):
            return deny(f"organisation {caller.org} has no care relationship with this "
                        "patient", disclose=False)
        return allow("care", f"care relationship of {caller.org}")
    if caller.is_node_org(local_org):
        return allow("operator", "this node's organisation")
    return deny("only this node's organisation may read consents here", disclose=False)


def decide_audit_read(caller: Caller, patient: str, local_org: str) -> Decision:
    """A patient's access log: the patient, and the organisation running this node."""
    if caller.kind == "patient" and caller.id == patient:
        refused = scope_denial(caller.scopes, "AuditEvent", "r")
        return deny(refused, basis="scope") if refused else allow("patient-self", "own log")
    if caller.is_node_org(local_org):
        return allow("operator", "this node's organisation")
    return deny("only the patient (or a node's organisation) may read the patient's "
                "access log")


def decide_export(caller: Caller, patient: str) -> Decision:
    """Sealed export (every version with its sealed blob): the patient only — only their
    own key opens it."""
    return decide_patient_self(caller, patient, "export their sealed records")


def decide_share_create(caller: Caller, patient: str, signer: str) -> Decision:
    """A share link is created by its patient and signed with their key."""
    if caller.kind != "patient" or caller.id != patient or signer != patient \
            or not caller.active:
        return deny("a share link is published by its patient, signed with their key")
    return allow("patient-self", "own share link")


def decide_share_list(caller: Caller) -> Decision:
    """Listing share links: a patient lists their own."""
    if caller.kind != "patient" or not caller.active:
        return deny("only patients have share links")
    return allow("patient-self", "own share links")


def decide_share_manage(caller: Caller, grant: dict[str, Any]) -> Decision:
    """Revoking a share link: its patient."""
    return decide_patient_self(caller, str(grant["patient"]), "manage their share links")


def decide_share_open(grant: dict[str, Any], now_s: int) -> Decision:
    """May a SMART Health Link be followed now, as far as the ledger says? Not once revoked
    (by its patient, or because a shared record was erased), expired, or locked after
    too many wrong passcodes. The issuing node then checks the passcode itself (it alone
    holds the verifier); the basis names why a link is closed."""
    if grant["revoked"]:
        return deny("shared records were erased" if grant.get("revoked_reason") == "erased"
                    else "share link was revoked", basis="revoked")
    if grant["exp"] is not None and grant["exp"] <= now_s:
        return deny("share link expired", basis="expired")
    if grant["passcode"] and grant["attempts_left"] is not None and grant["attempts_left"] <= 0:
        return deny("share link locked after too many wrong passcodes", basis="locked")
    return allow(f"share:{str(grant['id'])[:8]}",
                 "passcode to check" if grant["passcode"] else "open link")


def decide_match(caller: Caller) -> Decision:
    """``Patient/$match``: practitioners with a token that may search patients; each
    candidate is then shown only if they may read that patient (``decide_record``)."""
    if caller.kind != "practitioner" or not caller.active:
        return deny("only practitioners may search the patient index")
    refused = scope_denial(caller.scopes, "Patient", "s")
    return deny(refused, basis="scope") if refused else allow("staff", "may match")


def decide_node_admin(caller: Caller, local_org: str, what: str) -> Decision:
    """Running the node — registering or removing practitioners, rotating the
    organisation's keys, re-wrapping record keys — is for its organisation alone."""
    if caller.is_node_org(local_org):
        return allow("operator", what)
    return deny(f"only this node's organisation ({local_org}) may {what}")
