"""core.machine, the lifecycle txs of ADR 4/5 and issue 8: directory records, erasure
and retention, staged imports, deactivation, key rotation, sealed audit free text, and
the state digest that a tampered state cannot match."""

from __future__ import annotations

from typing import Any

import pytest
from test_core_machine import (
    CONFLICT,
    FORBIDDEN,
    INVALID,
    NOTFOUND,
    OK,
    SHARE,
    SHARE_ID,
    T0,
    UNKNOWN,
    Chain,
    body_hash,
    enc_pub,
    event,
    record_body,
    register,
    shared_world,
    sign_pub,
    world,
)

from medledger.core import machine, policy
from medledger.core import state as st
from medledger.crypto import multiset
from medledger.crypto.canonical import canonical

GONE = 11
YEAR = 365 * 86400


@pytest.fixture
def c() -> Chain:
    return world()


def directory_body(rid: str, version: int = 1, prev: str = "", rtype: str = "Practitioner",
                   **extra: Any) -> dict[str, Any]:
    body = record_body(rid, version, prev, patient=None, category="directory", rtype=rtype)
    return {**body, "readers": ["org-a", "org-b"], **extra}


# ---------------------------------------------------------------- directory records

def test_directory_records_are_versioned_without_a_patient(c: Chain) -> None:
    v1 = directory_body("pr-1")
    r = c.run("org-a", "record.put", v1)
    assert (r.code, r.data) == (OK, "Practitioner/pr-1/_history/1")
    head = st.record_head(c.state, "Practitioner", "pr-1")
    assert head is not None and head["patient"] is None and head["category"] == "directory"
    assert c.get("pat/None/Practitioner/pr-1") is None  # in no patient compartment
    # another member may write the next version (one shared directory)...
    assert c.run("org-b", "record.put", directory_body("pr-1", 2, body_hash(v1))).code == OK
    # ...and staff whose role writes directory data; a nurse does not
    assert c.run("clerk", "record.put", directory_body("loc-1", rtype="Location")).code == OK
    assert c.run("nurse-n", "record.put", directory_body("loc-2", rtype="Location")
                 ).code == FORBIDDEN
    assert c.run("pat-1", "record.put", directory_body("loc-3", rtype="Location")
                 ).code == FORBIDDEN


@pytest.mark.parametrize(
    "change",
    [{"readers": ["org-a", "org-b", "pat-1"]},  # a patient reads no directory key
     {"readers": ["org-b"]},  # the writer must be a reader
     {"category": "demographics"},  # no patient: directory only
     {"labels": ["PSY"]},  # sensitivity is about patients
     {"type": "Patient", "id": "x"}],
)
def test_directory_shape_errors(c: Chain, change: dict[str, Any]) -> None:
    body = {**directory_body("pr-9"), **change}
    assert c.run("org-a", "record.put", body).code == INVALID


def test_a_directory_id_cannot_become_a_patient_record(c: Chain) -> None:
    v1 = directory_body("pr-1", rtype="Observation")
    assert c.run("org-a", "record.put", v1).code == OK
    r = c.run("org-a", "record.put", record_body("pr-1", 2, body_hash(v1)))
    assert r.code == CONFLICT and "the directory" in r.log


def test_directory_read_policy(c: Chain) -> None:
    now = T0 // 10**9
    for actor in ("nurse-n", "dr-b", "pat-2", "clerk"):
        entry = c.get(f"actor/{actor}")
        assert entry is not None
        assert policy.decide_read(c.state, entry, None, "directory", [], now).allowed


# ---------------------------------------------------------------- erasure

def erase(patient: str = "pat-1", **scope: Any) -> dict[str, Any]:
    return {"patient": patient, "basis": "consent-withdrawn", **scope}


def test_erasure_marks_versions_keeps_metadata() -> None:
    c = shared_world()
    v2 = record_body("o1", 2, body_hash(record_body("o1", 1, "")))
    assert c.run("org-a", "record.put", v2).code == OK
    assert c.run("pat-1", "share.create", SHARE).code == OK
    r = c.run("pat-1", "record.erase", erase(records=["Observation/o1"]))
    assert (r.code, r.data) == (OK, "2")
    versions = st.record_versions(c.state, "Observation", "o1")
    assert [v["erased"]["basis"] for v in versions] == ["consent-withdrawn"] * 2
    assert all(v["blob"] and v["commitment"] for v in versions)  # hashes stay on the chain
    head = st.record_head(c.state, "Observation", "o1")
    assert head is not None and st.erased(head)
    grant = st.share(c.state, SHARE_ID)  # a share link holding erased content is revoked
    assert grant is not None and grant["revoked"] and grant["revoked_reason"] == "erased"
    log = [v for _, v in c.state.scan("erasure/pat-1/")]
    assert len(log) == 1 and b"consent-withdrawn" in log[0] and b"o1" in log[0]
    again = c.run("pat-1", "record.erase", erase(records=["Observation/o1"]))
    assert again.code == CONFLICT and "already erased" in again.log
    # a later version may be written again, and a share of the erased version is refused
    assert c.run("org-a", "record.put", record_body("o1", 3, head["hash"])).code == OK
    assert c.run("pat-1", "share.create", {**SHARE, "id": "t" * 20}).code == GONE


def test_erasure_scopes_and_who_may_erase(c: Chain) -> None:
    assert c.run("org-a", "record.put", record_body("o1", 1, "")).code == OK
    assert c.run("org-a", "record.put", record_body("m1", 1, "", category="mental-health",
                                                    labels=["PSY"])).code == OK
    assert c.run("org-b", "record.put", record_body("x1", 1, "", patient="pat-2")).code == OK
    assert c.run("pat-2", "record.erase", erase()).code == FORBIDDEN  # not their records
    assert c.run("dr-phys", "record.erase", erase(all=True)).code == FORBIDDEN
    assert c.run("org-b", "record.erase", erase(all=True)).code == FORBIDDEN  # no care
    r = c.run("org-a", "record.erase", erase(category="mental-health"))  # documented request
    assert (r.code, r.data) == (OK, "1")
    r = c.run("pat-1", "record.erase", erase(all=True))
    assert (r.code, r.data) == (OK, "1")
    assert c.run("pat-1", "record.erase", erase(records=["Observation/x1"])).code == NOTFOUND


@pytest.mark.parametrize(
    "body",
    [erase(), erase(all=True, category="vital-signs"), erase(all=False),
     erase(category="astrology"), erase(records=[]), erase(records="Observation/o1"),
     {**erase(all=True), "basis": "because"}, {**erase(all=True), "basis": None}],
)
def test_erasure_shape_errors(c: Chain, body: dict[str, Any]) -> None:
    assert c.run("org-a", "record.put", record_body("o1", 1, "")).code == OK
    assert c.run("pat-1", "record.erase", body).code == INVALID


def test_retention_rules_refuse_early_erasure_naming_the_rule() -> None:
    c = Chain(retention={"vital-signs": 10 * YEAR})
    assert c.block(c.tx("org-a", "actor.register", register("pat-1", "patient"))
                   ).results[0].code == OK
    assert c.run("org-a", "record.put", record_body("o1", 1, "")).code == OK
    assert c.run("org-a", "record.put", record_body("l1", 1, "", category="laboratory")
                 ).code == OK
    r = c.run("pat-1", "record.erase", erase(all=True))
    assert r.code == FORBIDDEN and "retention rule 'vital-signs: keep 3650 days'" in r.log
    assert "2033-" in r.log  # the date it may be erased from
    assert c.run("pat-1", "record.erase", erase(category="laboratory")).code == OK
    later = c.block(c.tx("pat-1", "record.erase", erase(all=True)),
                    time_ns=T0 + 11 * YEAR * 10**9)
    assert later.results[0].code == OK


def test_genesis_retention_shape() -> None:
    for bad in ({"astrology": 1}, {"vital-signs": -1}, {"vital-signs": "1y"}, ["x"]):
        with pytest.raises(machine.InvalidInput):
            machine.genesis_writes({"orgs": [{"id": "org-a", "name": "A",
                                              "sign_pub": sign_pub("org-a"),
                                              "enc_pub": enc_pub("org-a")}],
                                    "retention": bad})


# ---------------------------------------------------------------- staged imports

def _ops(n: int, prefix: str = "s", patient: str = "pat-1") -> list[dict[str, Any]]:
    return [{"kind": "record.put", "body": record_body(f"{prefix}{i}", 1, "", patient=patient)}
            for i in range(n)]


def test_staged_import_is_invisible_until_committed(c: Chain) -> None:
    iid = "i" * 32
    assert c.run("org-a", "import.begin", {"id": iid, "parts": 2}).code == OK
    reg = [{"kind": "actor.register", "body": register("pat-9", "patient")}]
    assert c.run("org-a", "import.part", {"id": iid, "seq": 1,
                                          "ops": _ops(3, "b", "pat-9")}).data == "1/2"
    assert c.run("org-a", "import.part", {"id": iid, "seq": 0,
                                          "ops": reg + _ops(2, "a", "pat-9")}).data == "2/2"
    assert c.get("actor/pat-9") is None and st.record_head(c.state, "Observation", "a0") is None
    assert list(c.state.scan("stage/")) != []
    r = c.run("org-a", "import.commit", {"id": iid})
    assert (r.code, r.data) == (OK, "6")
    assert c.get("actor/pat-9") is not None
    assert [i for _, i in st.patient_records(c.state, "pat-9")] == ["a0", "a1", "b0", "b1",
                                                                    "b2"]
    assert list(c.state.scan("stage/")) == []  # the stage is gone
    head = st.record_head(c.state, "Observation", "b2")
    assert head is not None and head["op"] == 5  # ops numbered across parts, in part order
    assert c.run("org-a", "import.commit", {"id": iid}).code == CONFLICT


def test_staged_import_is_all_or_nothing_and_abortable(c: Chain) -> None:
    iid = "j" * 32
    assert c.run("org-a", "import.begin", {"id": iid, "parts": 2}).code == OK
    assert c.run("org-a", "import.commit", {"id": iid}).code == CONFLICT  # parts missing
    assert c.run("org-a", "import.part", {"id": iid, "seq": 0, "ops": _ops(2)}).code == OK
    bad = _ops(1, "z") + [{"kind": "record.put", "body": record_body(
        "y1", 1, "", category="mental-health", author="nurse-n")}]
    assert c.run("org-a", "import.part", {"id": iid, "seq": 1, "ops": bad}).code == OK
    r = c.run("org-a", "import.commit", {"id": iid})
    assert r.code == FORBIDDEN and r.log.startswith(f"import {iid} part 1 op 3"), r.log
    assert st.record_head(c.state, "Observation", "s0") is None  # nothing applied
    assert c.run("org-b", "import.abort", {"id": iid}).code == FORBIDDEN  # not its import
    assert c.run("org-a", "import.abort", {"id": iid}).code == OK
    assert list(c.state.scan("stage/")) == []
    imp = c.get(f"imp/{iid}")
    assert imp is not None and imp["status"] == "aborted"


DENY_ORG_A = {"patient": "pat-1", "id": "d1", "decision": "deny", "orgs": ["org-a"]}


def _staged(c: Chain, iid: str, ops: list[dict[str, Any]]) -> None:
    assert c.run("org-a", "import.begin", {"id": iid, "parts": 2}).code == OK
    for seq, part in enumerate((ops[:1], ops[1:])):
        assert c.run("org-a", "import.part", {"id": iid, "seq": seq, "ops": part}).code == OK


def test_a_consent_earlier_in_the_block_governs_the_operations_after_it(c: Chain) -> None:
    """Operations of a batch or import read what they check once per tx, not per block:
    a consent put (or revoked) by an earlier tx of the same block decides the writes of
    a later one, and a later tx sees what the earlier writes changed."""
    _staged(c, "m" * 32, _ops(3, "m"))
    applied = c.block(c.tx("org-a", "batch", {"ops": _ops(2, "a")}),
                      c.tx("pat-1", "consent.put", DENY_ORG_A),
                      c.tx("org-a", "batch", {"ops": _ops(2, "b")}),
                      c.tx("org-a", "import.commit", {"id": "m" * 32}))
    codes = [r.code for r in applied.results]
    assert codes == [OK, OK, FORBIDDEN, FORBIDDEN], applied.results
    assert "consent d1" in applied.results[3].log
    assert st.record_head(c.state, "Observation", "a1") is not None
    assert st.record_head(c.state, "Observation", "b0") is None
    assert st.record_head(c.state, "Observation", "m0") is None
    _staged(c, "n" * 32, _ops(3, "n"))
    applied = c.block(c.tx("pat-1", "consent.revoke", {"patient": "pat-1", "id": "d1"}),
                      c.tx("org-a", "import.commit", {"id": "n" * 32}),
                      c.tx("pat-1", "consent.put", {**DENY_ORG_A, "id": "d2"}))
    assert [r.code for r in applied.results] == [OK, OK, OK], applied.results
    assert [i for _, i in st.patient_records(c.state, "pat-1")] == ["a0", "a1", "n0", "n1",
                                                                    "n2"]


def test_operations_see_the_actors_and_care_that_earlier_operations_register(
        c: Chain) -> None:
    """An actor or a patient registered by an operation is seen by the operations after it
    in the same batch or import (what was read as absent before is read again)."""
    ops = [{"kind": "record.put", "body": record_body("x0", 1, "", author="dr-new")},
           {"kind": "actor.register", "body": register("dr-new", "practitioner", "physician")}]
    r = c.run("org-a", "batch", {"ops": ops})
    assert r.code == FORBIDDEN and r.log.startswith("batch op 0"), r.log
    ops = [{"kind": "actor.register", "body": register("dr-new", "practitioner", "physician")},
           {"kind": "record.put", "body": record_body("x1", 1, "", author="dr-new")},
           {"kind": "actor.register", "body": register("pat-9", "patient")},
           *_ops(2, "y", "pat-9")]
    iid = "p" * 32
    _staged(c, iid, [{"kind": "record.put", "body": record_body("x0", 1, "")}, *ops])
    assert (r := c.run("org-a", "import.commit", {"id": iid})).code == OK, r.log
    head = st.record_head(c.state, "Observation", "x1")
    assert head is not None and head["author"] == "dr-new"
    assert st.has_care(c.state, "pat-9", "org-a")
    assert [i for _, i in st.patient_records(c.state, "pat-9")] == ["y0", "y1"]


def test_operations_see_the_versions_that_earlier_operations_put(c: Chain) -> None:
    """Record heads are read ahead per batch or part, as the state was before the tx; a
    record the tx already wrote is read from its own writes."""
    first = record_body("r1", 1, "")
    second = record_body("r1", 2, body_hash(first))
    third = record_body("r1", 3, body_hash(second))
    put = [{"kind": "record.put", "body": b} for b in (first, second, third)]
    iid = "q" * 32
    _staged(c, iid, put)  # part 0: version 1; part 1: versions 2 and 3
    assert (r := c.run("org-a", "import.commit", {"id": iid})).code == OK, r.log
    head = st.record_head(c.state, "Observation", "r1")
    assert head is not None and head["v"] == 3
    fourth = record_body("r1", 4, body_hash(third))
    again = [{"kind": "record.put", "body": fourth}, {"kind": "record.put", "body": fourth}]
    r = c.run("org-a", "batch", {"ops": again})
    assert r.code == CONFLICT and r.log.startswith("batch op 1"), r.log


def test_import_commit_admission_checks_the_import_not_every_operation(c: Chain) -> None:
    """CheckTx admits a complete import's commit without applying its operations (the
    block does, all or nothing); an incomplete one is refused at admission already."""
    iid = "k" * 32
    assert c.run("org-a", "import.begin", {"id": iid, "parts": 2}).code == OK
    assert c.run("org-a", "import.part", {"id": iid, "seq": 0, "ops": _ops(2)}).code == OK
    early = machine.check_tx(c.state, c.tx("org-a", "import.commit", {"id": iid}), c.chain,
                             c.height, T0)
    assert early.code == CONFLICT  # part 1 missing
    bad = [{"kind": "record.put", "body": record_body(
        "y1", 1, "", category="mental-health", author="nurse-n")}]
    assert c.run("org-a", "import.part", {"id": iid, "seq": 1, "ops": bad}).code == OK
    commit = c.tx("org-a", "import.commit", {"id": iid})
    admitted = machine.check_tx(c.state, commit, c.chain, c.height, T0)
    assert (admitted.code, admitted.data) == (OK, "3")  # admitted: 3 staged operations
    assert st.record_head(c.state, "Observation", "s0") is None  # nothing applied
    r = c.block(commit).results[0]  # the block applies them, and refuses the import whole
    assert r.code == FORBIDDEN and r.log.startswith(f"import {iid} part 1 op 2"), r.log
    assert st.record_head(c.state, "Observation", "s0") is None


@pytest.mark.parametrize(
    ("kind", "body", "code"),
    [("import.begin", {"id": "short", "parts": 1}, INVALID),
     ("import.begin", {"id": "k" * 32, "parts": 0}, INVALID),
     ("import.begin", {"id": "k" * 32, "parts": 10_001}, INVALID),
     ("import.part", {"id": "n" * 32, "seq": 0, "ops": _ops(1)}, NOTFOUND),
     ("import.part", {"id": "k" * 32, "seq": 2, "ops": _ops(1)}, INVALID),
     ("import.part", {"id": "k" * 32, "seq": 0, "ops": []}, INVALID),
     ("import.part", {"id": "k" * 32, "seq": 0,
                      "ops": [{"kind": "consent.put", "body": {}}]}, INVALID)],
)
def test_import_refusals(c: Chain, kind: str, body: dict[str, Any], code: int) -> None:
    assert c.run("org-a", "import.begin", {"id": "k" * 32, "parts": 2}).code == OK
    assert c.run("org-a", kind, body).code == code


def test_import_part_cannot_be_sent_twice(c: Chain) -> None:
    assert c.run("org-a", "import.begin", {"id": "k" * 32, "parts": 2}).code == OK
    part = {"id": "k" * 32, "seq": 0, "ops": _ops(1)}
    assert c.run("org-a", "import.part", part).code == OK
    assert c.run("org-a", "import.part", part).code == CONFLICT
    assert c.run("dr-phys", "import.begin", {"id": "m" * 32, "parts": 1}).code == FORBIDDEN


# ---------------------------------------------------------------- revocation

def test_deactivated_actor_signs_nothing_and_reads_nothing(c: Chain) -> None:
    assert c.run("org-b", "actor.deactivate", {"id": "dr-phys", "reason": "left"}
                 ).code == FORBIDDEN  # not its organisation
    assert c.run("nurse-n", "actor.deactivate", {"id": "dr-phys", "reason": "left"}
                 ).code == FORBIDDEN
    assert c.run("org-a", "actor.deactivate", {"id": "dr-phys", "reason": "fired"}
                 ).code == INVALID
    assert c.run("org-a", "actor.deactivate", {"id": "dr-phys", "reason": "left"}).code == OK
    phys = c.get("actor/dr-phys")
    assert phys is not None and phys["status"] == "inactive"
    r = c.run("dr-phys", "record.put", record_body("o1", 1, ""))
    assert r.code == UNKNOWN and "deactivated" in r.log
    assert not policy.decide_read(c.state, phys, "pat-1", "vital-signs", [],
                                  T0 // 10**9).allowed
    r = c.run("org-a", "record.put", record_body("o1", 1, "", author="dr-phys"))
    assert r.code == FORBIDDEN and "deactivated" in r.log  # nor can its org write as it
    assert c.run("org-a", "actor.deactivate", {"id": "dr-phys", "reason": "left"}
                 ).code == CONFLICT
    # an actor may deactivate itself (a stolen key: stop it now)
    assert c.run("nurse-n", "actor.deactivate", {"id": "nurse-n", "reason": "key-compromised"}
                 ).code == OK
    assert c.run("org-a", "actor.deactivate", {"id": "org-a", "reason": "other"}
                 ).code == FORBIDDEN


def test_key_rotation_keeps_history_and_switches_keys(c: Chain) -> None:
    new = {"id": "pat-1", "sign_pub": sign_pub("pat-1-new"), "enc_pub": enc_pub("pat-1-new")}
    assert c.run("pat-2", "key.rotate", new).code == FORBIDDEN
    assert c.run("pat-1", "key.rotate", new).data == "1"
    assert c.get("actor/pat-1")["sign_pub"] == new["sign_pub"]  # type: ignore[index]
    hist = c.get("keyhist/pat-1/0000")
    assert hist is not None and hist["sign_pub"] == sign_pub("pat-1") and hist["by"] == "pat-1"
    # the old key no longer signs; the new one does
    assert c.run("pat-1", "consent.revoke", {"patient": "pat-1", "id": "x"}).code == 3
    c.nonces["pat-1"] = 10
    r = c.run("pat-1", "consent.put", {"patient": "pat-1", "id": "c1", "decision": "permit"},
              key_of="pat-1-new")
    assert r.code == OK
    # an organisation rotates its staff's keys and its own
    assert c.run("org-a", "key.rotate", {"id": "nurse-n", "sign_pub": sign_pub("n2"),
                                         "enc_pub": enc_pub("n2")}).code == OK
    assert c.run("org-a", "key.rotate", {"id": "org-a", "sign_pub": sign_pub("org-a2"),
                                         "enc_pub": enc_pub("org-a2")}).code == OK
    org_a = c.get("org/org-a")
    assert org_a is not None and org_a["enc_pub"] == enc_pub("org-a2") and "kind" not in org_a
    same = {"id": "dr-psy", "sign_pub": sign_pub("dr-psy"), "enc_pub": enc_pub("dr-psy")}
    assert c.run("dr-psy", "key.rotate", same).code == CONFLICT
    assert c.run("dr-psy", "key.rotate", {**same, "enc_pub": 5}).code == INVALID


# ---------------------------------------------------------------- audit free text

def test_audit_events_carry_no_free_text(c: Chain) -> None:
    r = c.run("org-a", "audit.anchor", {"events": [event(1, reason="patient unconscious")]})
    assert r.code == INVALID and "free text travels sealed" in r.log
    keys = {"20240101": {"org-a": "w1", "org-b": "w2"}}
    sealed = event(2, x="c2VhbGVk", k="20240101")
    assert c.run("org-a", "audit.anchor", {"events": [sealed], "keys": keys}).code == OK
    assert c.get("akey/org-a/20240101") == keys["20240101"]
    # a later anchor does not replace the published key
    again = {"20240101": {"org-a": "other"}}
    assert c.run("org-a", "audit.anchor", {"events": [event(3)], "keys": again}).code == OK
    assert c.get("akey/org-a/20240101") == keys["20240101"]
    for bad in ({"bad epoch!": {}}, {"e1": "w"}, {"e1": {"org-a": 5}}, "keys"):
        assert c.run("org-a", "audit.anchor", {"events": [event(4)], "keys": bad}
                     ).code == INVALID
    assert c.run("org-a", "audit.anchor", {"events": [event(5, x="y" * 5000)]}).code == INVALID


# ---------------------------------------------------------------- state digest

def test_a_tampered_state_does_not_match_the_digest() -> None:
    c = world()
    assert c.run("org-a", "record.put", record_body("m1", 1, "", category="mental-health",
                                                    labels=["PSY"])).code == OK
    good = multiset.of_items(c.state.data.items())
    assert multiset.digest(good) == c.blocks[-1].header["state_digest"]
    meta = st.record_head(c.state, "Observation", "m1")
    assert meta is not None
    for key, value in [("rec/Observation/m1", canonical({**meta, "labels": []})),
                       ("actor/nurse-n", c.state.data["actor/nurse-n"].replace(b"nurse",
                                                                               b"psychiatrist")),
                       ("consent/pat-1/forged", canonical({"decision": "permit"}))]:
        tampered = dict(c.state.data)
        tampered[key] = value
        assert multiset.of_items(tampered.items()) != good
    missing = {k: v for k, v in c.state.data.items() if k != "care/pat-1/org-a"}
    assert multiset.of_items(missing.items()) != good
    # order does not matter, and parts combine: recomputation can run in parallel
    items = sorted(c.state.data.items())
    half = len(items) // 2
    assert multiset.combine([multiset.of_items(items[:half]),
                             multiset.of_items(items[half:])]) == good


# ---------------------------------------------------------------- erasure catch-up target

def test_catch_up_target_sets_aside_the_claims_liars_could_make() -> None:
    from medledger.node.erasure import trusted_height

    # 4 members (f = 1): one peer claiming a height nobody has is outvoted
    assert trusted_height([120, 121, 10**12], members=4) == 121
    assert trusted_height([120, 121, 122], members=4) == 121
    assert trusted_height([120, 10**12], members=4) == 120
    # too few answers to outvote anyone: the lowest claim (asked again while waiting)
    assert trusted_height([10**12], members=4) == 10**12
    assert trusted_height([], members=4) == 0
    assert trusted_height([-5, 120, 121], members=4) == 120  # a negative claim is dropped
    # 7 members (f = 2): the two highest of six answers are set aside
    assert trusted_height([50, 51, 52, 53, 10**9, 10**9], members=7) == 53
    # 2 or 3 members (f = 0): every answer counts
    assert trusted_height([7, 9], members=3) == 9
