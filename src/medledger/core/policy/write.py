"""Writes: who may put a record version, overwrite one, register a patient.

``decide_write``: the role must write the category; a patient's *deny* consent naming
the writer (actor or organisation) refuses the write; the writer's organisation needs
a care relationship or a permit; overwriting a record needs the right to read the
version being replaced, or a flagged break-the-glass. The state machine enforces it
when a tx is applied; the node asks first, before it looks at (decrypts) anything
the id holds, so a refused writer learns nothing about the current content.

``decide_writer``: whom a node co-signs writes for (its organisation and that
organisation's staff); ``decide_registration``: who registers patients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from medledger.core import state as st
from medledger.core.policy.consent import matching_consents
from medledger.core.policy.read import decide_read
from medledger.core.policy.roles import (
    DIRECTORY,
    ROLES,
    SYSTEM,
    Caller,
    Decision,
    Role,
    allow,
    deny,
    may_write,
)
from medledger.core.policy.scopes import scope_denial


def writer_role(signer: dict[str, Any], author: dict[str, Any] | None) -> Role | None:
    """The role a record write is judged by: the author's, or SYSTEM for an org itself."""
    if author is None:
        return SYSTEM if signer["kind"] == "org" else None
    if author["kind"] != "practitioner":
        return None
    return ROLES.get(author.get("role", ""))


def org_writer(org_id: str) -> dict[str, Any]:
    """The pseudo-actor of an organisation writing for itself (bulk import)."""
    return {"id": org_id, "kind": "org", "org": org_id}


def decide_write(state: st.StateReader, writer: dict[str, Any], role: Role,
                 patient: str | None, category: str, labels: Iterable[str], now_s: int,
                 head: dict[str, Any] | None = None, break_glass: bool = False) -> Decision:
    """May ``writer`` (an actor entry, or ``org_writer``) judged as ``role`` put this
    version? ``head`` is the version it would replace. Denials name the rule."""
    labels = frozenset(labels)
    who = f"{writer['id']} ({role.name})"
    if not st.is_active(writer):
        return Decision(False, "denied", f"{writer['id']} is deactivated")
    if not may_write(role, category):
        return Decision(False, "denied", f"{who} may not write {category} data")
    if patient is None:
        return Decision(True, DIRECTORY, "directory record")
    rules = st.consents(state, patient)
    judged = [(category, labels)]
    if head is not None:  # what is replaced counts too: a denied PSY record stays denied
        judged.append((head["category"], frozenset(head["labels"])))
    for cat, labs in judged:
        denies = matching_consents(rules, writer, cat, labs, now_s, "deny")
        if denies:
            return Decision(False, "denied", f"patient consent {denies[0]['id']} denies "
                            f"{writer['id']} access to this patient's {cat} data, writes "
                            "included")
    has_care = st.has_care(state, patient, writer["org"])
    if not has_care and not matching_consents(rules, writer, category, labels, now_s,
                                              "permit"):
        return Decision(False, "denied", f"organisation {writer['org']} has no care "
                        f"relationship with patient {patient} and no consent from them")
    if head is not None:
        overwrite = _decide_overwrite(state, writer, role, head, now_s, break_glass)
        if overwrite is not None:
            return overwrite
    return Decision(True, "care" if has_care else "consent", "write permitted")


def _decide_overwrite(state: st.StateReader, writer: dict[str, Any], role: Role,
                      head: dict[str, Any], now_s: int, break_glass: bool) -> Decision | None:
    """A denial if ``writer`` may not replace ``head``; None if it may; a flagged
    break-glass decision if it may only by breaking the glass."""
    ref = f"{head['type']}/{head['id']}"
    if not may_write(role, head["category"]):
        return Decision(False, "denied", f"{writer['id']} ({role.name}) may not overwrite "
                        f"{ref}, a {head['category']} record")
    if writer["kind"] == "org":  # the organisation itself: care/consent already judged
        return None
    seen = decide_read(state, writer, head["patient"], head["category"], head["labels"],
                       now_s)
    if seen.allowed:
        return None
    if break_glass and role.break_glass:
        return Decision(True, "break-glass", f"overwrite of {ref} by break-the-glass "
                        f"(overrode: {seen.reason})", break_glass=True)
    return Decision(False, "denied", f"{writer['id']} ({role.name}) may not overwrite {ref}: "
                    f"they may not read the version it replaces ({seen.reason})"
                    + ("" if not role.break_glass else "; break the glass to override"))


@dataclass(frozen=True)
class Writer:
    """The ledger entry and role a write is judged by (or why there is none)."""

    decision: Decision
    entry: dict[str, Any] | None = None
    role: Role | None = None


def decide_writer(caller: Caller, local_org: str) -> Writer:
    """A node co-signs the writes of its own organisation (acting as SYSTEM: imports,
    registrations) and of that organisation's practitioners; nobody else's."""
    if caller.is_node_org(local_org):
        return Writer(allow("system", "the node's organisation"), org_writer(local_org), SYSTEM)
    if caller.kind == "practitioner" and caller.org == local_org and caller.active:
        role = ROLES.get(str(caller.entry.get("role")))
        if role is not None:
            return Writer(allow("staff", f"{caller.id} ({role.name})"), caller.actor, role)
    if caller.kind == "patient":
        return Writer(deny("patients contribute data through their provider in this version"))
    return Writer(deny(f"{caller.id} writes through the node of its own organisation "
                       f"({caller.org}); this node co-signs only {local_org}'s writes"))


def decide_write_scope(caller: Caller, rtype: str, new: bool) -> Decision:
    """The token must allow creating (``c``) or updating (``u``) resources of ``rtype``."""
    refused = scope_denial(caller.scopes, rtype, "c" if new else "u")
    return deny(refused, basis="scope") if refused else allow("scope", "in scope")


def decide_registration(caller: Caller, local_org: str) -> Decision:
    """Registering a patient: this node's organisation, or its staff who may write
    demographics, with a token allowed to create Patient resources."""
    writer = decide_writer(caller, local_org)
    if not writer.decision.allowed or writer.role is None:
        return writer.decision
    if not may_write(writer.role, "demographics"):
        return deny(f"{caller.id} ({writer.role.name}) may not register patients")
    return decide_write_scope(caller, "Patient", True)
