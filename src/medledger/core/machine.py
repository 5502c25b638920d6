"""The state transition function: ``apply_block(state, block) -> BlockApplied``.

Reads like a specification: each tx kind has one ``_apply_<kind>`` function that
checks its preconditions (raising a ``MedledgerError`` subclass) and writes to
an ``Overlay``. ``apply_tx`` turns those errors into result codes, so an invalid
tx never stops a block. Nothing here touches a clock, randomness or I/O beyond
the ``StateReader`` it is given; block time arrives in ``BlockInput``.

App hash of a block::

    app_hash = SHA-256(canonical({prev_app_hash, height, time_ns, tx_root,
                                  results_root, writes_root, audit_root, state_digest}))

(an empty block keeps the previous app hash: it changes no state)

where the roots are RFC 6962 Merkle roots over the block's raw txs, their
(code, data) results, the sorted state writes, and the audit events anchored, and
``state_digest`` commits to the whole state after the block (``crypto.multiset``:
updated from the block's writes, recomputable from a scan of the state), so a node
can check at start-up that the state it serves is the state it committed.

Record content never passes through here: a ``record.put`` carries metadata, the
salted commitment and the hash of the sealed blob that nodes keep off-chain (ADR 4).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from medledger.core import policy
from medledger.core import state as st
from medledger.core.state import Overlay, get_json, put_json
from medledger.core.tx import ID_RE, Tx, decode_tx
from medledger.crypto import merkle, multiset
from medledger.crypto.canonical import b64d, canonical, loads, sha256
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
MAX_AUDIT_EVENTS = 5000
MAX_IMPORT_PARTS = 10_000
MAX_IMPORT_OPS = 200_000
MAX_BLOB_BYTES = 64 * 1024 * 1024
MAX_ERASE_RECORDS = 10_000
VALIDATOR_POWER = 10
RESOURCE_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}\Z")
HASH_RE = re.compile(r"^[0-9a-f]{64}\Z")
NODE_ID_RE = re.compile(r"^[0-9a-f]{40}\Z")
# Ledger audit events carry no free text: reasons and details travel sealed in ``x``
# (AES-GCM under the node's audit key of epoch ``k``, ADR 4 section 6).
AUDIT_FIELDS = {"id", "recorded", "action", "subtype", "outcome", "agent", "agent_org",
                "agent_role", "patient", "entity", "purpose", "node", "basis",
                "break_glass", "x", "k"}
ERASURE_BASES = frozenset({"consent-withdrawn", "no-longer-necessary", "objection",
                           "unlawful-processing", "legal-obligation", "retention-expired"})
DEACTIVATION_REASONS = frozenset({"left", "key-compromised", "deceased", "duplicate", "other"})


@dataclass(frozen=True)
class BlockInput:
    chain: str
    height: int
    time_ns: int
    txs: tuple[bytes, ...]
    prev_app_hash: bytes
    prev_header_hash: bytes
    prev_state_acc: bytes = multiset.EMPTY  # the state digest accumulator before the block


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
    # CheckTx (mempool admission): an import.commit is checked for what it needs (its
    # import open and complete, its signer) without applying every staged operation,
    # which only the block does; 25,000 operations would otherwise be applied twice,
    # and a CometBFT RPC answer must not wait for them.
    admission: bool = False

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
    state_acc: bytes = multiset.EMPTY


# ---------------------------------------------------------------- blocks

def apply_block(state: st.StateReader, block: BlockInput, verified: Container[bytes] = (),
                decoded: Callable[[bytes], Tx | None] | None = None,
                digest_map: DigestMap | None = None) -> BlockApplied:
    """Apply every tx of ``block`` in order; return results, writes, header and app hash.

    ``decoded``: a lookup, by tx hash, of txs this node already decoded (in CheckTx); a
    tx found there is not decoded again (``decode_tx`` is a pure function of the bytes).
    ``digest_map``: an ``Executor.map`` that hashes the writes of a large block in
    slices (``block_digests``); the result is the same without it."""
    overlay = st.ReadTrackingOverlay(state)
    ctx = _Ctx(block.chain, block.height, block.time_ns)
    results, hashes = [], []
    for raw in block.txs:
        h = sha256(raw)
        hashes.append(h)
        results.append(apply_tx(overlay, raw, ctx, verified,
                                decoded(h) if decoded is not None else None))
    audit = tuple(AuditRow(eid, patient, recorded, i, ev)
                  for i, (eid, patient, recorded, ev) in enumerate(ctx.audit))
    acc, writes_root = block_digests(state, overlay.writes, block.prev_state_acc,
                                     overlay.base_reads, digest_map)
    header = block_header(block, results, overlay.writes, [a.event for a in audit], acc,
                          writes_root)
    app_hash = bytes.fromhex(header["app_hash"])
    return BlockApplied(header, header_hash(header), app_hash, tuple(results), tuple(hashes),
                        overlay.writes, audit, tuple(ctx.validator_updates), acc)


DigestMap = Callable[..., Iterable[tuple[int, list[bytes]]]]
PARALLEL_DIGEST_MIN = 20_000  # writes in a block from which ``digest_map`` is used
DIGEST_SLICES = 8


def block_digests(base: st.StateReader, writes: Mapping[str, bytes | None], acc: bytes,
                  known: Mapping[str, bytes | None] | None = None,
                  digest_map: DigestMap | None = None) -> tuple[bytes, bytes]:
    """(the state digest accumulator once ``writes`` replace what ``base`` holds, the
    Merkle root of the writes in key order).

    ``known``: values the block read from ``base`` (its overlay's ``base_reads``). The
    old values they give, or imply (``_known_olds``), are not read from ``base`` again:
    a large import writes ~100,000 keys, nearly all new, and only the rest is read.
    A block of ``PARALLEL_DIGEST_MIN`` writes or more is hashed by ``digest_map`` in
    ``DIGEST_SLICES`` consecutive slices (a 25,000-entry import writes ~75,000 keys: each
    a 512-byte SHAKE-256 element and a leaf hash)."""
    olds = _known_olds(writes, known or {})
    olds.update(st.get_many(base, [k for k in writes if k not in olds]))
    items = sorted(writes.items())
    n = len(items)
    k = DIGEST_SLICES if digest_map is not None and n >= PARALLEL_DIGEST_MIN else 1
    slices = [items[i * n // k:(i + 1) * n // k] for i in range(k)]
    removed = [[(key, old) for key, _ in part if (old := olds.get(key)) is not None]
               for part in slices]
    parts = (digest_map(digest_part, slices, removed) if digest_map is not None and k > 1
             else [digest_part(items, removed[0])])
    total = multiset.to_int(acc)
    leaves: list[bytes] = []
    for delta, hashes in parts:
        total += delta
        leaves.extend(hashes)
    return multiset.to_bytes(total), merkle.root_of_hashes(leaves)


def digest_part(items: list[tuple[str, bytes | None]], removed: list[tuple[str, bytes]]
                ) -> tuple[int, list[bytes]]:
    """One slice of ``block_digests``: the multiset delta of its writes (``items``, with
    the old values they replace, ``removed``) and their Merkle leaf hashes."""
    added = [(k, v) for k, v in items if v is not None]
    return multiset.delta(removed, added), [
        merkle.leaf_hash(_write_leaf(k, v)) for k, v in items]


def _write_leaf(key: str, value: bytes | None) -> bytes:
    return canonical([key, None if value is None else sha256(value).hex()])


_UNREAD = object()


def _known_olds(writes: Iterable[str], known: Mapping[str, bytes | None]
                ) -> dict[str, bytes | None]:
    """Old values of written keys known without reading the state: read by the block
    before it wrote them, or implied by a record head it read. The state holds a
    record's versions and its compartment entry only once its head exists (``rec/`` keys
    are never deleted), and a version above the head's only once the head names it
    (``record.put`` writes version ``head + 1`` and the head together): so a record with
    no head has neither, and a version above its head does not exist yet."""
    olds: dict[str, bytes | None] = {}
    for key in writes:
        if key in known:
            olds[key] = known[key]
        elif key.startswith("ver/"):
            record, _, version = key[4:].rpartition("/")
            head = known.get(f"rec/{record}", _UNREAD)
            if head is None or (isinstance(head, bytes)
                                and int(version) > loads(head)["v"]):
                olds[key] = None
        elif key.startswith("pat/"):
            parts = key.split("/", 3)
            if len(parts) == 4 and known.get(f"rec/{parts[2]}/{parts[3]}", _UNREAD) is None:
                olds[key] = None
    return olds


def block_header(block: BlockInput, results: list[Result], writes: Mapping[str, bytes | None],
                 audit_events: list[bytes], state_acc: bytes | None = None,
                 writes_root: bytes | None = None) -> dict[str, Any]:
    """``writes_root``: the root of ``writes`` when the caller has it (``block_digests``)."""
    if writes_root is None:
        writes_root = merkle.root([_write_leaf(k, v) for k, v in sorted(writes.items())])
    roots = {
        "tx_root": merkle.root(block.txs).hex(),
        # codes and data only: human log wording may change between versions
        "results_root": merkle.root([canonical([r.code, r.data]) for r in results]).hex(),
        "writes_root": writes_root.hex(),
        "audit_root": merkle.root(audit_events).hex(),
        "state_digest": multiset.digest(block.prev_state_acc if state_acc is None
                                        else state_acc),
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
    """State writes for genesis: ``app_state = {"orgs": [...], "retention"?: {...}}``."""
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
    retention = app_state.get("retention")
    if retention is not None:
        put_json(overlay, "policy/retention", _retention_rules(retention))
    return overlay.writes


def _retention_rules(rules: Any) -> dict[str, int]:
    if not isinstance(rules, dict):
        raise InvalidInput("genesis retention must map categories to seconds")
    for cat, secs in rules.items():
        if cat not in policy.CATEGORIES:
            raise InvalidInput(f"genesis retention: unknown category {cat!r}")
        if not isinstance(secs, int) or isinstance(secs, bool) or secs < 0:
            raise InvalidInput(f"genesis retention for {cat}: seconds must be an integer >= 0")
    return dict(rules)


def genesis_state_acc(writes: Mapping[str, bytes | None]) -> bytes:
    return multiset.of_items((k, v) for k, v in writes.items() if v is not None)


def genesis_app_hash(chain: str, writes: Mapping[str, bytes | None]) -> bytes:
    """The app hash of the genesis state: its writes root and state digest, bound to the
    chain id."""
    header = block_header(BlockInput(chain, 0, 0, (), b"", b""), [], writes, [],
                          genesis_state_acc(writes))
    return sha256(canonical({"chain": chain, "genesis_writes_root": header["writes_root"],
                             "state_digest": header["state_digest"]}))


# ---------------------------------------------------------------- transactions

def check_tx(state: st.StateReader, raw: bytes, chain: str, height: int, time_ns: int,
             verified: Container[bytes] = (), decoded: Tx | None = None) -> Result:
    """Mempool check: the tx would apply against ``state`` now (writes discarded)."""
    return apply_tx(Overlay(state), raw, _Ctx(chain, height, time_ns, admission=True),
                    verified, decoded)


def apply_tx(overlay: Overlay, raw: bytes, ctx: _Ctx, verified: Container[bytes] = (),
             decoded: Tx | None = None) -> Result:
    """Apply one raw tx; every failure becomes a result code with a human log.
    ``decoded``: ``decode_tx(raw)`` if the caller has it already."""
    scratch = Overlay(overlay)
    audit_mark, validator_mark = len(ctx.audit), len(ctx.validator_updates)
    try:
        tx = decoded if decoded is not None and decoded.raw == raw else decode_tx(raw)
        signer = authenticate(scratch, tx, ctx.chain, verified)
        scratch.put(f"n/{tx.signer}/{tx.nonce}", tx.hash_hex.encode())
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
    if not st.is_active(signer):
        raise UnknownSigner(f"{tx.signer} was deactivated; its key signs nothing any more")
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


def _need_hash(body: Mapping[str, Any], key: str, what: str) -> str:
    value = _need(body, key, str, what)
    if not HASH_RE.match(value):
        raise InvalidInput(f"{what}: {key!r} must be a SHA-256 hash in lowercase hex")
    return str(value)


def _need_ids(body: Mapping[str, Any], key: str, what: str) -> list[str]:
    values = _need(body, key, list, what)
    if not values or not all(isinstance(v, str) and ID_RE.match(v) for v in values) \
            or values != sorted(set(values)):
        raise InvalidInput(f"{what}: {key!r} must be a non-empty sorted list of unique ids")
    return list(values)


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
    api_url = o.get("api_url")
    if api_url is not None:
        if not isinstance(api_url, str) or len(api_url) > 200 or not api_url.startswith(
                ("http://", "https://")):
            raise InvalidInput("organisation api_url must be an http(s) URL of at most 200 "
                               "characters")
        entry["api_url"] = api_url.rstrip("/")
    if o.get("node_ids") is not None:  # its CometBFTs' p2p ids: members admit these only
        entry["node_ids"] = _node_ids(o, "organisation")
    return entry


MAX_NODE_IDS = 16


def _node_ids(body: Mapping[str, Any], what: str) -> list[str]:
    ids = body.get("node_ids")
    if not isinstance(ids, list) or len(ids) > MAX_NODE_IDS or ids != sorted(set(ids)) \
            or not all(isinstance(i, str) and NODE_ID_RE.match(i) for i in ids):
        raise InvalidInput(f"{what}: node_ids must be a sorted list of at most "
                           f"{MAX_NODE_IDS} unique CometBFT node ids (40 lowercase hex "
                           "digits each)")
    return list(ids)


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


def _apply_org_nodes(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                     tx: Tx, ctx: _Ctx) -> str | None:
    """An organisation names its CometBFT nodes (a replacement, a second one): the
    members' nodes admit only the nodes their ledger names (``state.peer_admitted``)."""
    _need_org(sid, signer, "org.nodes")
    entry = st.org(s, sid)
    if entry is None:
        raise NotFound(f"no organisation {sid}")
    entry["node_ids"] = _node_ids(body, "org.nodes")
    put_json(s, f"org/{sid}", entry)
    return str(len(entry["node_ids"]))


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
                             "registered_at": ctx.now_s, "status": "active"}
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


def _identity_target(s: Overlay, sid: str, signer: dict[str, Any], aid: str,
                     what: str) -> dict[str, Any]:
    """The actor or organisation ``aid`` that ``sid`` may manage: itself, or an actor of
    the signing organisation."""
    target = st.principal(s, aid)
    if target is None:
        raise NotFound(f"{what}: no actor or organisation {aid}")
    if sid == aid or (signer["kind"] == "org" and target.get("org") == sid
                      and target["kind"] != "org"):
        return target
    raise Forbidden(f"{what}: {sid} may not manage {aid} (only {aid} itself or its "
                    "organisation may)")


def _apply_actor_deactivate(s: Overlay, sid: str, signer: dict[str, Any],
                            body: Mapping[str, Any], tx: Tx, ctx: _Ctx) -> str | None:
    """An actor leaves (or its key is compromised): its key signs nothing and its
    tokens stop working at once, on every node."""
    what = "actor.deactivate"
    aid = _need_id(body, "id", what)
    reason = body.get("reason")
    if reason not in DEACTIVATION_REASONS:
        raise InvalidInput(f"{what}: reason must be one of {sorted(DEACTIVATION_REASONS)}")
    target = _identity_target(s, sid, signer, aid, what)
    if target["kind"] == "org":
        raise Forbidden(f"{what}: organisations leave by governance, not by deactivation")
    if not st.is_active(target):
        raise Conflict(f"{aid} is already deactivated")
    target.update(status="inactive", deactivated_at=ctx.now_s, deactivated_by=sid,
                  deactivated_reason=reason)
    put_json(s, f"actor/{aid}", target)
    return aid


def _apply_key_rotate(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                      tx: Tx, ctx: _Ctx) -> str | None:
    """New signing and encryption keys for an actor or organisation; the old ones are
    kept in ``keyhist/`` (old data keys stay wrapped to them until re-wrapped)."""
    what = "key.rotate"
    aid = _need_id(body, "id", what)
    target = _identity_target(s, sid, signer, aid, what)
    if not st.is_active(target):
        raise Forbidden(f"{what}: {aid} is deactivated")
    sign_pub, enc_pub = _need(body, "sign_pub", str, what), _need(body, "enc_pub", str, what)
    b64d(sign_pub, field="sign_pub", size=32)
    b64d(enc_pub, field="enc_pub", size=32)
    if sign_pub == target["sign_pub"] and enc_pub == target["enc_pub"]:
        raise Conflict(f"{what}: the new keys are the current keys")
    n = int(target.get("keys_v", 0))
    put_json(s, f"keyhist/{aid}/{n:04d}", {"sign_pub": target["sign_pub"],
                                            "enc_pub": target["enc_pub"],
                                            "until_ns": ctx.time_ns, "by": sid})
    target.update(sign_pub=sign_pub, enc_pub=enc_pub, keys_v=n + 1)
    kind = target.pop("kind")
    put_json(s, f"org/{aid}" if kind == "org" else f"actor/{aid}",
             target if kind == "org" else {**target, "kind": kind})
    return str(n + 1)


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
    patient = None if body.get("patient") is None else _need_id(body, "patient", what)
    category = _need(body, "category", str, what)
    labels = _need(body, "labels", list, what)
    b64d(_need(body, "commitment", str, what), field=f"{what} commitment", size=32)
    blob = _need_hash(body, "blob", what)
    size = _need(body, "size", int, what)
    readers = _need_ids(body, "readers", what)
    break_glass = body.get("break_glass", False)
    if not isinstance(break_glass, bool):
        raise InvalidInput(f"{what}: break_glass must be true or false")
    if not 0 < size <= MAX_BLOB_BYTES:
        raise InvalidInput(f"{what}: blob size must be 1-{MAX_BLOB_BYTES} bytes")
    if category not in policy.CATEGORIES:
        raise InvalidInput(f"{what}: unknown category {category!r}")
    # Type check first: sorted()/set() raise TypeError on mixed or unhashable items.
    if not all(isinstance(x, str) for x in labels) or labels != sorted(set(labels)):
        raise InvalidInput(f"{what}: labels must be sorted unique strings")
    if (patient is None) != (category == policy.DIRECTORY):
        raise InvalidInput(f"{what}: a record without a patient is a directory record "
                           f"(category {policy.DIRECTORY!r}) and only such a record has none")
    if patient is None and labels:
        raise InvalidInput(f"{what}: directory records carry no sensitivity labels")
    if patient is not None and patient not in readers:
        raise InvalidInput(f"{what}: the data key must be wrapped to the patient {patient}")
    if rtype == "Patient" and rid != patient:
        raise InvalidInput(f"{what}: a Patient record's id must be the patient id")

    org_id, author = _writer(s, sid, signer, body)
    role = policy.writer_role(signer, author)
    writer = author or policy.org_writer(org_id)
    if role is None:
        raise Forbidden(f"{writer['id']} has no clinical role and may not write records")
    if patient is not None:
        pat = st.actor(s, patient)
        if pat is None or pat["kind"] != "patient":
            raise NotFound(f"patient {patient} is not registered")
    _check_readers(s, readers, patient, org_id, what)
    head = st.record_head(s, rtype, rid)
    same = head is not None and head["patient"] == patient
    # authorised first: a refused writer learns nothing about what the id holds
    decision = policy.decide_write(s, writer, role, patient, category, labels, ctx.now_s,
                                   head if same else None, break_glass)
    if not decision.allowed:
        raise Forbidden(decision.reason)
    if head is not None and not same:
        raise Conflict(f"{rtype}/{rid} belongs to "
                       + ("the directory" if head["patient"] is None else "another patient"))
    if head is None:
        if version != 1 or prev != "":
            raise Conflict(f"{rtype}/{rid} does not exist; the first version must be 1 with no "
                           "previous hash")
    elif version != head["v"] + 1 or prev != head["hash"]:
        raise Conflict(f"version conflict on {rtype}/{rid}: the ledger is at version "
                       f"{head['v']}, this write expected {version - 1}")
    meta = {"type": rtype, "id": rid, "v": version, "hash": sha256(canonical(dict(body))).hex(),
            "prev": prev, "patient": patient, "category": category, "labels": labels,
            "org": org_id, "author": writer["id"], "tx": tx.hash_hex, "op": ctx.op,
            "time_ns": ctx.time_ns, "blob": blob, "size": size, "readers": readers,
            "commitment": body["commitment"]}
    if decision.break_glass:
        meta["break_glass"] = True
    encoded = canonical(meta)  # the head and the version hold the same entry
    s.put(f"rec/{rtype}/{rid}", encoded)
    s.put(st.version_key(rtype, rid, version), encoded)
    if patient is not None:
        s.put(f"pat/{patient}/{rtype}/{rid}", b"1")
    return f"{rtype}/{rid}/_history/{version}"


def _check_readers(s: Overlay, readers: list[str], patient: str | None, org_id: str,
                   what: str) -> None:
    """Keys go to the patient and member organisations only, the writer's among them."""
    if org_id not in readers:
        raise InvalidInput(f"{what}: the data key must be wrapped to the writing "
                           f"organisation {org_id}")
    for r in readers:
        if r == patient:
            continue
        o = st.org(s, r)
        if o is None or o["status"] != "active":
            raise InvalidInput(f"{what}: reader {r} is neither the patient nor an active "
                               "member organisation")


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


# --- erasure (crypto-shredding: nodes delete the blobs of what is marked here)

def _apply_record_erase(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                        tx: Tx, ctx: _Ctx) -> str | None:
    """Mark versions erased. Every node then deletes their sealed blobs (ciphertext and
    wrapped keys); the chain keeps ids, metadata and commitments (ADR 4)."""
    what = "record.erase"
    patient = _need_id(body, "patient", what)
    basis = body.get("basis")
    if basis not in ERASURE_BASES:
        raise InvalidInput(f"{what}: basis must be one of {sorted(ERASURE_BASES)}")
    pat = st.actor(s, patient)
    if pat is None or pat["kind"] != "patient":
        raise NotFound(f"patient {patient} is not registered")
    if not (signer["kind"] == "patient" and sid == patient) and not (
            signer["kind"] == "org" and st.has_care(s, patient, sid)):
        raise Forbidden(f"{what}: only patient {patient}, or an organisation caring for them "
                        "acting on their documented request, may erase their records")
    targets = _erase_targets(s, patient, body, what)
    rules = st.retention_rules(s)
    versions = [m for t, i in targets for m in st.record_versions(s, t, i) if not st.erased(m)]
    for m in versions:
        _check_retention(m, rules, ctx)
    if not versions:
        raise Conflict(f"{what}: nothing left to erase in this scope (already erased)")
    mark = {"at": ctx.time_ns, "by": sid, "basis": basis, "tx": tx.hash_hex}
    gone = set()
    for m in versions:
        m["erased"] = mark
        put_json(s, st.version_key(m["type"], m["id"], m["v"]), m)
        head = st.record_head(s, m["type"], m["id"])
        if head is not None and head["v"] == m["v"]:
            put_json(s, f"rec/{m['type']}/{m['id']}", m)
        gone.add((m["type"], m["id"], m["v"]))
    for grant in st.shares_of(s, patient):
        if not grant["revoked"] and any(tuple(r) in gone for r in grant["records"]):
            grant.update(revoked=True, revoked_ns=ctx.time_ns, revoked_reason="erased")
            put_json(s, f"share/{grant['id']}", grant)
    scope = {k: body[k] for k in ("records", "category", "all") if body.get(k) is not None}
    put_json(s, f"erasure/{patient}/{tx.hash_hex}", {**mark, "scope": scope,
                                                      "versions": len(versions)})
    return str(len(versions))


def _erase_targets(s: Overlay, patient: str, body: Mapping[str, Any], what: str
                   ) -> list[tuple[str, str]]:
    scopes = [k for k in ("records", "category", "all") if body.get(k) is not None]
    if len(scopes) != 1:
        raise InvalidInput(f"{what}: give exactly one of records, category or all")
    if body.get("all") is not None:
        if body["all"] is not True:
            raise InvalidInput(f"{what}: all must be true")
        return st.patient_records(s, patient)
    if body.get("category") is not None:
        category = body["category"]
        if category not in policy.CATEGORIES:
            raise InvalidInput(f"{what}: unknown category {category!r}")
        return [(t, i) for t, i in st.patient_records(s, patient)
                if (h := st.record_head(s, t, i)) is not None and h["category"] == category]
    refs = _need(body, "records", list, what)
    if not 1 <= len(refs) <= MAX_ERASE_RECORDS:
        raise InvalidInput(f"{what}: 1-{MAX_ERASE_RECORDS} records")
    out = []
    for ref in refs:
        t, _, i = ref.partition("/") if isinstance(ref, str) else ("", "", "")
        head = st.record_head(s, t, i) if t and i else None
        if head is None or head["patient"] != patient:
            raise NotFound(f"{what}: {ref!r} is not a record of patient {patient}")
        out.append((t, i))
    return out


def _check_retention(meta: dict[str, Any], rules: Mapping[str, int], ctx: _Ctx) -> None:
    keep_s = rules.get(meta["category"])
    if keep_s is None:
        return
    until_ns = meta["time_ns"] + keep_s * 1_000_000_000
    if until_ns > ctx.time_ns:
        until = datetime.fromtimestamp(until_ns // 1_000_000_000, UTC).strftime("%Y-%m-%d")
        raise Forbidden(f"retention rule '{meta['category']}: keep {keep_s // 86400} days' "
                        f"keeps {meta['type']}/{meta['id']} version {meta['v']} until {until}; "
                        "it cannot be erased before then")


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


# --- share links (the payload stays with the issuing node: ADR 4 section 3)

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
    if exp is not None and (not isinstance(exp, int) or isinstance(exp, bool)
                            or exp <= ctx.now_s):
        raise InvalidInput(f"{what}: exp must be a future time in epoch seconds")
    payload = _need_hash(body, "payload", what)
    node = _need_id(body, "node", what)
    issuer = st.org(s, node)
    if issuer is None or issuer["status"] != "active":
        raise InvalidInput(f"{what}: node {node} is not an active member organisation")
    passcode = body.get("passcode")
    if not isinstance(passcode, bool):
        raise InvalidInput(f"{what}: passcode must be true or false (the verifier stays "
                           "with the issuing node)")
    attempts = body.get("max_attempts", 10)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 100:
        raise InvalidInput(f"{what}: max_attempts must be 1-100")
    records = _share_records(s, patient, _need(body, "records", list, what), what)
    grant = {"id": share_id, "patient": patient, "exp": exp, "node": node,
             "payload": payload, "passcode": passcode,
             "attempts_left": attempts if passcode else None, "records": records,
             "revoked": False, "created_ns": ctx.time_ns, "tx": tx.hash_hex}
    put_json(s, f"share/{share_id}", grant)
    s.put(f"pshare/{patient}/{share_id}", b"1")
    return str(share_id)


def _share_records(s: Overlay, patient: str, records: list[Any], what: str
                   ) -> list[list[Any]]:
    if not 1 <= len(records) <= MAX_BATCH_OPS:
        raise InvalidInput(f"{what}: 1-{MAX_BATCH_OPS} records")
    out = []
    for r in records:
        ok = (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str)
              and isinstance(r[1], str) and isinstance(r[2], int))
        meta = st.record_version(s, r[0], r[1], r[2]) if ok else None
        if meta is None or meta["patient"] != patient:
            raise InvalidInput(f"{what}: {r!r} is not a record version of patient {patient}")
        if st.erased(meta):
            raise Gone(f"{what}: {r[0]}/{r[1]} version {r[2]} was erased")
        out.append([r[0], r[1], r[2]])
    return out


def _apply_share_revoke(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                        tx: Tx, ctx: _Ctx) -> str | None:
    share_id = _need(body, "id", str, "share.revoke")
    grant = st.share(s, share_id)
    if grant is None:
        raise NotFound(f"no share {share_id}")
    _need_patient_self(sid, signer, grant["patient"], "revoking a share link")
    if grant["revoked"]:
        raise Conflict(f"share {share_id} is already revoked")
    grant.update(revoked=True, revoked_ns=ctx.time_ns, revoked_reason="patient")
    put_json(s, f"share/{share_id}", grant)
    return str(share_id)


def _apply_share_attempt(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                         tx: Tx, ctx: _Ctx) -> str | None:
    """A wrong passcode, counted by the node that issued the link (it alone checks)."""
    _need_org(sid, signer, "share.attempt")
    share_id = _need(body, "id", str, "share.attempt")
    grant = st.share(s, share_id)
    if grant is None:
        raise NotFound(f"no share {share_id}")
    if grant["node"] != sid:
        raise Forbidden(f"share.attempt: only {grant['node']}, which issued the link, counts "
                        "its passcode attempts")
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
    rows = [_audit_row(ev, i, sid) for i, ev in enumerate(events)]
    for epoch, wrapped in _audit_keys(body.get("keys")).items():
        if s.get(f"akey/{sid}/{epoch}") is None:  # the first anchor of an epoch publishes it
            put_json(s, f"akey/{sid}/{epoch}", wrapped)
    ctx.audit.extend(rows)
    return str(len(rows))


def _audit_row(ev: Any, i: int, sid: str) -> tuple[str, str | None, str, bytes]:
    if not isinstance(ev, dict) or not {"id", "recorded", "action", "agent"} <= set(ev):
        raise InvalidInput(f"audit.anchor: event {i} needs id, recorded, action and agent")
    if not all(isinstance(ev[f], str) and 0 < len(ev[f]) <= 64
               for f in ("id", "recorded", "action", "agent")):
        raise InvalidInput(f"audit.anchor: event {i}: id, recorded, action and agent must "
                           "be non-empty strings of at most 64 characters")
    extra = set(ev) - AUDIT_FIELDS
    if extra:
        raise InvalidInput(f"audit.anchor: event {i} has fields not allowed on the ledger: "
                           f"{sorted(extra)} (free text travels sealed in 'x')")
    if ev.get("x") is not None and (not isinstance(ev["x"], str) or len(ev["x"]) > 4096):
        raise InvalidInput(f"audit.anchor: event {i}: x must be sealed text of at most "
                           "4096 characters")
    if ev.get("node") != sid:
        raise Forbidden(f"audit.anchor: event {i} was recorded by {ev.get('node')}, "
                        f"not by the signer {sid}")
    patient = ev.get("patient")
    return (str(ev["id"]), patient if isinstance(patient, str) else None,
            str(ev["recorded"]), canonical(ev))


def _audit_keys(keys: Any) -> dict[str, dict[str, str]]:
    """``{epoch: {org: wrapped key}}``: the node's audit free-text keys, wrapped."""
    if keys is None:
        return {}
    if not isinstance(keys, dict) or len(keys) > 8:
        raise InvalidInput("audit.anchor: keys must map at most 8 epochs to wrapped keys")
    for epoch, wrapped in keys.items():
        if not ID_RE.match(epoch) or not isinstance(wrapped, dict) or not all(
                isinstance(o, str) and isinstance(k, str) and len(k) <= 200
                for o, k in wrapped.items()):
            raise InvalidInput("audit.anchor: keys must map epoch ids to {org: wrapped key}")
    return keys


# --- key re-wrapping for organisations that joined later, or rotated patient keys

MAX_REWRAP_ITEMS = 2000


def _apply_record_rewrap(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                         tx: Tx, ctx: _Ctx) -> str | None:
    """An organisation that can open record versions wraps their data keys to a member
    that joined after they were sealed (or to the patient's rotated key). The wrapped
    key is a blob (off-chain); the ledger stores its hash per (version, reader,
    wrapper), so a bad wrap by one member cannot block a good one by another."""
    what = "record.rewrap"
    _need_org(sid, signer, what)
    items = _need(body, "items", list, what)
    if not 1 <= len(items) <= MAX_REWRAP_ITEMS:
        raise InvalidInput(f"{what}: 1-{MAX_REWRAP_ITEMS} items per tx")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidInput(f"{what}: item {i} must be an object")
        where = f"{what} item {i}"
        rtype = _need(item, "type", str, where)
        rid = _need_id(item, "id", where)
        version = _need(item, "version", int, where)
        reader = _need_id(item, "reader", where)
        key = _need_hash(item, "key", where)
        meta = st.record_version(s, rtype, rid, version)
        if meta is None:
            raise NotFound(f"{where}: {rtype}/{rid} has no version {version}")
        if st.erased(meta):
            raise Gone(f"{where}: {rtype}/{rid} version {version} was erased")
        if reader != meta["patient"]:
            target = st.org(s, reader)
            if target is None or target["status"] != "active":
                raise Forbidden(f"{where}: {reader} is not an active member organisation "
                                "or the record's patient")
        put_json(s, f"wrap/{rtype}/{rid}/{version:010d}/{reader}/{sid}", {"key": key})
    return str(len(items))


# --- batches and staged imports

_BATCHABLE = frozenset({"actor.register", "record.put"})


def _check_ops(ops: Any, what: str, limit: int = MAX_BATCH_OPS) -> list[dict[str, Any]]:
    if not isinstance(ops, list) or not 1 <= len(ops) <= limit:
        raise InvalidInput(f"{what}: 1-{limit} operations")
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or not isinstance(op.get("kind"), str) or op.get(
                "kind") not in _BATCHABLE or not isinstance(
                op.get("body"), dict) or set(op) != {"kind", "body"}:
            raise InvalidInput(f"{what} op {i}: must be {{kind, body}} with kind in "
                               f"{sorted(_BATCHABLE)}")
    return ops


class _OpsView(Overlay):
    """``s`` itself — the same base, the same pending writes — for applying the
    operations of one batch or staged import, remembering the reads those operations
    cannot change. ``actor.register`` and ``record.put`` (``_BATCHABLE``) never write an
    organisation or a consent, and write an actor or a care relationship only where
    there was none: so organisations and consent scans are read once, and actors and
    care relationships once they exist. A large import checks the same patient,
    writer and readers for every one of its records; every decision stays the one a
    fresh read gives (the state before the tx, consents of earlier txs included)."""

    def __init__(self, s: Overlay) -> None:  # shares s's state: no super().__init__
        self.base = s.base
        self.writes = s.writes
        self._gets: dict[str, bytes | None] = {}
        self._scans: dict[str, list[tuple[str, bytes]]] = {}
        self._ahead: dict[str, bytes | None] = {}

    def read_ahead(self, ops: list[dict[str, Any]]) -> None:
        """Read the heads of the records ``ops`` put in one batch (``get_many``), rather
        than one store read each as the operations come to them."""
        keys = [f"rec/{b['type']}/{b['id']}" for op in ops if op["kind"] == "record.put"
                and isinstance(b := op["body"], dict) and isinstance(b.get("type"), str)
                and isinstance(b.get("id"), str)]
        self._ahead = self.base.get_many(keys) if isinstance(self.base, Overlay) else {}

    def get(self, key: str) -> bytes | None:
        value = self._gets.get(key, _UNREAD)
        if value is not _UNREAD:
            return value  # type: ignore[return-value]
        if key not in self.writes and key in self._ahead:
            return self._ahead[key]  # as the base holds it: the tx has not written it
        value = super().get(key)
        if key.startswith("org/") or (value is not None and key.startswith(("actor/",
                                                                            "care/"))):
            self._gets[key] = value
        return value

    def scan(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        if not prefix.startswith("consent/"):
            return super().scan(prefix)
        rows = self._scans.get(prefix)
        if rows is None:
            rows = self._scans[prefix] = list(super().scan(prefix))
        return iter(rows)


def _apply_ops(s: Overlay, sid: str, signer: dict[str, Any], ops: list[dict[str, Any]],
               tx: Tx, ctx: _Ctx, what: str, first: int = 0) -> None:
    view = s if isinstance(s, _OpsView) else _OpsView(s)
    view.read_ahead(ops)
    for i, op in enumerate(ops, first):
        ctx.op = i
        try:
            _HANDLERS[op["kind"]](view, sid, signer, op["body"], tx, ctx)
        except MedledgerError as err:
            err.message = f"{what} op {i}: {err.message}"
            raise
        finally:
            ctx.op = None


def _apply_batch(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                 tx: Tx, ctx: _Ctx) -> str | None:
    """All-or-nothing list of operations signed once (transaction Bundles)."""
    _need_org(sid, signer, "batch")
    ops = _check_ops(body.get("ops"), "batch")
    _apply_ops(s, sid, signer, ops, tx, ctx, "batch")
    return str(len(ops))


def _open_import(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                 what: str) -> tuple[str, dict[str, Any]]:
    _need_org(sid, signer, what)
    iid = _need_id(body, "id", what)
    entry = get_json(s, f"imp/{iid}")
    if entry is None:
        raise NotFound(f"{what}: no import {iid}")
    if entry["org"] != sid:
        raise Forbidden(f"{what}: import {iid} belongs to {entry['org']}")
    if entry["status"] != "open":
        raise Conflict(f"{what}: import {iid} is already {entry['status']}")
    return iid, entry


def _apply_import_begin(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                        tx: Tx, ctx: _Ctx) -> str | None:
    """Open a staged import: its parts are held invisibly until ``import.commit``."""
    what = "import.begin"
    _need_org(sid, signer, what)
    iid = _need_id(body, "id", what)
    parts = _need(body, "parts", int, what)
    if len(iid) < 16:
        raise InvalidInput(f"{what}: an import id has at least 16 characters")
    if not 1 <= parts <= MAX_IMPORT_PARTS:
        raise InvalidInput(f"{what}: 1-{MAX_IMPORT_PARTS} parts")
    if s.get(f"imp/{iid}") is not None:
        raise Conflict(f"{what}: import {iid} exists")
    put_json(s, f"imp/{iid}", {"id": iid, "org": sid, "parts": parts, "received": 0,
                               "ops": 0, "status": "open", "begun_ns": ctx.time_ns})
    return iid


def _apply_import_part(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                       tx: Tx, ctx: _Ctx) -> str | None:
    what = "import.part"
    iid, entry = _open_import(s, sid, signer, body, what)
    seq = _need(body, "seq", int, what)
    if not 0 <= seq < entry["parts"]:
        raise InvalidInput(f"{what}: seq must be 0-{entry['parts'] - 1}")
    key = f"stage/{iid}/{seq:06d}"
    if s.get(key) is not None:
        raise Conflict(f"{what}: part {seq} of import {iid} was already received")
    ops = _check_ops(body.get("ops"), what)
    if entry["ops"] + len(ops) > MAX_IMPORT_OPS:
        raise InvalidInput(f"{what}: an import holds at most {MAX_IMPORT_OPS} operations")
    s.put(key, canonical(ops))
    entry.update(received=entry["received"] + 1, ops=entry["ops"] + len(ops))
    put_json(s, f"imp/{iid}", entry)
    return f"{entry['received']}/{entry['parts']}"


def _apply_import_commit(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                         tx: Tx, ctx: _Ctx) -> str | None:
    """Apply every staged operation in part order, all or nothing; drop the stage."""
    what = "import.commit"
    iid, entry = _open_import(s, sid, signer, body, what)
    if entry["received"] != entry["parts"]:
        raise Conflict(f"{what}: import {iid} has {entry['received']} of {entry['parts']} "
                       "parts")
    if ctx.admission:
        return str(entry["ops"])
    s = _OpsView(s)  # one view for every part: the same patients and writers recur
    first = 0
    for seq in range(entry["parts"]):
        key = f"stage/{iid}/{seq:06d}"
        raw = s.get(key)
        assert raw is not None  # received == parts and parts are unique
        ops = loads(raw)
        _apply_ops(s, sid, signer, ops, tx, ctx, f"import {iid} part {seq}", first)
        first += len(ops)
        s.put(key, None)
    entry.update(status="committed", committed_ns=ctx.time_ns)
    put_json(s, f"imp/{iid}", entry)
    return str(first)


def _apply_import_abort(s: Overlay, sid: str, signer: dict[str, Any], body: Mapping[str, Any],
                        tx: Tx, ctx: _Ctx) -> str | None:
    what = "import.abort"
    iid, entry = _open_import(s, sid, signer, body, what)
    for key, _ in list(s.scan(f"stage/{iid}/")):
        s.put(key, None)
    entry.update(status="aborted", aborted_ns=ctx.time_ns)
    put_json(s, f"imp/{iid}", entry)
    return iid


# --- key recovery (ADR 7): Shamir shares held by guardians, k approvals on the ledger

MIN_GUARDIANS, MAX_GUARDIANS = 2, 16  # SLIP-39: at most 16 shares per group
MAX_RECOVERY_REQUEST_S = 30 * 86400
RECOVERY_SCHEMES = frozenset({"slip39-v1"})


def _recovery_setup(s: Overlay, patient: str) -> dict[str, Any] | None:
    setup = get_json(s, f"recovery/{patient}")
    return setup if setup is not None and setup["status"] == "active" else None


def _need_guardian(s: Overlay, gid: str, patient: str, what: str) -> None:
    entry = st.principal(s, gid)
    if gid == patient:
        raise InvalidInput(f"{what}: a patient cannot be their own guardian")
    if entry is None or not st.is_active(entry):
        raise InvalidInput(f"{what}: guardian {gid} is neither an active member organisation "
                           "nor an active registered person")


def _apply_recovery_setup(s: Overlay, sid: str, signer: dict[str, Any],
                          body: Mapping[str, Any], tx: Tx, ctx: _Ctx) -> str | None:
    """A patient splits their key k-of-n among guardians; each guardian's share is
    sealed to that guardian's X25519 key and kept off-chain (this tx names its hash).
    A new setup replaces the previous one and cancels its open requests."""
    what = "recovery.setup"
    patient = _need_id(body, "patient", what)
    _need_patient_self(sid, signer, patient, "a key recovery setup")
    if body.get("scheme") not in RECOVERY_SCHEMES:
        raise InvalidInput(f"{what}: scheme must be one of {sorted(RECOVERY_SCHEMES)}")
    guardians = _need_ids(body, "guardians", what)
    threshold = _need(body, "threshold", int, what)
    if not MIN_GUARDIANS <= len(guardians) <= MAX_GUARDIANS:
        raise InvalidInput(f"{what}: {MIN_GUARDIANS}-{MAX_GUARDIANS} guardians")
    if not 2 <= threshold <= len(guardians):
        raise InvalidInput(f"{what}: the threshold must be 2-{len(guardians)} (no guardian "
                           "may recover alone)")
    for g in guardians:
        _need_guardian(s, g, patient, what)
    shares = _need(body, "shares", dict, what)
    if sorted(shares) != guardians or not all(
            isinstance(h, str) and HASH_RE.match(h) for h in shares.values()):
        raise InvalidInput(f"{what}: shares must map every guardian to the SHA-256 hash of "
                           "their sealed share")
    old = _recovery_setup(s, patient)
    if old is not None:
        old.update(status="superseded", ended_ns=ctx.time_ns)
        put_json(s, f"recovery/{patient}", old)
        _end_open_requests(s, patient, "cancelled", ctx, "superseded by a new setup")
    setup = {"id": tx.hash_hex, "patient": patient, "scheme": body["scheme"],
             "threshold": threshold, "guardians": guardians, "shares": dict(shares),
             "keys_v": int(signer.get("keys_v", 0)), "created_ns": ctx.time_ns,
             "status": "active"}
    put_json(s, f"recovery/{patient}", setup)
    return tx.hash_hex


def _apply_recovery_revoke(s: Overlay, sid: str, signer: dict[str, Any],
                           body: Mapping[str, Any], tx: Tx, ctx: _Ctx) -> str | None:
    what = "recovery.revoke"
    patient = _need_id(body, "patient", what)
    _need_patient_self(sid, signer, patient, "revoking key recovery")
    setup = _recovery_setup(s, patient)
    if setup is None:
        raise NotFound(f"{what}: patient {patient} has no active recovery setup")
    setup.update(status="revoked", ended_ns=ctx.time_ns)
    put_json(s, f"recovery/{patient}", setup)
    _end_open_requests(s, patient, "cancelled", ctx, "recovery revoked by the patient")
    return str(setup["id"])


def _end_open_requests(s: Overlay, patient: str, status: str, ctx: _Ctx, why: str) -> None:
    for key, _ in list(s.scan(f"precovery/{patient}/")):
        req = get_json(s, f"recoveryreq/{key.rsplit('/', 1)[1]}")
        if req is not None and req["status"] == "open":
            req.update(status=status, ended_ns=ctx.time_ns, reason=why)
            put_json(s, f"recoveryreq/{req['id']}", req)


def _apply_recovery_request(s: Overlay, sid: str, signer: dict[str, Any],
                            body: Mapping[str, Any], tx: Tx, ctx: _Ctx) -> str | None:
    """Someone who lost their key asks for it back: opened by an organisation caring for
    the patient (it proofed their identity) or by one of their guardians. ``enc_pub`` is
    a fresh X25519 key of the requester's client: guardians seal their shares to it."""
    what = "recovery.request"
    patient = _need_id(body, "patient", what)
    rid = _need(body, "id", str, what)
    if not 16 <= len(rid) <= 64 or not ID_RE.match(rid):
        raise InvalidInput(f"{what}: id must be 16-64 url-safe characters")
    b64d(_need(body, "enc_pub", str, what), field=f"{what} enc_pub", size=32)
    exp = _need(body, "exp", int, what)
    if not ctx.now_s < exp <= ctx.now_s + MAX_RECOVERY_REQUEST_S:
        raise InvalidInput(f"{what}: exp must be in the future and at most "
                           f"{MAX_RECOVERY_REQUEST_S // 86400} days ahead")
    setup = _recovery_setup(s, patient)
    if setup is None:
        raise NotFound(f"{what}: patient {patient} has not set up key recovery")
    cares = signer["kind"] == "org" and st.has_care(s, patient, sid)
    if not cares and sid not in setup["guardians"]:
        raise Forbidden(f"{what}: only an organisation caring for {patient} or one of their "
                        f"guardians may open a recovery request, not {sid}")
    pat = st.actor(s, patient)
    assert pat is not None  # a setup exists, so the patient signed it
    if int(pat.get("keys_v", 0)) != setup["keys_v"]:
        raise Conflict(f"{what}: {patient}'s keys were rotated after the recovery setup; "
                       "the shares open the old key (set recovery up again)")
    if get_json(s, f"recoveryreq/{rid}") is not None:
        raise Conflict(f"{what}: request {rid} exists")
    for key, _ in s.scan(f"precovery/{patient}/"):
        other = get_json(s, f"recoveryreq/{key.rsplit('/', 1)[1]}")
        if other is not None and other["status"] == "open" and other["exp"] > ctx.now_s:
            raise Conflict(f"{what}: request {other['id']} for {patient} is still open")
    req = {"id": rid, "patient": patient, "setup": setup["id"], "by": sid,
           "enc_pub": body["enc_pub"], "exp": exp, "threshold": setup["threshold"],
           "approvals": {}, "created_ns": ctx.time_ns, "status": "open"}
    put_json(s, f"recoveryreq/{rid}", req)
    s.put(f"precovery/{patient}/{rid}", b"1")
    return str(rid)


def _open_request(s: Overlay, body: Mapping[str, Any], what: str, ctx: _Ctx
                  ) -> dict[str, Any]:
    rid = _need(body, "id", str, what)
    req = get_json(s, f"recoveryreq/{rid}") if ID_RE.match(rid) else None
    if req is None:
        raise NotFound(f"{what}: no recovery request {rid}")
    if req["status"] != "open":
        raise Conflict(f"{what}: recovery request {rid} is {req['status']}")
    if req["exp"] <= ctx.now_s:
        raise Gone(f"{what}: recovery request {rid} expired")
    return req


def _apply_recovery_approve(s: Overlay, sid: str, signer: dict[str, Any],
                            body: Mapping[str, Any], tx: Tx, ctx: _Ctx) -> str | None:
    """A guardian approves: it re-sealed its share to the request's ``enc_pub`` and
    names that sealed share's hash (the share itself stays off-chain)."""
    what = "recovery.approve"
    req = _open_request(s, body, what, ctx)
    share = _need_hash(body, "share", what)
    setup = _recovery_setup(s, req["patient"])
    if setup is None or setup["id"] != req["setup"]:
        raise Conflict(f"{what}: the recovery setup of this request was replaced")
    if sid not in setup["guardians"]:
        raise Forbidden(f"{what}: {sid} is not a guardian of {req['patient']}")
    if sid in req["approvals"]:
        raise Conflict(f"{what}: {sid} already approved request {req['id']}")
    req["approvals"] = {**req["approvals"], sid: share}
    put_json(s, f"recoveryreq/{req['id']}", req)
    return f"{len(req['approvals'])}/{req['threshold']}"


def _apply_recovery_complete(s: Overlay, sid: str, signer: dict[str, Any],
                             body: Mapping[str, Any], tx: Tx, ctx: _Ctx) -> str | None:
    """The recovered key signs: the patient holds it again (proof of recovery)."""
    what = "recovery.complete"
    req = _open_request(s, body, what, ctx)
    _need_patient_self(sid, signer, req["patient"], "completing a key recovery")
    if len(req["approvals"]) < req["threshold"]:
        raise Conflict(f"{what}: {len(req['approvals'])} of {req['threshold']} guardian "
                       "approvals")
    req.update(status="completed", ended_ns=ctx.time_ns)
    put_json(s, f"recoveryreq/{req['id']}", req)
    return str(req["id"])


def _apply_recovery_cancel(s: Overlay, sid: str, signer: dict[str, Any],
                           body: Mapping[str, Any], tx: Tx, ctx: _Ctx) -> str | None:
    """The patient (who still holds their key) or the requester calls a request off."""
    what = "recovery.cancel"
    req = _open_request(s, body, what, ctx)
    if sid not in (req["patient"], req["by"]):
        raise Forbidden(f"{what}: only {req['patient']} or {req['by']}, which opened it, may "
                        "cancel this request")
    req.update(status="cancelled", ended_ns=ctx.time_ns,
               reason="cancelled by the patient" if sid == req["patient"]
               else f"cancelled by {sid}")
    put_json(s, f"recoveryreq/{req['id']}", req)
    return str(req["id"])


_HANDLERS: dict[str, Handler] = {
    "org.propose": _apply_org_propose,
    "org.approve": _apply_org_approve,
    "org.nodes": _apply_org_nodes,
    "actor.register": _apply_actor_register,
    "actor.deactivate": _apply_actor_deactivate,
    "key.rotate": _apply_key_rotate,
    "record.put": _apply_record_put,
    "record.erase": _apply_record_erase,
    "consent.put": _apply_consent_put,
    "consent.revoke": _apply_consent_revoke,
    "share.create": _apply_share_create,
    "share.revoke": _apply_share_revoke,
    "share.attempt": _apply_share_attempt,
    "audit.anchor": _apply_audit_anchor,
    "record.rewrap": _apply_record_rewrap,
    "batch": _apply_batch,
    "import.begin": _apply_import_begin,
    "import.part": _apply_import_part,
    "import.commit": _apply_import_commit,
    "import.abort": _apply_import_abort,
    "recovery.setup": _apply_recovery_setup,
    "recovery.revoke": _apply_recovery_revoke,
    "recovery.request": _apply_recovery_request,
    "recovery.approve": _apply_recovery_approve,
    "recovery.complete": _apply_recovery_complete,
    "recovery.cancel": _apply_recovery_cancel,
}
