"""The state transition function: ``apply_block(state, block) -> BlockApplied``.

Reads like a specification: each tx kind has one ``_apply_<kind>`` function that
checks its preconditions (raising a ``MedledgerError`` subclass) and writes to
an ``Overlay``. ``apply_tx`` turns those errors into result codes, so an invalid
tx never stops a block. Nothing here touches a clock, randomness or I/O beyond
the ``StateReader`` it is given; block time arrives in ``BlockInput``.

App hash of a block::

    app_hash = SHA-256(canonical({prev_app_hash, height, time_ns, tx_root,
                                  results_root, writes_root, audit_root}))

(an empty block keeps the previous app hash: it changes no state)

where the roots are RFC 6962 Merkle roots over the block's raw txs, their
(code, data) results, the sorted state writes, and the audit events anchored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import Any

from medledger.core import policy
from medledger.core import state as st
from medledger.core.state import Overlay, get_json, put_json
from medledger.core.tx import ID_RE, Tx, decode_tx
from medledger.crypto import merkle
from medledger.crypto.canonical import b64d, canonical, sha256
from medledger.crypto.signing import verify
from medledger.errors import (
    BadSignature,
    Conflict,
    Forbidden,
    Gone,
    InvalidInput,
    MedledgerError,
    NotFound,
    Replay,
    UnknownSigner,
)

MAX_BATCH_OPS = 5000
PASSCODE_SCRYPT_N = 2**14
MAX_AUDIT_EVENTS = 5000
VALIDATOR_POWER = 10
RESOURCE_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}\Z")
AUDIT_FIELDS = {"id", "recorded", "action", "subtype", "outcome", "agent", "agent_org",
                "agent_role", "patient", "entity", "purpose", "reason", "node", "basis",
                "break_glass", "detail"}


@dataclass(frozen=True)
class BlockInput:
    chain: str
    height: int
    time_ns: int
    txs: tuple[bytes, ...]
    prev_app_hash: bytes
    prev_header_hash: bytes


@dataclass(frozen=True)
class Result:
    code: int
    log: str = ""
    data: str = ""


@dataclass(frozen=True)
class AuditRow:
    event_id: str
    patient: str | None
    recorded: str
    leaf_index: int
    event: bytes  # canonical JSON


@dataclass
class _Ctx:
    chain: str
    height: int
    time_ns: int
    audit: list[tuple[str, str | None, str, bytes]] = field(default_factory=list)
    validator_updates: list[tuple[bytes, int]] = field(default_factory=list)
    op: int | None = None  # index of the batch operation being applied

    @property
    def now_s(self) -> int:
        return self.time_ns // 1_000_000_000


@dataclass(frozen=True)
class BlockApplied:
    header: dict[str, Any]
    header_hash: bytes
    app_hash: bytes
    results: tuple[Result, ...]
    tx_hashes: tuple[bytes, ...]
    writes: dict[str, bytes | None]
    audit: tuple[AuditRow, ...]
    validator_updates: tuple[tuple[bytes, int], ...]


# ---------------------------------------------------------------- blocks

def apply_block(state: st.StateReader, block: BlockInput, verified: Container[bytes] = ()
                ) -> BlockApplied:
    """Apply every tx of ``block`` in order; return results, writes, header and app hash."""
    overlay = Overlay(state)
    ctx = _Ctx(block.chain, block.height, block.time_ns)
    results, hashes = [], []
    for raw in block.txs:
        hashes.append(sha256(raw))
        results.append(apply_tx(overlay, raw, ctx, verified))
    audit = tuple(AuditRow(eid, patient, recorded, i, ev)
                  for i, (eid, patient, recorded, ev) in enumerate(ctx.audit))
    header = block_header(block, results, overlay.writes, [a.event for a in audit])
    app_hash = bytes.fromhex(header["app_hash"])
    return BlockApplied(header, header_hash(header), app_hash, tuple(results), tuple(hashes),
                        overlay.writes, audit, tuple(ctx.validator_updates))


def block_header(block: BlockInput, results: list[Result], writes: Mapping[str, bytes | None],
                 audit_events: list[bytes]) -> dict[str, Any]:
    roots = {
        "tx_root": merkle.root(block.txs).hex(),
        # codes and data only: human log wording may change between versions
        "results_root": merkle.root([canonical([r.code, r.data]) for r in results]).hex(),
        "writes_root": merkle.root([canonical([k, None if v is None else sha256(v).hex()])
                                    for k, v in sorted(writes.items())]).hex(),
        "audit_root": merkle.root(audit_events).hex(),
    }
    # an empty block changes nothing, so it keeps the app hash (CometBFT then needs no
    # extra "proof" block for it and an idle network stays quiet)
    app_hash = block.prev_app_hash if not block.txs else sha256(canonical(
        {"prev_app_hash": block.prev_app_hash.hex(), "height": block.height,
         "time_ns": block.time_ns, **roots}))
    return {"chain": block.chain, "height": block.height, "time_ns": block.time_ns,
            "prev": block.prev_header_hash.hex(), "prev_app_hash": block.prev_app_hash.hex(),
            "n_txs": len(block.txs), "n_audit": len(audit_events), **roots,
            "app_hash": app_hash.hex()}


def header_hash(header: Mapping[str, Any]) -> bytes:
    return sha256(canonical(dict(header)))


# ---------------------------------------------------------------- genesis

def genesis_writes(app_state: Mapping[str, Any]) -> dict[str, bytes | None]:
    """State writes for the genesis organisations (``app_state = {"orgs": [...]}``)."""
    orgs = app_state.get("orgs")
    if not isinstance(orgs, list) or not orgs:
        raise InvalidInput("genesis must name at least one organisation")
    overlay = Overlay(st.MemoryState())
    ids = [o.get("id") if isinstance(o, dict) else None for o in orgs]
    if len(set(ids)) != len(ids):
        raise InvalidInput("genesis names an organisation twice")
    for o in orgs:
        entry = _org_entry(o)
        entry.update(status="active", approvals=[])
        put_json(overlay, f"org/{entry['id']}", entry)
    return overlay.writes


def genesis_app_hash(chain: str, writes: Mapping[str, bytes | None]) -> bytes:
    """The app hash of the genesis state: its writes root, bound to the chain id."""
    writes_root = block_header(BlockInput(chain, 0, 0, (), b"", b""), [], writes,
                               [])["writes_root"]
    return sha256(canonical({"chain": chain, "genesis_writes_root": writes_root}))


# ---------------------------------------------------------------- transactions

def check_tx(state: st.StateReader, raw: bytes, chain: str, height: int, time_ns: int,
             verified: Container[bytes] = ()) -> Result:
    """Mempool check: the tx would apply against ``state`` now (writes discarded)."""
    return apply_tx(Overlay(state), raw, _Ctx(chain, height, time_ns), verified)


def apply_tx(overlay: Overlay, raw: bytes, ctx: _Ctx, verified: Container[bytes] = ()) -> Result:
    """Apply one raw tx; every failure becomes a result code with a human log."""
    scratch = Overlay(overlay)
    audit_mark, validator_mark = len(ctx.audit), len(ctx.validator_updates)
    try:
        tx = decode_tx(raw)
        signer = authenticate(scratch, tx, ctx.chain, verified)
        scratch.put(f"n/{tx.signer}/{tx.nonce}", b"1")
        nonce_write = dict(scratch.writes)
        try:
            data = _HANDLERS[tx.kind](scratch, tx.signer, signer, tx.body, tx, ctx)
        except MedledgerError:
            overlay.writes.update(nonce_write)  # a refused tx still burns its nonce
            raise
    except MedledgerError as err:
        del ctx.audit[audit_mark:]
        del ctx.validator_updates[validator_mark:]
        return Result(err.code, str(err))
    scratch.merge_into(overlay)
    return Result(0, "", data or "")


def authenticate(state: st.StateReader, tx: Tx, chain: str, verified: Container[bytes] = ()
                 ) -> dict[str, Any]:
    """Chain id, known signer, signature, unused nonce. Returns the signer's state entry."""
    if tx.chain != chain:
        raise Replay(f"tx is for chain {tx.chain!r}, this is {chain!r}")
    signer = st.principal(state, tx.signer)
    if signer is None:
        raise UnknownSigner(f"unknown signer {tx.signer!r}")
    if signer["kind"] == "org" and signer["status"] != "active":
        raise UnknownSigner(f"organisation {tx.signer!r} is not an active member")
    if tx.hash not in verified and not verify(
            b64d(signer["sign_pub"], field="sign_pub"), tx.signing_bytes, tx.sig):
        raise BadSignature(f"bad signature on tx {tx.hash_hex[:16]} by {tx.signer}")
    if state.get(f"n/{tx.signer}/{tx.nonce}") is not None:
        raise Replay(f"nonce {tx.nonce} of {tx.signer} was already used (replayed tx)")
    return signer


def verify_signature(state: st.StateReader, tx: Tx) -> bool:
    signer = st.principal(state, tx.signer)
    return signer is not None and verify(b64d(signer["sign_pub"], field="sign_pub"),
                                         tx.signing_bytes, tx.sig)


Handler = Callable[[Overlay, str, dict[str, Any], Mapping[str, Any], Tx, _Ctx], str | None]


def _need(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise InvalidInput(f"{what}: field {key!r} is missing or has the wrong type")
    return value


def _need_id(body: Mapping[str, Any], key: str, what: str) -> str:
    value = _need(body, key, str, what)
    if not ID_RE.match(value):
        raise InvalidInput(f"{what}: {key!r} must be an id of 1-64 [A-Za-z0-9-.]")
    return str(value)


def _need_org(signer_id: str, signer: Mapping[str, Any], what: str) -> None:
    if signer["kind"] != "org":
        raise Forbidden(f"{what} must be signed by a member organisation, not {signer_id}")


def _need_patient_self(signer_id: str, signer: Mapping[str, Any], patient: str,
                       what: str) -> None:
    if signer["kind"] != "patient" or signer_id != patient:
        raise Forbidden(f"{what} for patient {patient} must be signed by that patient, "
                        f"not by {signer_id} ({signer.get('role') or signer['kind']})")


def _org_entry(o: Any) -> dict[str, Any]:
    if not isinstance(o, dict):
        raise InvalidInput("organisation must be an object")
    entry = {"id": _need_id(o, "id", "organisation"),
             "name": _need(o, "name", str, "organisation")[:200],
             "sign_pub": o.get("sign_pub"), "enc_pub": o.get("enc_pub"),
             "validator_pub": o.get("validator_pub")}
    b64d(entry["sign_pub"], field="organisation sign_pub", size=32)
    b64d(entry["enc_pub"], field="organisation enc_pub", size=32)
    if entry["validator_pub"] is not None:
        b64d(entry["validator_pub"], field="organisation validator_pub", size=32)
    return entry


# --- governance

def _apply_org_propose(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                       tx: Tx, ctx: _Ctx) -> str | None:
    _need_org(sid, signer, "org.propose")
    entry = _org_entry(body.get("org"))
    if st.principal(s, entry["id"]) is not None:
        raise Conflict(f"id {entry['id']} is already registered")
    entry.update(status="proposed", approvals=[sid], proposed_at=ctx.now_s)
    _maybe_activate(s, entry, ctx)
    return str(entry["status"])


def _apply_org_approve(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                       tx: Tx, ctx: _Ctx) -> str | None:
    _need_org(sid, signer, "org.approve")
    org_id = _need_id(body, "org_id", "org.approve")
    entry = st.org(s, org_id)
    if entry is None:
        raise NotFound(f"no proposed organisation {org_id}")
    if entry["status"] != "proposed":
        raise Conflict(f"organisation {org_id} is already {entry['status']}")
    if sid in entry["approvals"]:
        raise Conflict(f"{sid} already approved {org_id}")
    entry["approvals"] = sorted([*entry["approvals"], sid])
    _maybe_activate(s, entry, ctx)
    return str(entry["status"])


def _maybe_activate(s: Overlay, entry: dict[str, Any], ctx: _Ctx) -> None:
    members = {o["id"] for o in st.active_orgs(s)}
    if 2 * len(set(entry["approvals"]) & members) > len(members):
        entry["status"] = "active"
        entry["activated_at"] = ctx.now_s
        if entry.get("validator_pub"):
            ctx.validator_updates.append((b64d(entry["validator_pub"]), VALIDATOR_POWER))
    put_json(s, f"org/{entry['id']}", entry)


# --- identities

def _apply_actor_register(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                          tx: Tx, ctx: _Ctx) -> str | None:
    _need_org(sid, signer, "actor.register")
    aid = _need_id(body, "id", "actor.register")
    kind = body.get("kind")
    if kind not in ("practitioner", "patient"):
        raise InvalidInput("actor.register: kind must be 'practitioner' or 'patient'")
    if st.principal(s, aid) is not None:
        raise Conflict(f"id {aid} is already registered")
    entry: dict[str, Any] = {"id": aid, "kind": kind, "org": sid,
                             "sign_pub": body.get("sign_pub"), "enc_pub": body.get("enc_pub"),
                             "registered_at": ctx.now_s}
    b64d(entry["sign_pub"], field="sign_pub", size=32)
    b64d(entry["enc_pub"], field="enc_pub", size=32)
    if kind == "practitioner":
        role = body.get("role")
        if not isinstance(role, str) or role not in policy.ROLES:
            raise InvalidInput(f"actor.register: role must be one of {', '.join(policy.ROLES)}")
        entry["role"] = role
    else:
        s.put(f"care/{aid}/{sid}", b"1")
    put_json(s, f"actor/{aid}", entry)
    return aid


# --- records

def _apply_record_put(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                      tx: Tx, ctx: _Ctx) -> str | None:
    what = "record.put"
    rtype = _need(body, "type", str, what)
    if not RESOURCE_TYPE_RE.match(rtype):
        raise InvalidInput(f"{what}: 'type' must be a FHIR resource type name")
    rid = _need_id(body, "id", what)
    version = _need(body, "version", int, what)
    prev = _need(body, "prev", str, what)
    patient = _need_id(body, "patient", what)
    category = _need(body, "category", str, what)
    labels = _need(body, "labels", list, what)
    keys = _need(body, "keys", dict, what)
    for f in ("ct", "iv", "commitment"):
        _need(body, f, str, what)
    if category not in policy.CATEGORIES:
        raise InvalidInput(f"{what}: unknown category {category!r}")
    # Type check first: sorted()/set() raise TypeError on mixed or unhashable items.
    if not all(isinstance(x, str) for x in labels) or labels != sorted(set(labels)):
        raise InvalidInput(f"{what}: labels must be sorted unique strings")
    if patient not in keys:
        raise InvalidInput(f"{what}: the data key must be wrapped to the patient {patient}")

    org_id, author = _writer(s, sid, signer, body)
    role = policy.writer_role(signer, author)
    if role is None or not policy.may_write(role, category):
        who = author["id"] if author else sid
        raise Forbidden(f"{who} ({role.name if role else 'no clinical role'}) may not write "
                        f"{category} data")
    pat = st.actor(s, patient)
    if pat is None or pat["kind"] != "patient":
        raise NotFound(f"patient {patient} is not registered")
    if not st.has_care(s, patient, org_id) and not policy.matching_consents(
            st.consents(s, patient), author or {"id": sid, "org": org_id}, category, labels,
            ctx.now_s, "permit"):
        raise Forbidden(f"organisation {org_id} has no care relationship with patient {patient}")
    if rtype == "Patient" and rid != patient:
        raise InvalidInput(f"{what}: a Patient record's id must be the patient id")

    head = st.record_head(s, rtype, rid)
    if head is not None:  # overwriting is writing over what is there: judge that too
        hidden = set(head["labels"]) & policy.SENSITIVE_LABELS - role.labels
        if not policy.may_write(role, head["category"]) or (hidden and not role.break_glass
                                                            and role is not policy.SYSTEM):
            raise Forbidden(f"{author['id'] if author else sid} ({role.name}) may not "
                            f"overwrite {rtype}/{rid}, a {head['category']} record"
                            + (f" labelled {','.join(sorted(hidden))}" if hidden else ""))
    if head is None:
        if version != 1 or prev != "":
            raise Conflict(f"{rtype}/{rid} does not exist; the first version must be 1 with no "
                           "previous hash")
    else:
        if head["patient"] != patient:
            raise Conflict(f"{rtype}/{rid} belongs to another patient")
        if version != head["v"] + 1 or prev != head["hash"]:
            raise Conflict(f"version conflict on {rtype}/{rid}: the ledger is at version "
                           f"{head['v']}, this write expected {version - 1}")
    vhash = sha256(canonical(dict(body))).hex()
    meta = {"type": rtype, "id": rid, "v": version, "hash": vhash, "prev": prev,
            "patient": patient, "category": category, "labels": labels, "org": org_id,
            "author": author["id"] if author else sid, "tx": tx.hash_hex, "op": ctx.op,
            "time_ns": ctx.time_ns}
    put_json(s, f"rec/{rtype}/{rid}", meta)
    put_json(s, st.version_key(rtype, rid, version), meta)
    s.put(f"pat/{patient}/{rtype}/{rid}", b"1")
    return f"{rtype}/{rid}/_history/{version}"


def _writer(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any]
            ) -> tuple[str, dict[str, Any] | None]:
    """(org, author) of a write: an org for its staff (``author``) or a practitioner itself."""
    if signer["kind"] == "practitioner":
        return signer["org"], signer
    _need_org(sid, signer, "record.put")
    author_id = body.get("author")
    if author_id in (None, sid):
        return sid, None
    author = st.actor(s, str(author_id))
    if author is None or author["kind"] != "practitioner" or author["org"] != sid:
        raise Forbidden(f"author {author_id} is not a practitioner of {sid}")
    return sid, author


# --- consent

def _apply_consent_put(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                       tx: Tx, ctx: _Ctx) -> str | None:
    what = "consent.put"
    patient = _need_id(body, "patient", what)
    _need_patient_self(sid, signer, patient, "a consent")
    cid = _need_id(body, "id", what)
    decision = body.get("decision")
    if decision not in ("permit", "deny"):
        raise InvalidInput(f"{what}: decision must be 'permit' or 'deny'")
    rule: dict[str, Any] = {"id": cid, "patient": patient, "decision": decision,
                            "status": "active", "recorded_ns": ctx.time_ns}
    for f in ("actors", "orgs", "categories", "labels"):
        values = body.get(f) or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise InvalidInput(f"{what}: {f} must be a list of strings")
        rule[f] = sorted(set(values))
    bad = set(rule["categories"]) - set(policy.CATEGORIES)
    if bad:
        raise InvalidInput(f"{what}: unknown categories {sorted(bad)}")
    for f in ("start", "end"):
        v = body.get(f)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise InvalidInput(f"{what}: {f} must be epoch seconds or null")
        rule[f] = v
    if rule["start"] is not None and rule["end"] is not None and rule["end"] <= rule["start"]:
        raise InvalidInput(f"{what}: the period ends before it starts")
    prior = get_json(s, f"consent/{patient}/{cid}")
    rule["version"] = 1 if prior is None else prior["version"] + 1
    put_json(s, f"consent/{patient}/{cid}", rule)
    return cid


def _apply_consent_revoke(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                          tx: Tx, ctx: _Ctx) -> str | None:
    patient = _need_id(body, "patient", "consent.revoke")
    _need_patient_self(sid, signer, patient, "a consent revocation")
    cid = _need_id(body, "id", "consent.revoke")
    rule = get_json(s, f"consent/{patient}/{cid}")
    if rule is None:
        raise NotFound(f"no consent {cid} for patient {patient}")
    rule.update(status="inactive", version=rule["version"] + 1, recorded_ns=ctx.time_ns)
    put_json(s, f"consent/{patient}/{cid}", rule)
    return cid


# --- share links

def _apply_share_create(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                        tx: Tx, ctx: _Ctx) -> str | None:
    what = "share.create"
    patient = _need_id(body, "patient", what)
    _need_patient_self(sid, signer, patient, "a share link")
    share_id = _need(body, "id", str, what)
    if not 16 <= len(share_id) <= 64 or not ID_RE.match(share_id):
        raise InvalidInput(f"{what}: id must be 16-64 url-safe characters")
    if st.share(s, share_id) is not None:
        raise Conflict(f"share {share_id} already exists")
    exp = body.get("exp")
    if exp is not None and (not isinstance(exp, int) or exp <= ctx.now_s):
        raise InvalidInput(f"{what}: exp must be a future time in epoch seconds")
    _need(body, "jwe", str, what)
    records = _need(body, "records", list, what)
    passcode = body.get("passcode")
    if passcode is not None and not (isinstance(passcode, dict) and {"salt", "hash", "n"}
                                     <= set(passcode) and passcode["n"] == PASSCODE_SCRYPT_N):
        raise InvalidInput(f"{what}: passcode must carry salt, hash and n = {PASSCODE_SCRYPT_N}")
    attempts = body.get("max_attempts", 10)
    if not isinstance(attempts, int) or not 1 <= attempts <= 100:
        raise InvalidInput(f"{what}: max_attempts must be 1-100")
    label = body.get("label") or ""
    if not isinstance(label, str) or len(label) > 80:
        raise InvalidInput(f"{what}: label must be at most 80 characters")
    grant = {"id": share_id, "patient": patient, "exp": exp, "label": label,
             "passcode": passcode, "attempts_left": attempts if passcode else None,
             "records": records, "revoked": False, "created_ns": ctx.time_ns,
             "tx": tx.hash_hex, "recipient": body.get("recipient") or ""}
    put_json(s, f"share/{share_id}", grant)
    s.put(f"pshare/{patient}/{share_id}", b"1")
    return str(share_id)


def _apply_share_revoke(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                        tx: Tx, ctx: _Ctx) -> str | None:
    share_id = _need(body, "id", str, "share.revoke")
    grant = st.share(s, share_id)
    if grant is None:
        raise NotFound(f"no share {share_id}")
    _need_patient_self(sid, signer, grant["patient"], "revoking a share link")
    grant.update(revoked=True, revoked_ns=ctx.time_ns)
    put_json(s, f"share/{share_id}", grant)
    return str(share_id)


def _apply_share_attempt(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                         tx: Tx, ctx: _Ctx) -> str | None:
    _need_org(sid, signer, "share.attempt")
    share_id = _need(body, "id", str, "share.attempt")
    grant = st.share(s, share_id)
    if grant is None:
        raise NotFound(f"no share {share_id}")
    if grant["revoked"]:
        raise Gone(f"share {share_id} is revoked")
    if grant["attempts_left"] is not None:
        grant["attempts_left"] = max(0, grant["attempts_left"] - 1)
    put_json(s, f"share/{share_id}", grant)
    return str(grant["attempts_left"])


# --- audit

def _apply_audit_anchor(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                        tx: Tx, ctx: _Ctx) -> str | None:
    _need_org(sid, signer, "audit.anchor")
    events = _need(body, "events", list, "audit.anchor")
    if not 1 <= len(events) <= MAX_AUDIT_EVENTS:
        raise InvalidInput(f"audit.anchor: 1-{MAX_AUDIT_EVENTS} events per tx")
    rows = []
    for i, ev in enumerate(events):
        if not isinstance(ev, dict) or not {"id", "recorded", "action", "agent"} <= set(ev):
            raise InvalidInput(f"audit.anchor: event {i} needs id, recorded, action and agent")
        if not all(isinstance(ev[f], str) and 0 < len(ev[f]) <= 64
                   for f in ("id", "recorded", "action", "agent")):
            raise InvalidInput(f"audit.anchor: event {i}: id, recorded, action and agent must "
                               "be non-empty strings of at most 64 characters")
        extra = set(ev) - AUDIT_FIELDS
        if extra:
            raise InvalidInput(f"audit.anchor: event {i} has fields not allowed on the ledger: "
                               f"{sorted(extra)}")
        if ev.get("node") != sid:
            raise Forbidden(f"audit.anchor: event {i} was recorded by {ev.get('node')}, "
                            f"not by the signer {sid}")
        patient = ev.get("patient")
        rows.append((str(ev["id"]), patient if isinstance(patient, str) else None,
                     str(ev["recorded"]), canonical(ev)))
    ctx.audit.extend(rows)
    return str(len(rows))


# --- key re-wrapping for organisations that joined later

MAX_REWRAP_ITEMS = 2000


def _apply_record_rewrap(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                         tx: Tx, ctx: _Ctx) -> str | None:
    """An organisation that can open record versions wraps their data keys to a member
    that joined after they were sealed. Stored per (version, reader, wrapper), so a
    bad wrap by one member cannot block a good one by another."""
    what = "record.rewrap"
    _need_org(sid, signer, what)
    items = _need(body, "items", list, what)
    if not 1 <= len(items) <= MAX_REWRAP_ITEMS:
        raise InvalidInput(f"{what}: 1-{MAX_REWRAP_ITEMS} items per tx")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidInput(f"{what}: item {i} must be an object")
        rtype = _need(item, "type", str, f"{what} item {i}")
        rid = _need_id(item, "id", f"{what} item {i}")
        version = _need(item, "version", int, f"{what} item {i}")
        reader = _need_id(item, "reader", f"{what} item {i}")
        key = _need(item, "key", str, f"{what} item {i}")
        if len(key) > 200:
            raise InvalidInput(f"{what}: item {i}: wrapped key too long")
        b64d(key, field=f"{what} item {i} key")
        if st.record_version(s, rtype, rid, version) is None:
            raise NotFound(f"{what}: item {i}: {rtype}/{rid} has no version {version}")
        target = st.org(s, reader)
        if target is None or target["status"] != "active":
            raise Forbidden(f"{what}: item {i}: {reader} is not an active member organisation")
        put_json(s, f"wrap/{rtype}/{rid}/{version:010d}/{reader}/{sid}", {"key": key})
    return str(len(items))


# --- batches

_BATCHABLE = frozenset({"actor.register", "record.put"})


def _apply_batch(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                 tx: Tx, ctx: _Ctx) -> str | None:
    """All-or-nothing list of operations signed once (transaction Bundles)."""
    _need_org(sid, signer, "batch")
    ops = _need(body, "ops", list, "batch")
    if not 1 <= len(ops) <= MAX_BATCH_OPS:
        raise InvalidInput(f"batch: 1-{MAX_BATCH_OPS} operations")
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or not isinstance(op.get("kind"), str) or op.get(
                "kind") not in _BATCHABLE or not isinstance(
                op.get("body"), dict):
            raise InvalidInput(f"batch op {i}: must be {{kind, body}} with kind in "
                               f"{sorted(_BATCHABLE)}")
        ctx.op = i
        try:
            _HANDLERS[op["kind"]](s, sid, signer, op["body"], tx, ctx)
        except MedledgerError as err:
            err.message = f"batch op {i}: {err.message}"
            raise
        finally:
            ctx.op = None
    return str(len(ops))


_HANDLERS: dict[str, Handler] = {
    "org.propose": _apply_org_propose,
    "org.approve": _apply_org_approve,
    "actor.register": _apply_actor_register,
    "record.put": _apply_record_put,
    "consent.put": _apply_consent_put,
    "consent.revoke": _apply_consent_revoke,
    "share.create": _apply_share_create,
    "share.revoke": _apply_share_revoke,
    "share.attempt": _apply_share_attempt,
    "audit.anchor": _apply_audit_anchor,
    "record.rewrap": _apply_record_rewrap,
    "batch": _apply_batch,
}
