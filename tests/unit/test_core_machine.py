"""core.machine: the state transition function, driven through ``apply_block``.

A small world: two genesis organisations (org-a, org-b); org-a registers a
physician, nurse, psychiatrist, admin clerk and patient pat-1; org-b registers a
physician and patient pat-2. Record bodies carry a dummy blob hash and commitment:
content lives off-chain (ADR 4) and the machine never sees it. After every block the
test driver checks that the incremental state digest equals the digest recomputed
from the whole state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from nacl.public import PrivateKey

from medledger.core import machine
from medledger.core import state as st
from medledger.core.machine import BlockApplied, BlockInput, apply_block
from medledger.core.tx import make_tx
from medledger.crypto import merkle, multiset
from medledger.crypto.canonical import b64e, canonical, loads, sha256
from medledger.crypto.signing import Signer
from medledger.errors import InvalidInput

CHAIN = "medledger-test"
T0 = 1_700_000_000 * 10**9
OK, INVALID, BADSIG, UNKNOWN, REPLAY, FORBIDDEN, NOTFOUND, CONFLICT = 0, 2, 3, 4, 5, 7, 8, 9


def seed(name: str) -> bytes:
    return hashlib.sha256(b"seed:" + name.encode()).digest()


def sign_pub(name: str) -> str:
    return b64e(Signer(seed(name)).public_key)


def enc_pub(name: str) -> str:
    return b64e(bytes(PrivateKey(hashlib.sha256(b"enc:" + name.encode()).digest()).public_key))


def org_doc(name: str, validator: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": name, "name": f"Hospital {name}", "sign_pub": sign_pub(name),
                           "enc_pub": enc_pub(name)}
    if validator:
        doc["validator_pub"] = b64e(hashlib.sha256(b"val:" + name.encode()).digest())
    return doc


def record_body(rid: str, version: int, prev: str, *, patient: str = "pat-1",
                category: str = "vital-signs", labels: list[Any] | None = None,
                rtype: str = "Observation", **extra: Any) -> dict[str, Any]:
    """A record.put body; ``labels`` is passed through unchecked (tests feed bad ones)."""
    blob = sha256(f"blob:{rid}:{version}".encode()).hex()
    readers = sorted({"org-a", "org-b"} | ({patient} if patient else set()))
    return {"type": rtype, "id": rid, "version": version, "prev": prev, "patient": patient,
            "category": category, "labels": labels or [], "blob": blob, "size": 100,
            "readers": readers, "commitment": b64e(sha256(rid.encode())), **extra}


def body_hash(body: dict[str, Any]) -> str:
    """The ``prev`` a successor of ``body`` must name (the machine's version hash)."""
    return sha256(canonical(body)).hex()


def register(aid: str, kind: str, role: Any = None) -> dict[str, Any]:
    body = {"id": aid, "kind": kind, "sign_pub": sign_pub(aid), "enc_pub": enc_pub(aid)}
    if role:
        body["role"] = role
    return body


@dataclass
class Chain:
    """A test driver: signs txs with per-signer counter nonces and applies blocks."""

    orgs: tuple[str, ...] = ("org-a", "org-b")
    chain: str = CHAIN
    state: st.MemoryState = field(default_factory=st.MemoryState)
    height: int = 0
    app_hash: bytes = b""
    header_hash: bytes = b"\x00" * 32
    nonces: dict[str, int] = field(default_factory=dict)
    blocks: list[BlockApplied] = field(default_factory=list)
    acc: bytes = b""
    retention: dict[str, int] | None = None

    def __post_init__(self) -> None:
        app_state: dict[str, Any] = {"orgs": [org_doc(o) for o in self.orgs]}
        if self.retention is not None:
            app_state["retention"] = self.retention
        writes = machine.genesis_writes(app_state)
        self.state.apply(writes)
        self.app_hash = machine.genesis_app_hash(self.chain, writes)
        self.acc = machine.genesis_state_acc(writes)

    def tx(self, signer: str, kind: str, body: dict[str, Any], *, key_of: str | None = None,
           chain: str | None = None) -> bytes:
        n = self.nonces[signer] = self.nonces.get(signer, 0) + 1
        return make_tx(signer, Signer(seed(key_of or signer)), chain or self.chain, kind, body,
                       f"{n:016x}").raw

    def block(self, *txs: bytes, time_ns: int = T0, reader: st.StateReader | None = None
              ) -> BlockApplied:
        self.height += 1
        applied = apply_block(reader or self.state, BlockInput(
            self.chain, self.height, time_ns, txs, self.app_hash, self.header_hash, self.acc))
        self.state.apply(applied.writes)
        self.app_hash, self.header_hash = applied.app_hash, applied.header_hash
        self.acc = applied.state_acc
        # the incremental digest is the digest of the whole state, always
        assert applied.state_acc == multiset.of_items(self.state.data.items())
        assert applied.header["state_digest"] == multiset.digest(applied.state_acc)
        self.blocks.append(applied)
        return applied

    def run(self, signer: str, kind: str, body: dict[str, Any], **kw: Any) -> machine.Result:
        return self.block(self.tx(signer, kind, body, **kw)).results[0]

    def get(self, key: str) -> dict[str, Any] | None:
        return st.get_json(self.state, key)


STAFF = [("dr-phys", "physician"), ("nurse-n", "nurse"), ("dr-psy", "psychiatrist"),
         ("clerk", "admin-clerk")]


def world() -> Chain:
    c = Chain()
    txs = [c.tx("org-a", "actor.register", register(aid, "practitioner", role))
           for aid, role in STAFF]
    txs.append(c.tx("org-a", "actor.register", register("pat-1", "patient")))
    txs.append(c.tx("org-b", "actor.register", register("dr-b", "practitioner", "physician")))
    txs.append(c.tx("org-b", "actor.register", register("pat-2", "patient")))
    applied = c.block(*txs)
    assert [r.code for r in applied.results] == [OK] * len(txs), applied.results
    return c


@pytest.fixture
def c() -> Chain:
    return world()


# ---------------------------------------------------------------- genesis

def test_genesis_writes_active_orgs() -> None:
    writes = machine.genesis_writes({"orgs": [org_doc("org-a"), org_doc("org-b", True)]})
    assert sorted(writes) == ["org/org-a", "org/org-b"]
    org_b = loads(writes["org/org-b"] or b"")
    assert org_b["status"] == "active" and org_b["approvals"] == []
    again = machine.genesis_writes({"orgs": [org_doc("org-a"), org_doc("org-b", True)]})
    assert machine.genesis_app_hash(CHAIN, writes) == machine.genesis_app_hash(CHAIN, again)
    assert machine.genesis_app_hash(CHAIN, writes) != machine.genesis_app_hash(
        CHAIN, machine.genesis_writes({"orgs": [org_doc("org-a")]}))


@pytest.mark.parametrize(
    "app_state",
    [{}, {"orgs": []}, {"orgs": "org-a"}, {"orgs": ["org-a"]},
     {"orgs": [{**org_doc("org-a"), "sign_pub": b64e(b"short")}]},
     {"orgs": [{**org_doc("org-a"), "enc_pub": None}]},
     {"orgs": [{**org_doc("org-a"), "id": "a/b"}]},
     {"orgs": [{k: v for k, v in org_doc("org-a").items() if k != "name"}]}],
    ids=["empty", "no-orgs", "not-list", "not-object", "short-key", "no-enc", "bad-id",
         "no-name"],
)
def test_genesis_rejects(app_state: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        machine.genesis_writes(app_state)


# ---------------------------------------------------------------- identities

def test_registration_state(c: Chain) -> None:
    nurse = c.get("actor/nurse-n")
    assert nurse is not None
    assert (nurse["kind"], nurse["org"], nurse["role"]) == ("practitioner", "org-a", "nurse")
    assert c.get("actor/pat-1") == {"id": "pat-1", "kind": "patient", "org": "org-a",
                                   "sign_pub": sign_pub("pat-1"), "enc_pub": enc_pub("pat-1"),
                                   "registered_at": T0 // 10**9, "status": "active"}
    assert st.has_care(c.state, "pat-1", "org-a") and not st.has_care(c.state, "pat-1", "org-b")
    assert st.has_care(c.state, "pat-2", "org-b")


@pytest.mark.parametrize(
    ("signer", "body", "code"),
    [("org-a", register("dr-phys", "practitioner", "nurse"), CONFLICT),
     ("org-a", register("org-b", "patient"), CONFLICT),
     ("org-a", register("x1", "practitioner", "surgeon"), INVALID),
     ("org-a", register("x1", "practitioner", ["nurse"]), INVALID),  # unhashable role
     ("org-a", register("x1", "robot"), INVALID),
     ("org-a", {**register("x1", "patient"), "sign_pub": "short"}, INVALID),
     ("org-a", register("a/b", "patient"), INVALID),
     ("dr-phys", register("x1", "patient"), FORBIDDEN),
     ("pat-1", register("x1", "patient"), FORBIDDEN)],
)
def test_register_refusals(c: Chain, signer: str, body: dict[str, Any], code: int) -> None:
    assert c.run(signer, "actor.register", body).code == code


# ---------------------------------------------------------------- records

def test_record_version_chain(c: Chain) -> None:
    v1 = record_body("o1", 1, "")
    r = c.run("org-a", "record.put", v1)
    assert (r.code, r.data) == (OK, "Observation/o1/_history/1")
    head = st.record_head(c.state, "Observation", "o1")
    assert head is not None and head["v"] == 1 and head["hash"] == body_hash(v1)
    assert st.patient_records(c.state, "pat-1") == [("Observation", "o1")]

    v2 = record_body("o1", 2, body_hash(v1), author="nurse-n")
    assert c.run("org-a", "record.put", v2).code == OK
    assert [v["v"] for v in st.record_versions(c.state, "Observation", "o1")] == [1, 2]
    head = st.record_head(c.state, "Observation", "o1")
    assert head is not None and head["author"] == "nurse-n" and head["prev"] == body_hash(v1)

    # A practitioner may sign for itself.
    v3 = record_body("o1", 3, body_hash(v2))
    assert c.run("dr-phys", "record.put", v3).code == OK
    head = st.record_head(c.state, "Observation", "o1")
    assert head is not None and (head["author"], head["org"]) == ("dr-phys", "org-a")


def test_version_conflicts(c: Chain) -> None:
    v1 = record_body("o1", 1, "")
    assert c.run("org-a", "record.put", v1).code == OK
    v2 = record_body("o1", 2, body_hash(v1))
    v2_other = record_body("o1", 2, body_hash(v1), category="medications")
    applied = c.block(c.tx("org-a", "record.put", v2), c.tx("org-a", "record.put", v2_other))
    assert [r.code for r in applied.results] == [OK, CONFLICT]  # stale write, same block
    assert c.run("org-a", "record.put", v2).code == CONFLICT  # same version again
    assert c.run("org-a", "record.put", record_body("o1", 3, "00" * 32)).code == CONFLICT
    assert c.run("org-a", "record.put", record_body("o1", 4, body_hash(v2))).code == CONFLICT
    assert c.run("org-a", "record.put", record_body("o1", 1, "")).code == CONFLICT
    assert c.run("org-a", "record.put", record_body("o2", 2, "")).code == CONFLICT
    assert c.run("org-a", "record.put", record_body("o2", 1, "ab")).code == CONFLICT
    assert c.run("org-a", "record.put", record_body("o1", 3, body_hash(v2),
                                                    patient="pat-2")).code == FORBIDDEN
    assert c.run("org-a", "record.put", record_body("o1", 3, body_hash(v2))).code == OK


@pytest.mark.parametrize(
    ("signer", "body", "code"),
    [
        ("nurse-n", record_body("m1", 1, "", category="mental-health", labels=["PSY"]),
         FORBIDDEN),
        ("org-a", record_body("m1", 1, "", category="mental-health", author="nurse-n"),
         FORBIDDEN),
        ("nurse-n", record_body("v1", 1, "", category="vital-signs"), OK),
        ("clerk", record_body("v1", 1, "", category="vital-signs"), FORBIDDEN),
        ("clerk", record_body("pat-1", 1, "", category="demographics", rtype="Patient"), OK),
        ("dr-psy", record_body("m1", 1, "", category="mental-health", labels=["PSY"]), OK),
        ("org-a", record_body("m1", 1, "", category="mental-health", labels=["PSY"]), OK),
        ("org-a", record_body("m1", 1, "", author="dr-b"), FORBIDDEN),  # not org-a staff
        ("org-a", record_body("m1", 1, "", author="pat-1"), FORBIDDEN),
        ("org-a", record_body("m1", 1, "", author="ghost"), FORBIDDEN),
        ("pat-1", record_body("m1", 1, ""), FORBIDDEN),
        ("org-b", record_body("m1", 1, ""), FORBIDDEN),  # no care relationship
        ("dr-b", record_body("m1", 1, ""), FORBIDDEN),
        ("org-a", record_body("m1", 1, "", patient="nobody"), 8),
        ("org-a", record_body("m1", 1, "", patient="dr-phys"), 8),
        ("org-a", record_body("m1", 1, "", category="astrology"), INVALID),
        ("org-a", record_body("m1", 1, "", labels=["PSY", "ETH"]), INVALID),  # not sorted
        ("org-a", record_body("m1", 1, "", labels=["R", "R"]), INVALID),
        ("org-a", record_body("m1", 1, "", labels=[1, "R"]), INVALID),  # used to crash
        ("org-a", record_body("m1", 1, "", labels=[["R"]]), INVALID),  # used to crash
        ("org-a", record_body("m1", 1, "", rtype="observation"), INVALID),
        ("org-a", record_body("m1", 1, "", rtype="Observation\n"), INVALID),
        ("org-a", record_body("m1", 1, "", rtype="Patient"), INVALID),  # id != patient
        ("org-a", {**record_body("m1", 1, ""), "readers": ["org-a", "org-b"]}, INVALID),
        ("org-a", {**record_body("m1", 1, ""), "readers": ["org-a", "org-b", "pat-1",
                                                           "pat-2"]}, INVALID),
        ("org-a", {**record_body("m1", 1, ""), "readers": ["org-b", "pat-1"]}, INVALID),
        ("org-a", {**record_body("m1", 1, ""), "readers": ["pat-1", "org-a"]}, INVALID),
        ("org-a", {**record_body("m1", 1, ""), "blob": "AB" * 32}, INVALID),
        ("org-a", {**record_body("m1", 1, ""), "size": 0}, INVALID),
        ("org-a", {**record_body("m1", 1, ""), "break_glass": "yes"}, INVALID),
        ("org-a", {**record_body("m1", 1, ""), "commitment": "short"}, INVALID),
        ("org-a", record_body("m1", 1, "", category="directory"), INVALID),
        ("org-a", record_body("m1", 1, "", patient=None), INVALID),  # vital-signs, no patient
        ("org-a", {**record_body("m1", 1, ""), "version": True}, INVALID),
        ("org-a", {**record_body("m1", 1, ""), "version": "1"}, INVALID),
        ("org-a", {k: v for k, v in record_body("m1", 1, "").items() if k != "commitment"},
         INVALID),
    ],
)
def test_record_put_rules(c: Chain, signer: str, body: dict[str, Any], code: int) -> None:
    r = c.run(signer, "record.put", body)
    assert r.code == code, r.log
    if code != OK:
        assert r.log and st.record_head(c.state, body["type"], str(body["id"])) is None


def test_other_org_may_write_with_patient_consent(c: Chain) -> None:
    body = record_body("x1", 1, "", category="laboratory")
    assert c.run("dr-b", "record.put", body).code == FORBIDDEN
    assert c.run("pat-1", "consent.put", {"patient": "pat-1", "id": "c-b", "decision": "permit",
                                          "orgs": ["org-b"]}).code == OK
    assert c.run("dr-b", "record.put", body).code == OK


# ---------------------------------------------------------------- consent

CONSENT = {"patient": "pat-1", "id": "c1", "decision": "permit", "actors": ["dr-phys"],
           "labels": ["PSY"]}


@pytest.mark.parametrize(
    ("signer", "code"),
    [("nurse-n", FORBIDDEN), ("dr-phys", FORBIDDEN), ("org-a", FORBIDDEN), ("org-b", FORBIDDEN),
     ("pat-2", FORBIDDEN), ("pat-1", OK)],
)
def test_consent_must_be_signed_by_the_patient(c: Chain, signer: str, code: int) -> None:
    r = c.run(signer, "consent.put", CONSENT)
    assert r.code == code, r.log
    assert (c.get("consent/pat-1/c1") is not None) == (code == OK)


def test_consent_versions_and_revoke(c: Chain) -> None:
    assert c.run("pat-1", "consent.put", CONSENT).code == OK
    rule = c.get("consent/pat-1/c1")
    assert rule is not None
    assert (rule["version"], rule["status"], rule["labels"]) == (1, "active", ["PSY"])
    assert c.run("pat-1", "consent.put", {**CONSENT, "decision": "deny"}).code == OK
    rule = c.get("consent/pat-1/c1")
    assert rule is not None and (rule["version"], rule["decision"]) == (2, "deny")
    assert c.run("nurse-n", "consent.revoke", {"patient": "pat-1", "id": "c1"}).code == FORBIDDEN
    assert c.run("pat-1", "consent.revoke", {"patient": "pat-1", "id": "c1"}).code == OK
    rule = c.get("consent/pat-1/c1")
    assert rule is not None and (rule["version"], rule["status"]) == (3, "inactive")
    assert c.run("pat-1", "consent.revoke", {"patient": "pat-1", "id": "nope"}).code == NOTFOUND


@pytest.mark.parametrize(
    "change",
    [{"decision": "maybe"}, {"categories": ["astrology"]}, {"actors": "dr-phys"},
     {"labels": [1]}, {"start": "today"}, {"end": True}, {"start": 100, "end": 100},
     {"id": "has space"}],
)
def test_consent_shape_errors(c: Chain, change: dict[str, Any]) -> None:
    assert c.run("pat-1", "consent.put", {**CONSENT, **change}).code == INVALID


# ---------------------------------------------------------------- authentication

def test_replayed_tx_is_refused(c: Chain) -> None:
    raw = c.tx("pat-1", "consent.put", CONSENT)
    applied = c.block(raw, raw)
    assert [r.code for r in applied.results] == [OK, REPLAY]
    assert c.block(raw).results[0].code == REPLAY
    assert applied.tx_hashes[0] == applied.tx_hashes[1] == sha256(raw)


def test_refused_tx_still_burns_its_nonce(c: Chain) -> None:
    raw = c.tx("nurse-n", "record.put", record_body("m1", 1, "", category="mental-health"))
    applied = c.block(raw)
    assert applied.results[0].code == FORBIDDEN
    assert applied.writes == {"n/nurse-n/0000000000000001": sha256(raw).hex().encode()}
    assert c.block(raw).results[0].code == REPLAY


def test_tx_for_another_chain(c: Chain) -> None:
    r = c.run("pat-1", "consent.put", CONSENT, chain="other-chain")
    assert r.code == REPLAY and "other-chain" in r.log


def test_unknown_signer(c: Chain) -> None:
    assert c.run("mallory", "consent.put", CONSENT).code == UNKNOWN


def test_bad_signature_and_no_nonce_burn(c: Chain) -> None:
    raw = c.tx("pat-1", "consent.put", CONSENT, key_of="mallory")
    applied = c.block(raw)
    assert applied.results[0].code == BADSIG
    assert applied.writes == {}  # unauthenticated txs write nothing, not even the nonce
    # the owner can still use that nonce
    c.nonces["pat-1"] = 0
    assert c.run("pat-1", "consent.put", CONSENT).code == OK


def test_verified_cache_skips_signature_check(c: Chain) -> None:
    raw = c.tx("pat-1", "consent.put", CONSENT, key_of="mallory")
    tx_hash = sha256(raw)
    ok = machine.check_tx(c.state, raw, CHAIN, c.height + 1, T0, verified={tx_hash})
    assert ok.code == OK
    assert machine.check_tx(c.state, raw, CHAIN, c.height + 1, T0).code == BADSIG


def test_check_tx_writes_nothing(c: Chain) -> None:
    before = dict(c.state.data)
    raw = c.tx("pat-1", "consent.put", CONSENT)
    assert machine.check_tx(c.state, raw, CHAIN, c.height + 1, T0).code == OK
    assert c.state.data == before
    assert c.block(raw).results[0].code == OK


@pytest.mark.parametrize("raw", [b"", b"{}", b"garbage", b'{"kind":[]}'])
def test_malformed_tx_is_a_result_not_a_crash(c: Chain, raw: bytes) -> None:
    applied = c.block(raw)
    assert applied.results[0].code == INVALID and applied.writes == {}


# ---------------------------------------------------------------- batches

def test_batch_applies_all(c: Chain) -> None:
    ops = [{"kind": "actor.register", "body": register("pat-9", "patient")},
           {"kind": "record.put", "body": record_body("b1", 1, "", patient="pat-9")},
           {"kind": "record.put", "body": record_body("b2", 1, "", patient="pat-9")}]
    r = c.run("org-a", "batch", {"ops": ops})
    assert (r.code, r.data) == (OK, "3")
    head = st.record_head(c.state, "Observation", "b2")
    assert head is not None and head["op"] == 2
    assert st.patient_records(c.state, "pat-9") == [("Observation", "b1"), ("Observation", "b2")]


@pytest.mark.parametrize(
    ("bad_op", "code"),
    [({"kind": "record.put", "body": record_body("b1", 1, "", patient="pat-9")}, CONFLICT),
     ({"kind": "record.put", "body": record_body("b3", 1, "", category="mental-health",
                                                  author="nurse-n", patient="pat-9")},
      FORBIDDEN),
     ({"kind": "consent.put", "body": CONSENT}, INVALID),
     ({"kind": ["record.put"], "body": {}}, INVALID),  # unhashable kind: used to crash
     ({"kind": "record.put"}, INVALID),
     ("not-an-op", INVALID)],
)
def test_batch_is_all_or_nothing(c: Chain, bad_op: Any, code: int) -> None:
    ops = [{"kind": "actor.register", "body": register("pat-9", "patient")},
           {"kind": "record.put", "body": record_body("b1", 1, "", patient="pat-9")},
           bad_op]
    raw = c.tx("org-a", "batch", {"ops": ops})
    applied = c.block(raw)
    r = applied.results[0]
    assert r.code == code and r.log.startswith("batch op 2"), r.log
    assert applied.writes == {f"n/org-a/{c.nonces['org-a']:016x}":
                              sha256(raw).hex().encode()}  # only the nonce
    assert c.get("actor/pat-9") is None


@pytest.mark.parametrize(("signer", "body", "code"),
                         [("dr-phys", {"ops": [{"kind": "actor.register",
                                                "body": register("p9", "patient")}]}, FORBIDDEN),
                          ("org-a", {"ops": []}, INVALID), ("org-a", {"ops": {}}, INVALID)])
def test_batch_refusals(c: Chain, signer: str, body: dict[str, Any], code: int) -> None:
    assert c.run(signer, "batch", body).code == code


# ---------------------------------------------------------------- governance

def test_org_join_needs_a_majority() -> None:
    c = Chain(orgs=("org-a", "org-b", "org-c"))
    r = c.run("org-a", "org.propose", {"org": org_doc("org-d", validator=True)})
    assert (r.code, r.data) == (OK, "proposed")
    assert c.run("org-d", "actor.register", register("p1", "patient")).code == UNKNOWN
    assert c.run("org-a", "org.approve", {"org_id": "org-d"}).code == CONFLICT  # twice
    applied = c.block(c.tx("org-b", "org.approve", {"org_id": "org-d"}))
    assert (applied.results[0].code, applied.results[0].data) == (OK, "active")
    org_d = c.get("org/org-d")
    assert org_d is not None and org_d["approvals"] == ["org-a", "org-b"]
    assert org_d["activated_at"] == T0 // 10**9
    assert applied.validator_updates == (
        (hashlib.sha256(b"val:org-d").digest(), machine.VALIDATOR_POWER),)
    assert c.run("org-c", "org.approve", {"org_id": "org-d"}).code == CONFLICT  # already active
    assert c.run("org-d", "actor.register", register("p1", "patient")).code == OK


def test_peers_admitted_are_active_members_nodes_once_the_ledger_names_them(
        c: Chain) -> None:
    stranger, node_d = "5" * 40, "d" * 40
    assert st.peer_admitted(c.state, stranger)  # no node named yet: CometBFT's default
    bad = {**org_doc("org-x"), "node_ids": ["D" * 40]}  # not lowercase hex
    assert c.run("org-a", "org.propose", {"org": bad}).code == INVALID
    doc = {**org_doc("org-d"), "node_ids": [node_d]}
    assert c.run("org-a", "org.propose", {"org": doc}).data == "proposed"
    assert st.peer_admitted(c.state, stranger)  # a proposed member names nothing yet
    assert c.run("org-b", "org.approve", {"org_id": "org-d"}).data == "active"
    assert c.get("org/org-d")["node_ids"] == [node_d]
    assert st.peer_admitted(c.state, node_d)
    assert not st.peer_admitted(c.state, stranger)
    # an organisation names its own nodes (a second one here), nobody else's
    second = "e" * 40
    assert c.run("org-d", "org.nodes", {"node_ids": [node_d, second]}).data == "2"
    assert st.peer_admitted(c.state, second) and c.get("org/org-d")["node_ids"] == [
        node_d, second]
    for body in ({"node_ids": [second, node_d]}, {"node_ids": ["x"]}, {"node_ids": "e"},
                 {}, {"node_ids": [f"{i:040x}" for i in range(17)]}):
        assert c.run("org-d", "org.nodes", body).code == INVALID, body
    assert c.run("dr-phys", "org.nodes", {"node_ids": [second]}).code == FORBIDDEN


def test_single_member_activates_immediately() -> None:
    c = Chain(orgs=("org-a",))
    r = c.run("org-a", "org.propose", {"org": org_doc("org-b")})
    assert (r.code, r.data) == (OK, "active")
    assert c.blocks[-1].validator_updates == ()


def test_two_members_need_both(c: Chain) -> None:
    assert c.run("org-a", "org.propose", {"org": org_doc("org-c")}).data == "proposed"
    assert c.run("org-b", "org.approve", {"org_id": "org-c"}).data == "active"


@pytest.mark.parametrize(
    ("signer", "kind", "body", "code"),
    [("dr-phys", "org.propose", {"org": org_doc("org-c")}, FORBIDDEN),
     ("pat-1", "org.approve", {"org_id": "org-b"}, FORBIDDEN),
     ("org-a", "org.propose", {"org": org_doc("org-b")}, CONFLICT),
     ("org-a", "org.propose", {"org": org_doc("dr-phys")}, CONFLICT),
     ("org-a", "org.propose", {"org": {**org_doc("org-c"), "sign_pub": 5}}, INVALID),
     ("org-a", "org.propose", {}, INVALID),
     ("org-a", "org.approve", {"org_id": "org-zz"}, NOTFOUND),
     ("org-a", "org.approve", {"org_id": "org-b"}, CONFLICT)],
)
def test_governance_refusals(c: Chain, signer: str, kind: str, body: dict[str, Any],
                             code: int) -> None:
    assert c.run(signer, kind, body).code == code


# ---------------------------------------------------------------- share links

SHARE_ID = "s" * 20
SHARE = {"patient": "pat-1", "id": SHARE_ID, "records": [["Observation", "o1", 1]],
         "exp": T0 // 10**9 + 3600, "passcode": True, "max_attempts": 2, "node": "org-b",
         "payload": sha256(b"jwe").hex()}


def shared_world() -> Chain:
    c = world()
    assert c.run("org-a", "record.put", record_body("o1", 1, "")).code == OK
    return c


def test_share_lifecycle() -> None:
    c = shared_world()
    assert c.run("org-a", "share.create", SHARE).code == FORBIDDEN
    assert c.run("pat-2", "share.create", SHARE).code == FORBIDDEN
    r = c.run("pat-1", "share.create", SHARE)
    assert (r.code, r.data) == (OK, SHARE_ID)
    grant = st.share(c.state, SHARE_ID)
    assert grant is not None and grant["payload"] == SHARE["payload"] and grant["node"] == "org-b"
    assert not {"jwe", "label", "recipient"} & set(grant)  # nothing readable on the ledger
    assert [s["id"] for s in st.shares_of(c.state, "pat-1")] == [SHARE_ID]
    assert c.run("pat-1", "share.create", SHARE).code == CONFLICT
    assert c.run("org-a", "share.attempt", {"id": SHARE_ID}).code == FORBIDDEN  # not the issuer
    assert c.run("org-b", "share.attempt", {"id": SHARE_ID}).data == "1"
    assert c.run("org-b", "share.attempt", {"id": SHARE_ID}).data == "0"
    assert c.run("org-b", "share.attempt", {"id": SHARE_ID}).data == "0"
    assert c.run("pat-1", "share.attempt", {"id": SHARE_ID}).code == FORBIDDEN
    assert c.run("org-a", "share.attempt", {"id": "t" * 20}).code == NOTFOUND
    assert c.run("pat-2", "share.revoke", {"id": SHARE_ID}).code == FORBIDDEN
    assert c.run("org-a", "share.revoke", {"id": SHARE_ID}).code == FORBIDDEN
    assert c.run("pat-1", "share.revoke", {"id": SHARE_ID}).code == OK
    grant = st.share(c.state, SHARE_ID)
    assert grant is not None and grant["revoked"] and grant["revoked_ns"] == T0
    assert c.run("pat-1", "share.revoke", {"id": SHARE_ID}).code == CONFLICT
    assert c.run("org-b", "share.attempt", {"id": SHARE_ID}).code == 11  # gone


def test_overwriting_is_judged_on_what_is_overwritten(c: Chain) -> None:
    """A nurse may not replace a mental-health record with vital signs (its history
    would then expose the older version); a physician who may not read a PSY record
    may overwrite it only by breaking the glass, which is flagged."""
    psy = {**record_body("o9", 1, ""), "category": "mental-health", "labels": ["PSY"]}
    assert c.run("dr-psy", "record.put", psy).code == OK
    vitals = {**record_body("o9", 2, body_hash(psy), author="nurse-n"),
              "category": "vital-signs"}
    r = c.run("org-a", "record.put", vitals)
    assert r.code == FORBIDDEN and "overwrite" in r.log
    r = c.run("dr-phys", "record.put", {**vitals, "author": "dr-phys"})
    assert r.code == FORBIDDEN and "may not read the version it replaces" in r.log
    r = c.run("nurse-n", "record.put", {**vitals, "author": "nurse-n", "break_glass": True})
    assert r.code == FORBIDDEN  # a nurse may not break the glass
    assert c.run("dr-phys", "record.put", {**vitals, "author": "dr-phys",
                                           "break_glass": True}).code == OK
    head = st.record_head(c.state, "Observation", "o9")
    assert head is not None and head["break_glass"] is True and head["author"] == "dr-phys"
    # the organisation itself (bulk import) overwrites what it has a care relationship for
    v3 = record_body("o9", 3, head["hash"], category="mental-health", labels=["PSY"])
    assert c.run("org-a", "record.put", v3).code == OK


def test_deny_consent_refuses_writes_by_the_denied(c: Chain) -> None:
    deny_org = {"patient": "pat-1", "id": "d1", "decision": "deny", "orgs": ["org-a"],
                "categories": ["laboratory"]}
    deny_nurse = {"patient": "pat-1", "id": "d2", "decision": "deny", "actors": ["nurse-n"]}
    assert c.run("pat-1", "consent.put", deny_org).code == OK
    assert c.run("pat-1", "consent.put", deny_nurse).code == OK
    lab = record_body("l1", 1, "", category="laboratory")
    r = c.run("org-a", "record.put", lab)
    assert r.code == FORBIDDEN and "consent d1" in r.log
    assert c.run("dr-phys", "record.put", lab).code == FORBIDDEN  # org-a's staff too
    vitals = record_body("v1", 1, "")
    r = c.run("nurse-n", "record.put", vitals)
    assert r.code == FORBIDDEN and "consent d2" in r.log
    assert c.run("dr-phys", "record.put", vitals).code == OK
    # an overwrite by the denied is refused too, whatever the new category
    r = c.run("nurse-n", "record.put", record_body("v1", 2, body_hash(vitals)))
    assert r.code == FORBIDDEN


def test_rewrap_for_a_later_member(c: Chain) -> None:
    assert c.run("org-a", "record.put", record_body("o1", 1, "")).code == OK
    key = sha256(b"wrapped key").hex()  # the hash of the wrapped key blob (off-chain)
    item = {"type": "Observation", "id": "o1", "version": 1, "reader": "org-b", "key": key}
    assert c.run("org-a", "record.rewrap", {"items": [item]}).code == OK
    assert c.run("org-b", "record.rewrap", {"items": [{**item, "reader": "org-a"}]}).code == OK
    assert st.rewrapped_keys(c.state, "Observation", "o1", 1, "org-b") == [key]
    # the record's patient may get a re-wrapped key too (a rotated patient key)
    assert c.run("org-a", "record.rewrap",
                 {"items": [{**item, "reader": "pat-1"}]}).code == OK
    # refusals: not an org, unknown version, reader not a member nor the patient, shapes
    assert c.run("dr-phys", "record.rewrap", {"items": [item]}).code == FORBIDDEN
    assert c.run("org-a", "record.rewrap", {"items": [{**item, "version": 2}]}).code == NOTFOUND
    assert c.run("org-a", "record.rewrap",
                 {"items": [{**item, "reader": "pat-2"}]}).code == FORBIDDEN
    assert c.run("org-a", "record.rewrap", {"items": []}).code == INVALID
    assert c.run("org-a", "record.rewrap", {"items": [{**item, "key": "!"}]}).code == INVALID
    assert c.run("org-a", "record.rewrap",
                 {"items": [{**item, "key": "A" * 64}]}).code == INVALID


def test_share_without_passcode_counts_nothing() -> None:
    c = shared_world()
    assert c.run("pat-1", "share.create", {**SHARE, "passcode": False}).code == OK
    assert c.run("org-b", "share.attempt", {"id": SHARE_ID}).data == "None"


@pytest.mark.parametrize(
    "change",
    [{"id": "short"}, {"id": "s" * 65}, {"id": "s" * 19 + "/"}, {"exp": T0 // 10**9},
     {"exp": "tomorrow"}, {"exp": True}, {"payload": None}, {"payload": "e.y.j"},
     {"records": "all"}, {"records": []}, {"records": [["Observation", "o1", 2]]},
     {"records": [["Observation", "o1"]]}, {"passcode": {"salt": "s", "hash": "h"}},
     {"passcode": None}, {"node": "org-zz"}, {"node": "pat-1"},
     {"max_attempts": 0}, {"max_attempts": 101}, {"max_attempts": True}],
)
def test_share_shape_errors(change: dict[str, Any]) -> None:
    c = shared_world()
    assert c.run("pat-1", "share.create", {**SHARE, **change}).code == INVALID


def test_share_refuses_records_of_another_patient() -> None:
    c = shared_world()
    assert c.run("org-b", "record.put", record_body("o2", 1, "", patient="pat-2")).code == OK
    r = c.run("pat-1", "share.create", {**SHARE, "records": [["Observation", "o2", 1]]})
    assert r.code == INVALID and "not a record version of patient pat-1" in r.log


# ---------------------------------------------------------------- audit

def event(i: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"ev-{i}", "recorded": "2024-01-01T00:00:00Z", "action": "R",
            "agent": "dr-phys", "node": "org-a", "patient": "pat-1", **extra}


def test_audit_anchor_rows_and_root(c: Chain) -> None:
    empty = c.block()
    assert empty.header["audit_root"] == merkle.root([]).hex() and empty.audit == ()
    applied = c.block(c.tx("org-a", "audit.anchor", {"events": [event(1), event(2)]}),
                      c.tx("org-a", "audit.anchor", {"events": [event(3, patient=None)]}))
    assert [r.code for r in applied.results] == [OK, OK]
    assert [(a.event_id, a.patient, a.leaf_index) for a in applied.audit] == [
        ("ev-1", "pat-1", 0), ("ev-2", "pat-1", 1), ("ev-3", None, 2)]
    events = [a.event for a in applied.audit]
    assert events[0] == canonical(event(1))
    root = merkle.root(events)
    assert applied.header["audit_root"] == root.hex() and applied.header["n_audit"] == 3
    hashes = [merkle.leaf_hash(e) for e in events]
    for a in applied.audit:  # every anchored event proves against the header
        proof = merkle.inclusion_proof(hashes, a.leaf_index)
        assert merkle.verify_inclusion(a.event, a.leaf_index, 3, proof, root)


@pytest.mark.parametrize(
    ("signer", "events", "code"),
    [("org-a", [event(1, diagnosis="depression")], INVALID),  # PHI field not allowed
     ("org-a", [event(1), {"id": "x"}], INVALID),
     ("org-a", [], INVALID),
     ("org-a", "ev", INVALID),
     ("org-a", [event(1, node="org-b")], FORBIDDEN),
     ("dr-phys", [event(1)], FORBIDDEN)],
)
def test_audit_anchor_refusals(c: Chain, signer: str, events: Any, code: int) -> None:
    applied = c.block(c.tx("org-a", "audit.anchor", {"events": [event(7)]}),
                      c.tx(signer, "audit.anchor", {"events": events}))
    assert [r.code for r in applied.results] == [OK, code]
    assert [a.event_id for a in applied.audit] == ["ev-7"]  # the refused tx added no rows


# ---------------------------------------------------------------- state digest

class CountingReader:
    """The chain's state, noting the keys read in batches (``get_many``: the old values
    of the block's writes that the state digest update had to ask for)."""

    def __init__(self, state: st.MemoryState) -> None:
        self.state = state
        self.asked: list[str] = []

    def get(self, key: str) -> bytes | None:
        return self.state.get(key)

    def scan(self, prefix: str) -> Any:
        return self.state.scan(prefix)

    def get_many(self, keys: Any) -> dict[str, bytes | None]:
        keys = list(keys)
        self.asked.extend(keys)
        return {k: self.state.get(k) for k in keys}


def test_state_digest_asks_only_for_old_values_it_does_not_know(c: Chain) -> None:
    """A new record's head was read by the block (absent), which implies its versions and
    compartment entry are new too: none of them is read again. Chain.block checks the
    digest against a full recomputation after every block."""
    reader = CountingReader(c.state)
    first = record_body("o1", 1, "")
    applied = c.block(c.tx("org-a", "record.put", first),
                      c.tx("org-a", "record.put", record_body("o2", 1, "")), reader=reader)
    assert [r.code for r in applied.results] == [OK, OK]
    assert "ver/Observation/o1/0000000001" in applied.writes
    assert reader.asked == []
    # an overwrite: the version above the head's is new; the compartment entry exists
    reader = CountingReader(c.state)
    second = record_body("o1", 2, body_hash(first))
    assert c.block(c.tx("org-a", "record.put", second), reader=reader).results[0].code == OK
    assert reader.asked == ["pat/pat-1/Observation/o1"]
    # created and overwritten in one block: nothing of it was in the state before
    reader = CountingReader(c.state)
    third = record_body("o3", 1, "")
    applied = c.block(c.tx("org-a", "record.put", third),
                      c.tx("org-a", "record.put", record_body("o3", 2, body_hash(third))),
                      reader=reader)
    assert [r.code for r in applied.results] == [OK, OK] and reader.asked == []


def test_state_digest_reads_rewritten_versions() -> None:
    """Erasure rewrites existing versions (read by a scan, not a get): their old values
    are read for the digest, which stays equal to the recomputed one."""
    c = world()
    first = record_body("o1", 1, "")
    c.block(c.tx("org-a", "record.put", first),
            c.tx("org-a", "record.put", record_body("o1", 2, body_hash(first))))
    reader = CountingReader(c.state)
    applied = c.block(c.tx("pat-1", "record.erase", {"patient": "pat-1",
                                                     "basis": "consent-withdrawn",
                                                     "records": ["Observation/o1"]}),
                      reader=reader)
    assert applied.results[0].code == OK, applied.results[0].log
    assert {"ver/Observation/o1/0000000001", "ver/Observation/o1/0000000002"} <= set(
        reader.asked)


# ---------------------------------------------------------------- blocks and determinism

def _script(c: Chain) -> list[bytes]:
    v1 = record_body("o1", 1, "")
    return [c.tx("org-a", "record.put", v1),
            c.tx("org-a", "record.put", record_body("o1", 2, body_hash(v1))),
            c.tx("pat-1", "consent.put", CONSENT),
            c.tx("nurse-n", "record.put", record_body("m1", 1, "", category="mental-health")),
            c.tx("org-a", "audit.anchor", {"events": [event(1)]})]


def test_same_txs_same_hashes() -> None:
    a, b = world(), world()
    assert a.app_hash == b.app_hash and a.header_hash == b.header_hash
    ba, bb = a.block(*_script(a)), b.block(*_script(b))
    assert ba.header == bb.header and ba.app_hash == bb.app_hash
    assert ba.results == bb.results and a.state.data == b.state.data
    assert ba.header["app_hash"] == ba.app_hash.hex()
    assert ba.header_hash == sha256(canonical(ba.header))
    assert ba.header["prev"] == a.blocks[-2].header_hash.hex()
    assert ba.header["tx_root"] == merkle.root(list(_script(world()))).hex()


def test_order_and_time_change_the_app_hash() -> None:
    a, b, t = world(), world(), world()
    txs = _script(a)
    assert _script(b) == txs == _script(t)
    ba = a.block(*txs)
    bb = b.block(*reversed(txs))
    bt = t.block(*txs, time_ns=T0 + 1)
    assert len({ba.app_hash, bb.app_hash, bt.app_hash}) == 3
    assert [r.code for r in ba.results] == [OK, OK, OK, FORBIDDEN, OK]
    assert [r.code for r in bb.results] == [OK, FORBIDDEN, OK, CONFLICT, OK]


def test_app_hash_commits_to_previous_app_hash() -> None:
    a, b = world(), world()
    b.app_hash = b"\x01" * 32
    assert a.block().app_hash != b.block().app_hash


# ---------------------------------------------------------------- property: block boundaries

_BASE = world()
_BASE_DATA = dict(_BASE.state.data)
_BASE_HEAD = (_BASE.height, _BASE.app_hash, _BASE.header_hash, dict(_BASE.nonces), _BASE.acc)
_BODY_CACHE: dict[tuple[str, int], dict[str, Any]] = {}


def _chain_from_base() -> Chain:
    c = Chain()
    c.state = st.MemoryState(_BASE_DATA)
    c.height, c.app_hash, c.header_hash, nonces, c.acc = _BASE_HEAD
    c.nonces = dict(nonces)
    return c


def _version_body(rid: str, version: int) -> dict[str, Any]:
    """A fixed body per (rid, version), chained, so prev hashes are known in advance."""
    if (rid, version) not in _BODY_CACHE:
        prev = "" if version == 1 else body_hash(_version_body(rid, version - 1))
        _BODY_CACHE[rid, version] = record_body(rid, version, prev)
    return _BODY_CACHE[rid, version]


ACTION = hs.tuples(hs.integers(0, 9), hs.integers(0, 3), hs.integers(1, 3))


def _build(c: Chain, actions: list[tuple[int, int, int]]) -> list[bytes]:
    txs: list[bytes] = []
    for kind, a, b in actions:
        rid = f"r{a}"
        if kind == 0:
            txs.append(c.tx("org-a", "record.put", _version_body(rid, b)))
        elif kind == 1:
            txs.append(c.tx("dr-phys", "record.put", _version_body(rid, b)))
        elif kind == 2:  # forbidden write
            txs.append(c.tx("nurse-n", "record.put",
                            record_body(rid, b, "", category="mental-health")))
        elif kind == 3:
            txs.append(c.tx("pat-1", "consent.put", {**CONSENT, "id": f"c{a}",
                                                     "decision": ["permit", "deny"][b % 2]}))
        elif kind == 4:
            txs.append(c.tx("pat-1", "consent.revoke", {"patient": "pat-1", "id": f"c{a}"}))
        elif kind == 5 and txs:  # replay an earlier tx
            txs.append(txs[(a * 7 + b) % len(txs)])
        elif kind == 6:
            txs.append(c.tx("pat-1", "consent.put", CONSENT, key_of="mallory"))
        elif kind == 7:
            ops = [{"kind": "actor.register", "body": register(f"px{a}", "patient")},
                   {"kind": "record.put",
                    "body": record_body(f"px{a}-o", 1, "", patient=f"px{a}")}]
            if b == 3:
                ops.append({"kind": "record.put", "body": _version_body("r0", 1)})
            txs.append(c.tx("org-a", "batch", {"ops": ops}))
        elif kind == 8:
            txs.append(c.tx("org-a", "audit.anchor", {"events": [event(a * 10 + b)]}))
        else:
            txs.append(c.tx("pat-1", "share.create", {**SHARE, "id": f"share-{a:011d}",
                                                      "records": [["Observation", "r0", 1]]}))
    return txs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.lists(ACTION, min_size=1, max_size=25), hs.lists(hs.booleans(), max_size=25))
def test_block_boundaries_do_not_change_state(actions: list[tuple[int, int, int]],
                                             cuts: list[bool]) -> None:
    one, split = _chain_from_base(), _chain_from_base()
    txs = _build(one, actions)
    assert _build(split, actions) == txs
    whole = one.block(*txs)

    blocks: list[list[bytes]] = [[]]
    for i, raw in enumerate(txs):
        blocks[-1].append(raw)
        if i < len(cuts) and cuts[i]:
            blocks.append([])
    results: list[machine.Result] = []
    for chunk in blocks:
        results.extend(split.block(*chunk).results)

    assert results == list(whole.results)
    assert split.state.data == one.state.data
    if sum(1 for b in blocks if b) > 1:  # empty blocks keep the app hash
        assert split.app_hash != one.app_hash  # hashes follow blocks, state does not

    again = _chain_from_base()
    assert again.block(*_build(again, actions)).app_hash == whole.app_hash


def test_refused_tx_drops_its_validator_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler that fails after queueing a validator update must not leak it into the block."""
    from medledger.errors import Conflict

    real = machine._HANDLERS["org.propose"]

    def propose_then_fail(*args: Any) -> str | None:
        real(*args)
        raise Conflict("refused after activation")

    monkeypatch.setitem(machine._HANDLERS, "org.propose", propose_then_fail)
    c = Chain(orgs=("org-a",))
    applied = c.block(c.tx("org-a", "org.propose", {"org": org_doc("org-v", validator=True)}))
    assert applied.results[0].code == CONFLICT
    assert applied.validator_updates == ()
    assert c.get("org/org-v") is None


def test_consents_written_by_the_machine_drive_policy(c: Chain) -> None:
    from medledger.core import policy

    phys = c.get("actor/dr-phys")
    assert phys is not None
    now = T0 // 10**9

    def read() -> policy.Decision:
        return policy.decide_read(c.state, phys, "pat-1", "mental-health", ["PSY"], now)

    assert not read().allowed
    assert c.run("pat-1", "consent.put", CONSENT).code == OK
    assert read().allowed and read().basis == "care"
    assert c.run("pat-1", "consent.revoke", {"patient": "pat-1", "id": "c1"}).code == OK
    assert not read().allowed


def test_a_decoded_tx_is_used_only_for_its_own_bytes() -> None:
    # apply_block may be handed the txs CheckTx decoded (by hash); the same block gives
    # the same outcome with or without them, and a lookup answering another tx's
    # decoding (a bug or a hash collision) is ignored, never applied in its place.
    from medledger.core.tx import decode_tx

    c = Chain()
    txs = (c.tx("org-a", "actor.register", register("pat-1", "patient")),
           c.tx("org-a", "actor.register", register("pat-2", "patient")))
    block = BlockInput(CHAIN, 1, T0, txs, c.app_hash, c.header_hash, c.acc)
    plain = apply_block(c.state, block)
    by_hash = {sha256(raw): decode_tx(raw) for raw in txs}
    assert apply_block(c.state, block, decoded=by_hash.get) == plain
    swapped = {sha256(txs[0]): decode_tx(txs[1]), sha256(txs[1]): decode_tx(txs[0])}
    assert apply_block(c.state, block, decoded=swapped.get) == plain
    assert [r.code for r in plain.results] == [OK, OK]


def test_a_large_block_hashed_in_slices_has_the_digests_of_one_hashed_whole() -> None:
    """``block_digests`` with a worker pool's ``map`` (slices) gives the accumulator and
    writes root of the plain computation: overwrites, deletions and new keys included."""
    n = machine.PARALLEL_DIGEST_MIN + 7
    base = st.MemoryState()
    for i in range(0, n, 3):
        base.data[f"rec/Observation/o{i:06d}"] = canonical({"v": 1, "i": i})
    acc = multiset.of_items(base.data.items())
    writes: dict[str, bytes | None] = {}
    for i in range(n):
        key = f"rec/Observation/o{i:06d}"
        writes[key] = None if i % 9 == 0 else canonical({"v": 2, "i": i})
    calls: list[int] = []

    def pool_map(fn: Any, *iterables: Any) -> list[Any]:
        calls.append(len(iterables[0]))
        return [fn(*args) for args in zip(*iterables, strict=True)]

    whole = machine.block_digests(base, writes, acc)
    sliced = machine.block_digests(base, writes, acc, digest_map=pool_map)
    assert calls == [machine.DIGEST_SLICES]
    assert sliced == whole
    after = dict(base.data)
    for key, value in writes.items():
        if value is None:
            after.pop(key, None)
        else:
            after[key] = value
    assert whole[0] == multiset.of_items(after.items())
    assert whole[1] == merkle.root([canonical([k, None if v is None else sha256(v).hex()])
                                    for k, v in sorted(writes.items())])
    small = {k: writes[k] for k in list(writes)[:100]}  # below the threshold: not sliced
    assert machine.block_digests(base, small, acc, digest_map=pool_map) == \
        machine.block_digests(base, small, acc)
    assert calls == [machine.DIGEST_SLICES]
