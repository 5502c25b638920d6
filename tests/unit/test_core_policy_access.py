"""core.policy beyond ``decide_read``: scopes per resource type, what a denial discloses,
history, search, ``$everything``, writers and registration, consent/audit/export/share/
``$match`` access, and the members-only ledger — as decision tables over plain state."""

from __future__ import annotations

from typing import Any

import pytest

from medledger.core import policy
from medledger.core import state as st
from medledger.crypto.canonical import canonical

NOW = 1_700_000_000
FULL = {"practitioner": frozenset({"user/*.cruds"}), "patient": frozenset(
    {"patient/*.rs", "patient/Consent.cruds"}), "org": frozenset({"system/*.cruds"})}

ENTRIES: dict[str, dict[str, Any]] = {
    "phys": {"id": "dr-phys", "kind": "practitioner", "org": "org-a", "role": "physician",
             "status": "active"},
    "nurse": {"id": "nurse-n", "kind": "practitioner", "org": "org-a", "role": "nurse",
              "status": "active"},
    "clerk": {"id": "clerk", "kind": "practitioner", "org": "org-a", "role": "admin-clerk",
              "status": "active"},
    "gone": {"id": "dr-gone", "kind": "practitioner", "org": "org-a", "role": "physician",
             "status": "inactive"},
    "phys_b": {"id": "dr-b", "kind": "practitioner", "org": "org-b", "role": "physician",
               "status": "active"},
    "pat1": {"id": "pat-1", "kind": "patient", "org": "org-a", "status": "active"},
    "pat2": {"id": "pat-2", "kind": "patient", "org": "org-a", "status": "active"},
    "org_a": {"id": "org-a", "kind": "org", "status": "active"},
    "org_b": {"id": "org-b", "kind": "org", "status": "active"},
    "org_new": {"id": "org-new", "kind": "org", "status": "proposed"},
}


def caller(name: str, scopes: str | None = None) -> policy.Caller:
    entry = ENTRIES[name]
    return policy.Caller(entry, frozenset(scopes.split()) if scopes else FULL[entry["kind"]])


def meta(rtype: str, category: str, labels: list[str] | None = None,
         patient: str | None = "pat-1", v: int = 1) -> dict[str, Any]:
    return {"type": rtype, "id": f"{rtype.lower()}-{category}-{v}", "v": v, "patient": patient,
            "category": category, "labels": labels or []}


VITAL = meta("Observation", "vital-signs")
PHQ = meta("Observation", "mental-health", ["PSY"])
COND = meta("Condition", "conditions")
PAT = meta("Patient", "demographics")


def state(*consents: dict[str, Any]) -> st.MemoryState:
    data = {"care/pat-1/org-a": b"1", "care/pat-2/org-a": b"1"}
    for c in consents:
        data[f"consent/{c['patient']}/{c['id']}"] = canonical(
            {"status": "active", "actors": [], "orgs": [], "categories": [], "labels": [],
             "start": None, "end": None, **c})
    return st.MemoryState(data)


DENY_NURSE = {"id": "d1", "patient": "pat-1", "decision": "deny", "actors": ["nurse-n"]}
PERMIT_B = {"id": "p1", "patient": "pat-1", "decision": "permit", "orgs": ["org-b"]}

# (name, caller, scopes, record, consents, allowed, disclosed)
RECORD_TABLE = [
    ("physician, vital signs", "phys", None, VITAL, [], True, True),
    ("physician, PSY: denied, named", "phys", None, PHQ, [], False, True),
    ("nurse denied by consent: not named", "nurse", None, VITAL, [DENY_NURSE], False, False),
    ("other org: not named", "phys_b", None, PHQ, [], False, False),
    ("other org with a permit", "phys_b", None, VITAL, [PERMIT_B], True, True),
    ("other org with a permit, PSY still needs the label: named", "phys_b", None, PHQ,
     [PERMIT_B], False, True),
    ("Observation scope, an Observation", "phys", "user/Observation.rs", VITAL, [], True, True),
    ("Observation scope, a Condition: never named", "phys", "user/Observation.rs", COND, [],
     False, False),
    ("Observation scope, the Patient", "phys", "user/Observation.rs", PAT, [], False, False),
    ("patient, own record", "pat1", None, PHQ, [], True, True),
    ("patient with only a Consent scope", "pat1", "patient/Consent.rs", VITAL, [], False,
     False),
    ("another patient: not named", "pat2", None, VITAL, [], False, False),
    ("organisation token: no clinical reads", "org_a", None, VITAL, [], False, True),
    ("another organisation's token", "org_b", None, VITAL, [], False, False),
    ("deactivated practitioner", "gone", None, VITAL, [], False, False),
]


@pytest.mark.parametrize(("who", "scopes", "record", "consents", "allowed", "disclosed"),
                         [r[1:] for r in RECORD_TABLE], ids=[r[0] for r in RECORD_TABLE])
def test_decide_record(who: str, scopes: str | None, record: dict[str, Any],
                       consents: list[dict[str, Any]], allowed: bool, disclosed: bool) -> None:
    d = policy.decide_record(state(*consents), caller(who, scopes), record, NOW)
    assert (d.allowed, d.disclose) == (allowed, disclosed), d.reason
    view = policy.withheld_view(record, d)
    if not d.allowed:
        assert (view is not None) == disclosed
        if view is not None:
            assert view[0] == f"{record['type']}/{record['id']}/_history/1" and view[2]


def test_scope_denial_names_the_scope() -> None:
    d = policy.decide_record(state(), caller("phys", "user/Observation.rs"), COND, NOW)
    assert d.basis == "scope" and "Condition" in d.reason
    assert policy.decide_interaction(caller("phys", "user/Observation.rs"), "Condition",
                                     "r").basis == "scope"
    assert policy.decide_interaction(caller("phys"), "Condition", "r").allowed


@pytest.mark.parametrize(("who", "patient", "sees"), [
    ("phys", "pat-1", True), ("clerk", "pat-1", True), ("nurse", "pat-1", True),
    ("phys_b", "pat-1", False), ("pat1", "pat-1", True), ("pat2", "pat-1", False),
    ("org_a", "pat-1", True), ("org_b", "pat-1", False), ("gone", "pat-1", False),
    ("phys_b", None, True)])
def test_may_see_patient(who: str, patient: str | None, sees: bool) -> None:
    assert policy.may_see_patient(state(), caller(who).actor, patient, NOW) is sees


def test_may_see_patient_follows_consent() -> None:
    assert not policy.may_see_patient(state(DENY_NURSE), caller("nurse").actor, "pat-1", NOW)
    assert policy.may_see_patient(state(PERMIT_B), caller("phys_b").actor, "pat-1", NOW)


def test_history_judges_each_version() -> None:
    versions = [meta("Condition", "mental-health", ["PSY"], v=1),
                meta("Condition", "conditions", v=2),
                {**meta("Condition", "conditions", v=3), "erased": {"at": 1}},
                meta("Condition", "conditions", v=4)]
    view = policy.decide_history(state(), caller("phys"), versions, NOW)
    assert view.decision.allowed and [m["v"] for m in view.shown] == [4, 2]
    assert (view.hidden, view.erased) == (1, 1)
    refused = policy.decide_history(state(), caller("phys_b"), versions, NOW)
    assert not refused.decision.allowed and not refused.shown


@pytest.mark.parametrize(("who", "scopes", "rtype", "patient", "allowed"), [
    ("phys", None, "Observation", None, True),
    ("phys", "user/Observation.rs", "Condition", "pat-1", False),
    ("phys", "user/Observation.r", "Observation", "pat-1", False),  # read, not search
    ("pat1", None, "Observation", "pat-1", True),
    ("pat1", None, "Observation", "pat-2", False),
    ("pat1", "patient/Consent.rs", "*", "pat-1", True),  # each record judged on its own
    ("org_a", None, "Observation", "pat-1", False),
])
def test_decide_search(who: str, scopes: str | None, rtype: str, patient: str | None,
                       allowed: bool) -> None:
    assert policy.decide_search(caller(who, scopes), rtype, patient).allowed is allowed


@pytest.mark.parametrize(("who", "patient", "allowed"), [
    ("phys", "pat-1", True), ("phys_b", "pat-1", True), ("pat1", "pat-1", True),
    ("pat2", "pat-1", False), ("org_a", "pat-1", False)])
def test_decide_everything(who: str, patient: str, allowed: bool) -> None:
    assert policy.decide_everything(caller(who), patient).allowed is allowed


@pytest.mark.parametrize(("who", "allowed", "role"), [
    ("org_a", True, "system"), ("phys", True, "physician"), ("nurse", True, "nurse"),
    ("phys_b", False, None), ("pat1", False, None), ("gone", False, None),
    ("org_b", False, None)])
def test_decide_writer(who: str, allowed: bool, role: str | None) -> None:
    w = policy.decide_writer(caller(who), "org-a")
    assert w.decision.allowed is allowed and (w.role.name if w.role else None) == role


@pytest.mark.parametrize(("who", "scopes", "allowed"), [
    ("org_a", None, True), ("clerk", None, True), ("phys", None, True), ("nurse", None, False),
    ("phys", "user/Observation.cruds", False), ("phys_b", None, False), ("pat1", None, False)])
def test_decide_registration(who: str, scopes: str | None, allowed: bool) -> None:
    assert policy.decide_registration(caller(who, scopes), "org-a").allowed is allowed


def test_admin_decisions() -> None:
    s = state()
    assert policy.decide_consent_change(caller("pat1"), "pat-1").allowed
    assert not policy.decide_consent_change(caller("pat1", "patient/*.rs"), "pat-1").allowed
    assert not policy.decide_consent_change(caller("phys"), "pat-1").allowed
    assert policy.decide_consent_read(s, caller("phys"), "pat-1", "org-a").allowed
    assert not policy.decide_consent_read(s, caller("phys_b"), "pat-1", "org-a").allowed
    assert policy.decide_consent_read(s, caller("org_a"), "pat-1", "org-a").allowed
    assert not policy.decide_consent_read(s, caller("org_b"), "pat-1", "org-a").allowed
    assert not policy.decide_consent_read(s, caller("pat2"), "pat-1", "org-a").allowed
    assert policy.decide_audit_read(caller("pat1"), "pat-1", "org-a").allowed
    assert not policy.decide_audit_read(caller("pat1", "patient/Consent.rs"), "pat-1",
                                        "org-a").allowed
    assert not policy.decide_audit_read(caller("phys"), "pat-1", "org-a").allowed
    assert policy.decide_audit_read(caller("org_a"), "pat-1", "org-a").allowed
    assert not policy.decide_audit_read(caller("org_b"), "pat-1", "org-a").allowed
    assert policy.decide_export(caller("pat1"), "pat-1").allowed
    assert not policy.decide_export(caller("phys"), "pat-1").allowed
    assert policy.decide_share_create(caller("pat1"), "pat-1", "pat-1").allowed
    assert not policy.decide_share_create(caller("pat1"), "pat-1", "pat-2").allowed
    assert not policy.decide_share_create(caller("phys"), "pat-1", "pat-1").allowed
    assert policy.decide_share_manage(caller("pat1"), {"patient": "pat-1"}).allowed
    assert not policy.decide_share_manage(caller("pat2"), {"patient": "pat-1"}).allowed
    assert policy.decide_match(caller("phys")).allowed
    assert not policy.decide_match(caller("phys", "user/Observation.rs")).allowed
    assert not policy.decide_match(caller("pat1")).allowed
    assert policy.decide_node_admin(caller("org_a"), "org-a", "x").allowed
    assert not policy.decide_node_admin(caller("org_b"), "org-a", "x").allowed
    assert not policy.decide_node_admin(caller("phys"), "org-a", "x").allowed


# ---------------------------------------------------------------- the ledger

LEDGER_STATE = st.MemoryState({
    "share/s1": canonical({"id": "s1", "patient": "pat-1"}),
    "actor/pat-1": canonical(ENTRIES["pat1"]), "actor/dr-phys": canonical(ENTRIES["phys"]),
    "rec/Observation/o1": canonical({**VITAL, "id": "o1"}),
    "rec/Organization/x": canonical(meta("Organization", "directory", patient=None)),
})


def put(patient: str | None) -> dict[str, Any]:
    return {"kind": "record.put", "body": {"patient": patient}}


@pytest.mark.parametrize(("kind", "body", "subjects"), [
    ("record.put", {"patient": "pat-1"}, {"pat-1"}),
    ("record.put", {"patient": None}, {policy.ledger.OTHER}),
    ("batch", {"ops": [put("pat-1"), put("pat-1")]}, {"pat-1"}),
    ("batch", {"ops": [put("pat-1"), put("pat-2")]}, {"pat-1", "pat-2"}),
    ("batch", {"ops": [{"kind": "actor.register", "body": {"id": "pat-1", "kind": "patient"}},
                       put("pat-1")]}, {"pat-1"}),
    ("actor.register", {"id": "dr-x", "kind": "practitioner"}, {policy.ledger.OTHER}),
    ("consent.put", {"patient": "pat-1"}, {"pat-1"}),
    ("share.revoke", {"id": "s1"}, {"pat-1"}),
    ("share.attempt", {"id": "nope"}, {policy.ledger.OTHER}),
    ("key.rotate", {"id": "pat-1"}, {"pat-1"}),
    ("key.rotate", {"id": "dr-phys"}, {policy.ledger.OTHER}),
    ("record.rewrap", {"items": [{"type": "Observation", "id": "o1"}]}, {"pat-1"}),
    ("audit.anchor", {"events": [{"patient": "pat-1"}, {"patient": None}]},
     {"pat-1", policy.ledger.OTHER}),
    ("import.commit", {"id": "i"}, {policy.ledger.OTHER}),
    ("org.propose", {}, {policy.ledger.OTHER}),
])
def test_tx_subjects(kind: str, body: dict[str, Any], subjects: set[str]) -> None:
    assert policy.tx_subjects(LEDGER_STATE, kind, "x", body) == subjects


@pytest.mark.parametrize(("who", "kind", "body", "allowed"), [
    ("org_a", "batch", {"ops": [put("pat-1"), put("pat-2")]}, True),
    ("org_b", "audit.anchor", {"events": [{"patient": "pat-2"}]}, True),
    ("pat1", "batch", {"ops": [put("pat-1")]}, True),
    ("pat1", "batch", {"ops": [put("pat-1"), put("pat-2")]}, False),
    ("pat1", "audit.anchor", {"events": [{"patient": "pat-1"}]}, True),
    ("pat2", "record.put", {"patient": "pat-1"}, False),
    ("phys", "record.put", {"patient": "pat-1"}, False),
    ("org_new", "record.put", {"patient": "pat-1"}, False),  # not (yet) a member
])
def test_decide_tx_proof(who: str, kind: str, body: dict[str, Any], allowed: bool) -> None:
    assert policy.decide_tx_proof(LEDGER_STATE, caller(who), kind, "x", body).allowed is allowed


def test_blocks_audit_proofs_submission_blobs_orgs() -> None:
    assert policy.decide_block(caller("org_b")).basis == "member"
    assert policy.decide_block(caller("phys")).basis == "header"
    assert not policy.decide_block(caller("gone")).allowed
    assert policy.decide_audit_proof(caller("pat1"), {"patient": "pat-1"}).allowed
    assert not policy.decide_audit_proof(caller("pat1"), {"patient": "pat-2"}).allowed
    assert not policy.decide_audit_proof(caller("phys"), {"patient": "pat-1"}).allowed
    assert policy.decide_audit_proof(caller("org_b"), {"patient": "pat-2"}).allowed
    assert policy.decide_tx_submission(caller("pat1"), "pat-1", "consent.put").allowed
    assert policy.decide_tx_submission(caller("org_b"), "pat-1", "consent.put").allowed
    assert not policy.decide_tx_submission(caller("phys"), "pat-1", "consent.put").allowed
    assert not policy.decide_tx_submission(caller("pat1"), "pat-1", "share.create").allowed
    assert not policy.decide_tx_submission(caller("gone"), "dr-gone", "key.rotate").allowed
    assert policy.decide_blob_serving(caller("org_b"), "org-a").allowed
    assert not policy.decide_blob_serving(caller("org_a"), "org-a").allowed
    assert not policy.decide_blob_serving(caller("org_new"), "org-a").allowed
    assert not policy.decide_blob_serving(caller("phys"), "org-a").allowed
    entry = {"id": "org-a", "name": "A", "status": "active", "approvals": [],
             "sign_pub": "s", "enc_pub": "e", "api_url": "http://a", "validator_pub": "v"}
    assert policy.org_view(entry, True) == entry
    public = policy.org_view(entry, False)
    assert "api_url" not in public and "validator_pub" not in public and public["validator"]


@pytest.mark.parametrize(("requested", "kind", "granted"), [
    (None, "patient", {"patient/*.rs", "patient/Consent.cruds"}),
    ("patient/Observation.r", "patient", {"patient/Observation.r"}),
    ("user/*.cruds patient/*.r", "patient", {"patient/*.r"}),
    ("user/Observation.rs", "practitioner", {"user/Observation.rs"}),
])
def test_parse_scopes(requested: str | None, kind: str, granted: set[str]) -> None:
    assert policy.parse_scopes(requested, kind) == granted


def test_parse_scopes_refuses_what_the_kind_may_not_hold() -> None:
    from medledger.errors import Forbidden
    with pytest.raises(Forbidden):
        policy.parse_scopes("system/*.cruds", "patient")


@pytest.mark.parametrize(("grant", "allowed", "basis"), [
    ({"revoked": False, "exp": NOW + 1, "passcode": True, "attempts_left": 1}, True,
     "share:s1"),
    ({"revoked": False, "exp": None, "passcode": False, "attempts_left": None}, True,
     "share:s1"),
    ({"revoked": True, "exp": NOW + 1, "passcode": False, "attempts_left": None}, False,
     "revoked"),
    ({"revoked": True, "revoked_reason": "erased", "exp": None, "passcode": False,
      "attempts_left": None}, False, "revoked"),
    ({"revoked": False, "exp": NOW, "passcode": False, "attempts_left": None}, False,
     "expired"),
    ({"revoked": False, "exp": None, "passcode": True, "attempts_left": 0}, False, "locked"),
])
def test_decide_share_open(grant: dict[str, Any], allowed: bool, basis: str) -> None:
    d = policy.decide_share_open({"id": "s1", **grant}, NOW)
    assert (d.allowed, d.basis) == (allowed, basis)
