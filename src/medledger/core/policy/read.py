"""Reads: who may read a record, its history, search results, ``$everything`` and
``$summary`` — and what a caller who may not is told about it.

Order of a practitioner read decision (``decide_read``):
1. an active *deny* consent that matches actor and record -> deny;
2. the role must cover the record's category;
3. every sensitivity label on the record must be covered by the role or by a
   *permit* consent naming that label (or category) for this actor or org;
4. the actor's org needs a care relationship with the patient, or a matching permit;
break-the-glass (physician or psychiatrist, reason required) overrides 1-4, flagged.

``decide_record`` wraps it for a token: the token's SMART scopes must allow the
interaction on the record's resource type (checked for every record a search,
``$everything`` or ``$summary`` would return), and a denial is *disclosed* (record id,
category, reason) only to a caller who may see the patient at all
(``may_see_patient``: the patient, or whoever may read their demographics);
everyone else is told a count.

Directory records (``patient`` None: Organization, Practitioner, Location, ...,
ADR 5) are readable by every active member's staff and by patients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from medledger.core import state as st
from medledger.core.policy.consent import label_permitted, matching_consents
from medledger.core.policy.roles import (
    BREAK_GLASS_MIN_REASON,
    LABEL_NAMES,
    ROLES,
    SENSITIVE_LABELS,
    Caller,
    Decision,
    Role,
    allow,
    deny,
    role_covers,
)
from medledger.core.policy.scopes import scope_denial

ORG_READS = ("organisation credentials manage the node; clinical reads need a practitioner "
             "or the patient")
NOT_VISIBLE = "access denied: you have no access to this patient's records"
WITHHELD_GENERIC = ("withheld: not visible to this caller (patient consent, role or token "
                    "scopes)")


def decide_read(state: st.StateReader, actor: dict[str, Any], patient: str | None,
                category: str, labels: Iterable[str], now_s: int,
                break_glass_reason: str | None = None) -> Decision:
    """May ``actor`` (an ``actor/`` state entry) read a record of ``patient``?"""
    labels = frozenset(labels)
    if not st.is_active(actor):
        return Decision(False, "denied", f"{actor['id']} is deactivated")
    if patient is None:  # a directory record: shared by every member's staff
        if actor["kind"] in ("practitioner", "patient", "org"):
            return Decision(True, "directory", "directory record")
        return Decision(False, "denied", f"{actor['id']} may not read the directory")
    if actor["kind"] == "patient":
        if actor["id"] == patient:
            return Decision(True, "patient-self", "the patient's own record")
        return Decision(False, "denied", "patients may read only their own records")
    role = ROLES.get(actor.get("role", ""))
    if actor["kind"] != "practitioner" or role is None:
        return Decision(False, "denied", f"{actor['id']} has no clinical role")
    denial = deny_reason(state, actor, role, patient, category, labels, now_s)
    if denial is None:
        return _grant_basis(state, actor, patient, category, labels, now_s)
    if break_glass_reason is not None:
        reason = break_glass_reason.strip()
        if not role.break_glass:
            return Decision(False, "denied", f"role {role.name} may not break the glass; "
                            + denial)
        if len(reason) < BREAK_GLASS_MIN_REASON:
            return Decision(False, "denied", "break-the-glass needs a reason of at least "
                            f"{BREAK_GLASS_MIN_REASON} characters")
        return Decision(True, "break-glass", f"emergency access: {reason} (overrode: {denial})",
                        break_glass=True)
    return Decision(False, "denied", denial)


def deny_reason(state: st.StateReader, actor: dict[str, Any], role: Role, patient: str,
                category: str, labels: frozenset[str], now_s: int) -> str | None:
    """Why ``actor`` may not read such a record of ``patient`` (None if it may)."""
    rules = st.consents(state, patient)
    denies = matching_consents(rules, actor, category, labels, now_s, "deny")
    if denies:
        return f"patient consent {denies[0]['id']} restricts {category} data for this actor"
    if not role_covers(role, category):
        return f"role {role.name} may not read {category} data"
    for label in sorted(labels & SENSITIVE_LABELS):
        if label not in role.labels and label_permitted(rules, actor, category, label,
                                                        now_s) is None:
            return (f"record is labelled {label} ({LABEL_NAMES.get(label, label)}); role "
                    f"{role.name} needs the patient's consent")
    if not st.has_care(state, patient, actor["org"]) and not matching_consents(
            rules, actor, category, labels, now_s, "permit"):
        return (f"organisation {actor['org']} has no care relationship with this patient "
                "and no consent from them")
    return None


def _grant_basis(state: st.StateReader, actor: dict[str, Any], patient: str, category: str,
                 labels: frozenset[str], now_s: int) -> Decision:
    if st.has_care(state, patient, actor["org"]):
        return Decision(True, "care", f"care relationship of {actor['org']}")
    permits = matching_consents(st.consents(state, patient), actor, category, labels, now_s,
                                "permit")
    return Decision(True, f"consent:{permits[0]['id']}", "patient consent")




def may_see_patient(state: st.StateReader, actor: dict[str, Any], patient: str | None,
                    now_s: int) -> bool:
    """May ``actor`` know about ``patient`` at all (their id, what records they have)? The
    patient; an organisation caring for them; staff who may read their demographics."""
    if patient is None:
        return True
    if actor["kind"] == "patient":
        return bool(actor["id"] == patient and st.is_active(actor))
    if actor["kind"] == "org":
        return st.has_care(state, patient, actor["id"])
    return decide_read(state, actor, patient, "demographics", (), now_s).allowed


def decide_interaction(caller: Caller, rtype: str, interaction: str) -> Decision:
    """May the token ``interaction`` (``r``, ``s``, ...) on ``rtype`` at all? Asked before a
    record is looked up, so an out-of-scope request learns nothing about what exists."""
    refused = scope_denial(caller.scopes, rtype, interaction)
    return deny(refused, basis="scope") if refused else allow("scope", "in scope")


def decide_record(state: st.StateReader, caller: Caller, meta: dict[str, Any], now_s: int,
                  break_glass: str | None = None, interaction: str = "r") -> Decision:
    """May ``caller`` read the record version ``meta`` (a ``rec/``/``ver/`` entry) now —
    its token's scopes, then ``decide_read``? Denials say whether they may be disclosed."""
    patient = meta["patient"]
    actor = caller.actor
    if caller.kind == "org" and patient is not None:
        return deny(ORG_READS, disclose=may_see_patient(state, actor, patient, now_s))
    refused = scope_denial(caller.scopes, str(meta["type"]), interaction)
    if refused is not None:
        return deny(refused, disclose=False, basis="scope")
    decision = decide_read(state, actor, patient, meta["category"], meta["labels"], now_s,
                           break_glass)
    if decision.allowed or may_see_patient(state, actor, patient, now_s):
        return decision
    return Decision(False, decision.basis, decision.reason, disclose=False)


def withheld_view(meta: dict[str, Any], decision: Decision) -> tuple[str, str, str] | None:
    """What a searcher is told about a record ``decision`` withholds: its reference,
    category and the reason when the denial may be disclosed; None (count it, say
    nothing identifying) otherwise."""
    if not decision.disclose:
        return None
    return (f"{meta['type']}/{meta['id']}/_history/{meta['v']}", str(meta["category"]),
            decision.reason)


@dataclass(frozen=True)
class HistoryView:
    """A record's history as ``caller`` may see it: the decision on the head version,
    the versions shown (newest first), and how many are withheld or erased."""

    decision: Decision
    shown: tuple[dict[str, Any], ...] = ()
    hidden: int = 0
    erased: int = 0


def decide_history(state: st.StateReader, caller: Caller, versions: Sequence[dict[str, Any]],
                   now_s: int, break_glass: str | None = None) -> HistoryView:
    """Each version is judged on its own: a record whose category or labels changed must
    not reveal an older, more sensitive version through its history."""
    head = versions[-1]
    decision = decide_record(state, caller, head, now_s, break_glass)
    if not decision.allowed:
        return HistoryView(decision)
    shown, hidden, erased = [], 0, 0
    for m in reversed(versions):
        if st.erased(m):
            erased += 1
        elif m is head or decide_record(state, caller, m, now_s, break_glass).allowed:
            shown.append(m)
        else:
            hidden += 1
    return HistoryView(decision, tuple(shown), hidden, erased)


def decide_search(caller: Caller, rtype: str, patient: str | None) -> Decision:
    """May ``caller`` search ``rtype`` (``*``: every type of one patient), restricted to
    ``patient`` if given? Each matching record is then judged by ``decide_record``."""
    if caller.kind == "org":
        return deny(ORG_READS)
    if rtype != "*":
        refused = scope_denial(caller.scopes, rtype, "s")
        if refused is not None:
            return deny(refused, basis="scope")
    if caller.kind == "patient" and patient is not None and patient != caller.id:
        return deny("patients may search only their own records")
    return allow("search", "search permitted; each record is judged on its own")


def decide_everything(caller: Caller, patient: str) -> Decision:
    """``Patient/$everything`` and ``$summary``: the patient's own, or staff (each record
    judged by ``decide_record``, scopes per resource type)."""
    if caller.kind == "org":
        return deny(ORG_READS)
    if caller.kind == "patient" and patient != caller.id:
        return deny("patients may search only their own records")
    return allow("search", "each record is judged on its own")
