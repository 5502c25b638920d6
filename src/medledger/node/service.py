"""The node: everything an organisation's medledger node does, behind one object.

Routes (``api``) and commands (``cli``) call these methods and nothing else.
A ``Node`` owns the store, the ledger application, a submitter (solo producer or
CometBFT), this organisation's keys, the authenticator and the auditor. Every
read, search, write, consent change, share use and denial produces an audit
event, durably, before the method returns.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from medledger.core import policy, proofs
from medledger.core import state as st
from medledger.core.machine import MAX_BATCH_OPS
from medledger.core.tx import decode_tx, make_tx
from medledger.crypto import envelope, freetext, keys, localseal
from medledger.crypto.canonical import b64d, b64e, canonical, loads, sha256
from medledger.crypto.kdf import derive_key
from medledger.errors import (
    BadSignature,
    Conflict,
    Forbidden,
    Gone,
    IntegrityError,
    InvalidInput,
    MedledgerError,
    NotFound,
    PreconditionFailed,
    Replay,
    StorageError,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UnknownSigner,
)
from medledger.fhir import ips, match
from medledger.fhir.labels import classify, patient_of
from medledger.fhir.validate import parse_resource
from medledger.node import audit as audit_mod
from medledger.node import idempotency, onboarding, recovery, shares
from medledger.node.audit import Auditor
from medledger.node.auth import LOGIN_FAILED, Authenticator, LoginGuard, Session
from medledger.node.batching import Batched
from medledger.node.home import Config, Home
from medledger.node.ledger_app import LedgerApp
from medledger.node.records import open_any, rewrap_key, seal_record
from medledger.node.replica import Replicator
from medledger.search.compartment import directory_type
from medledger.search.engine import SearchResult
from medledger.search.extract import Extracted
from medledger.search.service import NodeSearch
from medledger.storage.blobs import BlobStore, blob_hash
from medledger.storage.files import write_private
from medledger.storage.sqlite import SqliteStore

if TYPE_CHECKING:
    from medledger.node.bundles import BundleResult

log = logging.getLogger(__name__)

_ERRORS_BY_CODE: dict[int, type[MedledgerError]] = {
    c.code: c for c in (InvalidInput, BadSignature, UnknownSigner, Replay, Unauthenticated,
                        Forbidden, NotFound, Conflict, PreconditionFailed, Gone, TooLarge,
                        IntegrityError, StorageError, Unavailable)}


def error_for(code: int, message: str) -> MedledgerError:
    return _ERRORS_BY_CODE.get(code, MedledgerError)(message)


class Submitter(Protocol):
    async def submit(self, raw: bytes) -> Any: ...


@dataclass(frozen=True)
class Stored:
    """A record version as the API returns it."""

    resource: dict[str, Any]
    meta: dict[str, Any]
    created: bool = True

    @property
    def version(self) -> int:
        return int(self.meta["v"])

    @property
    def last_updated(self) -> str:
        return iso(self.meta["time_ns"])


class Prepared(NamedTuple):
    """A prepared write: the ``record.put`` body (None if unchanged), the head, the resource."""

    body: dict[str, Any] | None
    head: dict[str, Any] | None
    resource: dict[str, Any]


@dataclass(frozen=True)
class PutJob:
    """An authorised write waiting to be sealed (``seal_record``): the resource with its
    new meta, who may read it, and the ``record.put`` body without the seal's fields."""

    resource: dict[str, Any]
    patient: str | None
    version: int
    readers: dict[str, bytes]
    body: dict[str, Any]
    head: dict[str, Any] | None

    def prepared(self, seal_fields: dict[str, Any]) -> Prepared:
        """The write once sealed (its blob stored): body = metadata + commitment fields."""
        return Prepared({**self.body, **seal_fields}, self.head, self.resource)


@dataclass
class BulkWrite:
    """What the writes of one Bundle share, looked up once instead of per entry: the
    writer and its role, each patient's readers, each entry's (category, labels)
    computed where it was validated (``fhir.bundle``, on the worker pool), the heads of
    its records read in one batch (``heads``: a record absent there is new; a write
    committed meanwhile is caught by the ledger's version check, as ever), and the
    policy decisions on its new records (``decisions``, see ``Node._authorise_put``)."""

    writer: tuple[dict[str, Any], policy.Role]
    readers: dict[str | None, dict[str, bytes]]
    kind: tuple[str, frozenset[str]] | None = None
    heads: dict[tuple[str, str], dict[str, Any]] | None = None
    decisions: dict[tuple[Any, ...], policy.Decision] = field(default_factory=dict)

    def head(self, store: st.StateReader, rtype: str, rid: str) -> dict[str, Any] | None:
        if self.heads is not None:
            return self.heads.get((rtype, rid))
        return st.record_head(store, rtype, rid)


def iso(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


ANCHOR_MAX_BYTES = 512 * 1024
# An import part (the whole signed tx) stays inside CometBFT's defaults: mempool
# max_tx_bytes (1 MiB) and the RPC request that carries it base64-encoded in JSON
# (rpc.max_body_bytes, 1,000,000 bytes): 4/3 x 720 KiB + the envelope < 1,000,000.
STAGE_PART_BYTES = 720 * 1024
class Node:
    def __init__(self, home: Home, config: Config, store: SqliteStore, app: LedgerApp,
                 org: keys.Identity, clock: Callable[[], float] = time.time,
                 blobs: BlobStore | None = None) -> None:
        self.home = home
        self.config = config
        self.store = store
        self.app = app
        self.org = org
        self.chain = app.chain
        self.clock = clock
        self.started_s = clock()  # files older than this were left by an earlier run
        self.blobs = blobs if blobs is not None else BlobStore(home.blobs_path)
        self.replica = Replicator(self)
        app.on_commit.append(self.replica.on_commit)
        app.on_commit.append(lambda applied, _txs: recovery.on_commit(self, applied))
        self.on_erase: list[Callable[[list[dict[str, Any]]], None]] = []
        self.submitter: Submitter | None = None
        # a live session's principal is read through the ledger's state cache (any
        # thread may read it) on every request; token requests read the store
        self.auth = Authenticator(store, lambda: self.config.base_url + "/auth/token",
                                  config.token_ttl_s, clock, store.use_assertion,
                                  sessions_state=app.state)
        # seals the chain head and the local audit log (checked by node/startcheck.py)
        store.set_seal_key(localseal.derive_seal_key(org.secret_root, config.chain))
        self.auditor = Auditor(store, org.id, clock, org.secret_root)
        self.login_guard = LoginGuard(
            clock, workers=int(config.extra.get("login_workers", 1)),
            first_backoff_s=float(config.extra.get("login_first_backoff_s", 1)),
            max_cpu_share=float(config.extra.get("login_max_cpu_share", 0.5)))
        self.anchor_interval_s = 0.5
        self._epoch_keys: dict[tuple[str, str], bytes | None] = {}
        self._search: NodeSearch | None = None
        self.integrity_failure: str | None = None
        self.catching_up: str | None = None  # set while behind the network (node.erasure)
        self.validator_pool: Executor | None = None
        # a write's FHIR validation: on the pool, one job per worker for the writes of one
        # turn of the event loop (sealing there too measured no faster: it stays inline)
        self._validate = Batched(parse_resource, self._off_loop, lambda: self.validator_workers)
        self.pool_jobs = 0  # ``_off_loop`` calls waiting for the pool
        self.validator_workers = 1  # the pool's processes (1 without a pool)
        self._share_locks: dict[str, asyncio.Lock] = {}
        # locks a rotated organisation identity into keystore bytes (``open_node`` passes
        # one that holds the keystore password); None: keys cannot be rotated here
        self.seal_org: Callable[[keys.Identity], bytes] | None = None
        self._jobs: set[asyncio.Task[Any]] = set()
        app.on_commit.append(self.on_commit_keys)
        self.journal = idempotency.Journal(store)
        self.bundle_journal = idempotency.BundleJournal(store)

    # ------------------------------------------------------------ plumbing
    @property
    def now_s(self) -> int:
        return int(self.clock())

    def _nonce(self) -> str:
        return os.urandom(16).hex()

    async def submit(self, identity: keys.Identity, kind: str, body: dict[str, Any]) -> Any:
        """Sign as ``identity``, submit, wait for commit; raise the mapped error if refused."""
        if self.submitter is None:
            raise Unavailable("this node has no consensus driver running")
        if self.integrity_failure:
            raise Unavailable(f"node refuses to serve: {self.integrity_failure}")
        req = idempotency.current()
        if req is not None:  # a retried request resubmits, or answers with, its first tx
            return await idempotency.submit_once(self, req, identity, kind, body)
        tx = make_tx(identity.id, identity.signer(), self.chain, kind, body, self._nonce())
        return await self.submit_raw(tx.raw)

    async def submit_raw(self, raw: bytes) -> Any:
        if self.submitter is None:
            raise Unavailable("this node has no consensus driver running")
        if idempotency.current() is not None:
            first = idempotency.committed_outcome(self.store, sha256(raw))
            if first is not None:
                return first
        committed = await self.submitter.submit(raw)
        if committed.code != 0:
            raise error_for(committed.code, committed.log)
        return committed

    def _caller(self, session: Session) -> policy.Caller:
        """The session's principal as the ledger has it now, with the token's scopes:
        what every ``core.policy`` decision is asked about."""
        entry = st.principal(self.app.state, session.actor_id)
        if entry is None:
            raise Unauthenticated(f"{session.actor_id} is no longer registered")
        return policy.Caller(entry, session.scopes)

    def _allowed(self, session: Session, decision: policy.Decision, subtype: str,
                 patient: str | None, entity: Iterable[str] = ()) -> policy.Decision:
        """``decision`` if it allows; else audit the denial (in the patient's log, with the
        full reason) and raise it — naming the rule only to a caller who may see the
        patient (``Decision.disclose``), a generic refusal to anyone else."""
        if decision.allowed:
            return decision
        raise self._deny(session, subtype, patient, list(entity), decision.reason,
                         shown=decision.reason if decision.disclose else policy.NOT_VISIBLE)

    def _need_scope(self, session: Session, rtype: str, interaction: str,
                    subtype: str = "search") -> None:
        """The token must allow ``interaction`` on ``rtype`` (``policy.decide_interaction``;
        kept for callers outside this module, e.g. the search package)."""
        self._allowed(session, policy.decide_interaction(self._caller(session), rtype,
                                                         interaction), subtype, None)

    def _audit(self, session: Session, subtype: str, patient: str | None, entity: list[str],
               outcome: str = "0", **kw: Any) -> dict[str, Any]:
        ev = self.auditor.event(subtype, agent=session.actor_id, agent_org=session.org,
                                agent_role=session.role or session.kind, patient=patient,
                                entity=entity, outcome=outcome, **kw)
        self.auditor.record(ev)
        return ev

    def _deny(self, session: Session, subtype: str, patient: str | None, entity: list[str],
              reason: str, shown: str | None = None) -> Forbidden:
        self._audit(session, subtype, patient, entity, outcome="4", reason=reason,
                    basis="denied")
        return Forbidden(reason if shown is None else shown)

    def readers_for(self, patient: str | None) -> dict[str, bytes]:
        """Who a new version's data key is wrapped to: the member orgs and the patient
        (directory records: the member orgs only)."""
        readers = {o["id"]: b64d(o["enc_pub"]) for o in st.active_orgs(self.store)}
        pat = st.actor(self.store, patient) if patient is not None else None
        if pat is not None:
            readers[str(patient)] = b64d(pat["enc_pub"])
        return readers

    def blob_of(self, meta: dict[str, Any]) -> bytes:
        """The sealed blob of a version, from this node's blob store."""
        if st.erased(meta):
            mark = meta["erased"]
            raise Gone(f"{meta['type']}/{meta['id']} version {meta['v']} was erased on "
                       f"{iso(mark['at'])[:10]} ({mark['basis']}); only its ledger metadata "
                       "remains")
        blob = self.blobs.get(meta["blob"])
        if blob is None:
            raise Unavailable(f"the content of {meta['type']}/{meta['id']} has not been "
                              f"replicated to this node yet; try again shortly")
        return blob

    async def ensure_blobs(self, metas: Iterable[dict[str, Any]]) -> None:
        """Fetch from member nodes any blob these versions need that is not here yet."""
        await self.replica.ensure(metas)

    def decrypt(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Open a version as this node's organisation (callers decide policy first), with
        its current key or one it held before a rotation."""
        blob = self.blob_of(meta)
        if self.org.id in meta["readers"]:
            return open_any(self.chain, meta, blob, self.org.id, self.org.enc_privates)
        # sealed before this organisation joined: a member may have re-wrapped the key
        failure: MedledgerError = Forbidden(
            f"{meta['type']}/{meta['id']} v{meta['v']} was sealed before {self.org.id} joined "
            "and no member has re-wrapped its key yet (`medledger org rewrap`)")
        prefix = f"wrap/{meta['type']}/{meta['id']}/{meta['v']:010d}/{self.org.id}/"
        for _, raw in self.store.scan(prefix):
            wrapped = self.blobs.get(loads(raw)["key"])
            if wrapped is None:
                failure = Unavailable(f"the re-wrapped key of {meta['type']}/{meta['id']} has "
                                      "not been replicated to this node yet")
                continue
            try:
                return open_any(self.chain, meta, blob, self.org.id, self.org.enc_privates,
                                [wrapped])
            except MedledgerError as err:  # a bad wrap by one member: try the next
                failure = err
        raise failure

    async def rewrap_for(self, session: Session, target: str, chunk: int = 1000) -> int:
        """Wrap the data key of every record version this node can open to ``target``, an
        organisation that joined after they were sealed. Returns how many were wrapped."""
        self._allowed(session, policy.decide_node_admin(
            self._caller(session), self.org.id, "re-wrap its keys"), "admin", None)
        org = st.org(self.store, target)
        if org is None or org["status"] != "active":
            raise InvalidInput(f"{target} is not an active member organisation")
        target_pub = b64d(org["enc_pub"])
        items: list[dict[str, Any]] = []
        with envelope.BatchWrapper() as wrapper:
            for _, raw in self.store.scan("ver/"):
                meta = loads(raw)
                if st.erased(meta) or target in meta["readers"] or \
                        self.org.id not in meta["readers"]:
                    continue
                if any(True for _ in self.store.scan(
                        f"wrap/{meta['type']}/{meta['id']}/{meta['v']:010d}/{target}/")):
                    continue
                wrapped = self._rewrap(meta, target_pub, wrapper)
                self.blobs.put([(blob_hash(wrapped), wrapped)],
                               pending=f"{meta['type']}/{meta['id']}/{meta['v']}/key:{target}")
                items.append({"type": meta["type"], "id": meta["id"], "version": meta["v"],
                              "reader": target, "key": blob_hash(wrapped)})
        for part in iter_chunks(items, chunk):
            await self.submit(self.org, "record.rewrap", {"items": part})
        return len(items)

    def _rewrap(self, meta: dict[str, Any], target_pub: bytes,
                wrapper: envelope.BatchWrapper | None = None) -> bytes:
        """A version's data key (held inside its blob for this organisation) wrapped to
        another X25519 key; tried with every key this organisation has held."""
        failure: MedledgerError = Forbidden(f"{meta['type']}/{meta['id']} cannot be opened")
        for private in self.org.enc_privates:
            try:
                return rewrap_key(self.blob_of(meta), self.org.id, private, target_pub,
                                  wrapper)
            except Forbidden as err:
                failure = err
        raise failure

    async def validate(self, data: Any, rtype: str) -> dict[str, Any]:
        """FHIR validation (the costliest step of a write: ~0.6 ms) on the worker pool,
        with the other writes of this turn of the event loop (``node.batching``)."""
        return await self._validate(data, rtype)  # type: ignore[no-any-return]

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a pure function on the validation process pool when there is one (the
        API server starts it: the node's own loop stays free for ledger work)."""
        if self.validator_pool is None:
            return fn(*args)
        self.pool_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.validator_pool, fn,
                                                                    *args)
        finally:
            self.pool_jobs -= 1

    # ------------------------------------------------------------ identities
    async def register_practitioner(self, session: Session, actor_id: str, role: str,
                                    password: str) -> keys.Identity:
        self._allowed(session, policy.decide_node_admin(
            self._caller(session), self.org.id, "register its practitioners"), "admin", None)
        if role not in policy.ROLES:
            raise InvalidInput(f"role must be one of {', '.join(policy.ROLES)}")
        identity = keys.new_identity(actor_id, "practitioner", {"role": role})
        await self.submit(self.org, "actor.register", self._register_body(identity, role))
        keys.save_keystore(self.home.user_keystore(actor_id), identity, password)
        return identity

    @staticmethod
    def _register_body(identity: keys.Identity, role: str | None) -> dict[str, Any]:
        body = {"id": identity.id, "kind": identity.kind, "sign_pub": b64e(identity.sign_public),
                "enc_pub": b64e(identity.enc_public)}
        if role:
            body["role"] = role
        return body

    async def login(self, actor_id: str, password: str, client: str = "") -> tuple[str, Session]:
        """Password login (the portal): throttled per id and per client address, scrypt on
        the bounded login pool, one answer for an unknown id and a wrong password."""
        path = self.home.user_keystore(actor_id)  # a malformed id is a 400, not a guess
        self.login_guard.admit(actor_id, client)
        try:
            identity = await self.login_guard.hash_off_loop(_unlock_or_decoy, path, password)
            token, session = self.auth.login(identity)
        except (Unauthenticated, InvalidInput):
            raise Unauthenticated(LOGIN_FAILED, hint="a user without a password at this node "
                                  "signs in with their key file") from None
        self.login_guard.succeeded(actor_id, client)
        return token, session

    # ------------------------------------------------------------ search and $match
    @property
    def searcher(self) -> NodeSearch:
        """The search index, its sync worker and engine (opened on first use)."""
        if self._search is None:
            self._search = NodeSearch(self)
        return self._search

    @property
    def search_index_height(self) -> int | None:
        """The height the search index has reached, if it is open."""
        search = self._search
        return None if search is None else search.index.last_height

    def close_search(self) -> None:
        if self._search is not None:
            self._search.close()
            self._search = None

    async def match_patients(self, session: Session, resource: dict[str, Any],
                             only_certain: bool, count: int | None
                             ) -> list[tuple[dict[str, Any], match.MatchResult]]:
        return await self.searcher.match_patients(session, resource, only_certain, count)

    async def _duplicate_check(self, session: Session, resource: dict[str, Any]
                               ) -> tuple[str | None, str]:
        return await self.searcher.duplicate_check(session, resource)

    def duplicate_notice(self, session: Session, existing: str, grade: str) -> str:
        """What a registrar is told about an already registered patient its new one matches:
        the id only if it may see that patient, else that one exists. Audited in that
        patient's log either way (a registration is a probe)."""
        caller = self._caller(session)
        visible = policy.may_see_patient(self.store, caller.actor, existing, self.now_s)
        self._audit(session, "register", existing, [f"Patient/{existing}"],
                    outcome="4" if grade == "certain" else "0",
                    detail=f"registration matched this patient ({grade} match); "
                    + ("id shown to the registrar" if visible else "id not shown"))
        if grade == "probable":
            return ("probable duplicate of Patient/" + existing if visible else
                    "probable duplicate of a patient registered in the network (not visible "
                    "to you; ask the patient, or their provider, to link the records)")
        if visible:
            return (f"this patient is already registered as Patient/{existing} (certain "
                    "match); link to it with Patient.link or update it instead")
        return ("a patient with these demographics is already registered in the network "
                "(certain match) and is not visible to you; ask the patient for a consent, "
                "or their provider to link the records, instead of registering them again")

    async def _patient_ops(self, resource: dict[str, Any], password: str | None
                           ) -> tuple[list[dict[str, Any]], keys.Identity, str]:
        """actor.register op for a new patient; saves their keystore at this node (off the
        loop: a password's scrypt is ~0.1 s of CPU; an escrow's ~1 ms, ADR 7)."""
        pid = resource["id"]
        if st.principal(self.store, pid) is not None:
            raise Conflict(f"id {pid} is already registered (not as this patient)")
        identity = keys.new_identity(pid, "patient")
        ops = [{"kind": "actor.register", "body": self._register_body(identity, None)}]
        if password is None:  # imported: escrowed until the patient activates (ADR 7)
            await self._off_loop(onboarding.escrow_keystore, self.home, self.org.secret_root,
                                 identity, self.clock())
            return ops, identity, ""
        # exclusive: never replace someone's keystore (a concurrent or hostile create)
        await self._off_loop(keys.save_keystore, self.home.user_keystore(pid), identity,
                             password, keys.DEFAULT_SCRYPT_N, True)
        return ops, identity, password

    # ------------------------------------------------------------ writes
    def _writer_of(self, session: Session) -> tuple[dict[str, Any], policy.Role]:
        """(writer entry, role) a write is judged by: a practitioner of this node's
        organisation, or the organisation itself (bulk import)."""
        writer = policy.decide_writer(self._caller(session), self.org.id)
        if not writer.decision.allowed or writer.entry is None or writer.role is None:
            raise Forbidden(writer.decision.reason)
        return writer.entry, writer.role

    def _record_kind(self, resource: dict[str, Any], patient: str | None,
                     kind: tuple[str, frozenset[str]] | None = None
                     ) -> tuple[str | None, str, list[str]]:
        """(patient, category, labels): a patient record, or a directory record (ADR 5).
        ``kind``: the resource's (category, labels) when already computed."""
        if kind is None:
            cls = classify(resource)
            patient, kind = patient or cls.patient_id, (cls.category, cls.labels)
        else:
            patient = patient or patient_of(resource)
        if patient is not None:
            return patient, kind[0], sorted(kind[1])
        rtype = resource["resourceType"]
        if not directory_type(rtype):
            raise InvalidInput(f"{rtype} must reference its patient (subject/patient): it "
                               "belongs in a patient compartment")
        return None, policy.DIRECTORY, []

    async def _prepare_put(self, session: Session, resource: dict[str, Any], rid: str,
                           if_match: int | None, patient_override: str | None = None,
                           new_patient_key: bytes | None = None,
                           break_glass: str | None = None) -> Prepared:
        """Authorise, then build a ``record.put`` body and store its sealed blob locally
        (body None when the content is identical to the head)."""
        job = await self._authorise_put(session, resource, rid, if_match, patient_override,
                                        new_patient_key, break_glass)
        if isinstance(job, Prepared):
            return job
        fields, blob = seal_record(self.chain, job.resource, job.patient, job.version,
                                   job.readers)
        # stored before the ledger references it; "pending" until a commit does
        self.blobs.put([(fields["blob"], blob)],
                       pending=f"{resource['resourceType']}/{rid}/{job.version}")
        self.index_hint(fields["blob"], None, job.resource)
        return job.prepared(fields)

    def index_hint(self, blob: str, values: Extracted | None,
                   resource: dict[str, Any] | None) -> None:
        """Tell the search index what the version sealed as ``blob`` holds, so it is not
        decrypted again when it commits (``IndexSync.expect``)."""
        if self._search is not None:
            self._search.sync.expect(blob, values, resource)

    async def _authorise_put(self, session: Session, resource: dict[str, Any], rid: str,
                             if_match: int | None, patient_override: str | None = None,
                             new_patient_key: bytes | None = None,
                             break_glass: str | None = None, bulk: BulkWrite | None = None
                             ) -> PutJob | Prepared:
        """Everything of a write but the sealing (which bulk imports do on the worker
        pool): policy, preconditions, the version, its metadata and readers. Identical
        content to the head answers ``Prepared`` with no body. Policy reads committed state
        through the ledger's own cache (``LedgerApp.state``: a patient's consents and care
        relationships, read by every write about them)."""
        rtype = resource["resourceType"]
        resource = {**resource, "id": rid}
        patient, category, labels = self._record_kind(resource, patient_override,
                                                      bulk.kind if bulk else None)
        head = bulk.head(self.store, rtype, rid) if bulk is not None else st.record_head(
            self.app.state, rtype, rid)
        writer, role = bulk.writer if bulk is not None else self._writer_of(session)
        if break_glass is not None and len(break_glass.strip()) < policy.BREAK_GLASS_MIN_REASON:
            raise InvalidInput("break-the-glass needs a reason of at least "
                               f"{policy.BREAK_GLASS_MIN_REASON} characters")
        now_s = self.now_s
        # A new record's decision depends on nothing else of it: a Bundle's are taken once
        # per patient, kind and second (the ledger decides each again when it commits).
        memo = (patient, category, tuple(labels), now_s, new_patient_key is not None) \
            if bulk is not None and head is None and break_glass is None else None
        decision = bulk.decisions.get(memo) if bulk is not None and memo is not None else None
        if decision is None:
            state: st.StateReader = self.app.state
            if new_patient_key is not None and patient is not None:  # registered by this batch
                state = st.Overlay(self.app.state)
                state.put(f"care/{patient}/{self.org.id}", b"1")
            # authorised before anything about the current content is looked at (no oracle)
            decision = policy.decide_write(state, writer, role, patient, category, labels,
                                           now_s, head, break_glass is not None)
            if bulk is not None and memo is not None:
                bulk.decisions[memo] = decision
        if not decision.allowed:
            raise self._deny(session, "create" if head is None else "update", patient,
                             [f"{rtype}/{rid}"], decision.reason)
        if if_match is not None and (head is None or head["v"] != if_match):
            raise PreconditionFailed(f"If-Match version {if_match} but {rtype}/{rid} is at "
                                     f"version {head['v'] if head else 'none (new)'}")
        if head is not None and not st.erased(head):
            await self.ensure_blobs([head])
            current = self.decrypt(head)
            if _content(current) == _content(resource):
                return Prepared(None, head, current)
        version = 1 if head is None else head["v"] + 1
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = audit_mod.iso_now(self.clock)
        security = {(s.get("system"), s.get("code")) for s in meta.get("security", [])}
        for label in labels:
            system = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
            if (system, label) not in security and label not in ("R", "V", "N"):
                meta.setdefault("security", []).append({"system": system, "code": label})
        resource["meta"] = meta
        if bulk is None:
            readers = self.readers_for(patient)
        else:
            if patient not in bulk.readers:
                bulk.readers[patient] = self.readers_for(patient)
            readers = dict(bulk.readers[patient])
        if new_patient_key is not None and patient is not None:
            readers[patient] = new_patient_key
        body = {"type": rtype, "id": rid, "version": version,
                "prev": "" if head is None else head["hash"], "patient": patient,
                "category": category, "labels": labels,
                "author": session.actor_id if session.kind == "practitioner" else self.org.id}
        if decision.break_glass:
            body["break_glass"] = True
        return PutJob(resource, patient, version, readers, body, head)

    async def submit_ops(self, ops: list[dict[str, Any]]) -> None:
        """Commit ``actor.register``/``record.put`` ops all or nothing: one ``batch`` tx when
        it fits in a tx, else a staged import (ADR 4 section 5)."""
        if not ops:
            return
        body = {"ops": ops}
        # config extra "import_part_bytes": match a smaller CometBFT mempool.max_tx_bytes
        part_bytes = min(int(self.config.extra.get("import_part_bytes", STAGE_PART_BYTES)),
                         STAGE_PART_BYTES)
        if len(ops) <= MAX_BATCH_OPS and len(canonical(body)) <= part_bytes:
            await self.submit(self.org, "batch", body)
            return
        parts = list(_parts(ops, part_bytes))
        iid = os.urandom(16).hex()
        await self.submit(self.org, "import.begin", {"id": iid, "parts": len(parts)})
        # a few parts in flight: blocks stay a few MB, so each commits quickly on a
        # network (flooding the mempool packs ~20 MB blocks that take rounds to agree)
        in_flight = asyncio.Semaphore(int(self.config.extra.get("import_parts_in_flight", 4)))

        async def submit_part(seq: int, part: list[dict[str, Any]]) -> None:
            async with in_flight:
                await self.submit(self.org, "import.part", {"id": iid, "seq": seq, "ops": part})

        try:
            await asyncio.gather(*(submit_part(i, part) for i, part in enumerate(parts)))
            await self.submit(self.org, "import.commit", {"id": iid})
        except MedledgerError:
            try:
                await self.submit(self.org, "import.abort", {"id": iid})
            except MedledgerError as err:  # aborted at the next start instead
                log.warning("could not abort staged import %s: %s", iid, err)
            raise

    async def abort_open_imports(self) -> int:
        """Abort this organisation's staged imports left open by a crash (at start)."""
        n = 0
        for _, raw in self.store.scan("imp/"):
            entry = loads(raw)
            if entry["org"] == self.org.id and entry["status"] == "open":
                await self.submit(self.org, "import.abort", {"id": entry["id"]})
                n += 1
        return n

    def _drop_blobs(self, bodies: Iterable[dict[str, Any] | None]) -> None:
        """Forget blobs sealed for writes the ledger refused (nothing references them)."""
        hashes = [b["blob"] for b in bodies if b is not None
                  and st.record_version(self.store, b["type"], b["id"], b["version"]) is None]
        self.blobs.delete(hashes)
        if self._search is not None:
            self._search.sync.forget(hashes)

    async def put_resource(self, session: Session, data: Any, rtype: str, rid: str | None,
                           if_match: int | None = None, password: str | None = None,
                           break_glass: str | None = None) -> Stored:
        """Create (``rid`` None) or update a record; identical content makes no new version."""
        new = rid is None or st.record_head(self.app.state, rtype, rid) is None
        self._allowed(session, policy.decide_write_scope(self._caller(session), rtype, new),
                      "create" if new else "update", None)
        self._writer_of(session)
        resource = await self.validate(data, rtype)
        if rid is not None and resource.get("id") not in (None, rid):
            raise InvalidInput(f"resource id {resource.get('id')!r} does not match the URL id "
                               f"{rid!r}")
        rid = rid or idempotency.next_record_id()
        ops: list[dict[str, Any]] = []
        warning, detail, patient_key, secret = None, "", None, None
        if rtype == "Patient" and new:
            resource["id"] = rid
            self._authorise_registration(session)
            warning, detail = await self._duplicate_check(session, resource)
            ops, identity, secret = await self._patient_ops(resource, password)
            patient_key = identity.enc_public
        try:
            body, head, sealed = await self._prepare_put(
                session, resource, rid, if_match, rid if rtype == "Patient" else None,
                patient_key, break_glass)
        except MedledgerError:
            if ops:
                self.home.user_keystore(rid).unlink(missing_ok=True)
            raise
        if body is None:
            assert head is not None
            self._audit(session, "update", head["patient"], [_ref(head)],
                        detail="identical content: no new version")
            return Stored(sealed, head, created=False)
        patient = body["patient"]
        try:
            if ops:
                await self.submit(self.org, "batch", {"ops": [*ops, {"kind": "record.put",
                                                                    "body": body}]})
            else:
                await self.submit(self.org, "record.put", body)
        except MedledgerError as err:
            # a 503 (Unavailable) may still commit, and a retry with the same
            # Idempotency-Key resubmits this very tx: keep what it needs
            if ops and not isinstance(err, Unavailable):  # the registration did not happen
                self.home.user_keystore(rid).unlink(missing_ok=True)
            if not isinstance(err, Unavailable):
                self._drop_blobs([body])
            self._audit(session, "create" if new else "update", patient,
                        [f"{rtype}/{rid}"], outcome="4" if err.http_status < 500 else "8",
                        reason=str(err))
            raise
        meta = st.record_head(self.app.state, rtype, rid)
        assert meta is not None
        self._audit(session, "register" if ops else ("create" if new else "update"), patient,
                    [_ref(meta)], detail=detail, break_glass=bool(meta.get("break_glass")),
                    reason=break_glass or "",
                    purpose="ETREAT" if meta.get("break_glass") else _purpose(session))
        stored = Stored(sealed, meta)  # what we sealed is what the ledger now holds
        if secret is not None:
            stored.meta["enrollment_secret"] = secret if password is None else ""
        if warning:
            stored.meta["duplicate_warning"] = detail
        return stored

    def _authorise_registration(self, session: Session) -> None:
        """Registering a patient: this node's organisation, or its staff who may write
        demographics."""
        self._allowed(session, policy.decide_registration(self._caller(session), self.org.id),
                      "register", None)

    async def process_bundle(self, session: Session, data: bytes | str) -> BundleResult:
        """A FHIR transaction (all or nothing) or batch (entry by entry) Bundle: see
        ``node.bundles``."""
        from medledger.node import bundles
        return await bundles.process_bundle(self, session, data)

    # ------------------------------------------------------------ reads
    def _decide(self, session: Session, meta: dict[str, Any], break_glass: str | None
                ) -> policy.Decision:
        """May this session read this record version (scopes, role, consent, care)?"""
        return policy.decide_record(self.store, self._caller(session), meta, self.now_s,
                                    break_glass)

    async def read(self, session: Session, rtype: str, rid: str, version: int | None = None,
                   break_glass: str | None = None) -> Stored:
        self._allowed(session, policy.decide_interaction(self._caller(session), rtype, "r"),
                      "read" if version is None else "vread", None)
        self._check_serving()
        meta = (st.record_head(self.app.state, rtype, rid) if version is None
                else st.record_version(self.store, rtype, rid, version))
        if meta is None:
            raise NotFound(f"{rtype}/{rid}" + (f" version {version}" if version else "")
                           + " does not exist")
        subtype = "read" if version is None else "vread"
        decision = self._allowed(session, self._decide(session, meta, break_glass), subtype,
                                 meta["patient"], [_ref(meta)])
        await self.ensure_blobs([meta])
        resource = self.decrypt(meta)
        self._audit(session, subtype, meta["patient"], [_ref(meta)], basis=decision.basis,
                    break_glass=decision.break_glass,
                    purpose="ETREAT" if decision.break_glass else _purpose(session),
                    reason=break_glass or "")
        return Stored(resource, meta)

    async def history(self, session: Session, rtype: str, rid: str,
                      break_glass: str | None = None) -> list[Stored]:
        caller = self._caller(session)
        self._allowed(session, policy.decide_interaction(caller, rtype, "r"), "history", None)
        self._check_serving()
        versions = st.record_versions(self.store, rtype, rid)
        if not versions:
            raise NotFound(f"{rtype}/{rid} does not exist")
        head = versions[-1]
        view = policy.decide_history(self.store, caller, versions, self.now_s, break_glass)
        decision = self._allowed(session, view.decision, "history", head["patient"],
                                 [f"{rtype}/{rid}"])
        hidden, erased = view.hidden, view.erased
        await self.ensure_blobs(view.shown)
        # every version decrypted on a worker thread: the event loop serves others meanwhile
        out = await asyncio.to_thread(lambda: [Stored(self.decrypt(m), m) for m in view.shown])
        self._audit(session, "history", head["patient"], [f"{rtype}/{rid}"],
                    basis=decision.basis, break_glass=decision.break_glass,
                    reason=break_glass or "", purpose="ETREAT" if decision.break_glass
                    else _purpose(session),
                    detail=", ".join(x for x in (
                        f"{hidden} older versions withheld" if hidden else "",
                        f"{erased} versions erased" if erased else "") if x))
        return out

    async def search(self, session: Session, rtype: str,
                     params: dict[str, str] | list[tuple[str, str]],
                     break_glass: str | None = None, subtype: str = "search",
                     strict: bool = False) -> SearchResult:
        """FHIR search over the records the caller may see; denied ones are reported withheld."""
        return await self.searcher.search(session, rtype, params, break_glass, subtype, strict)

    async def everything(self, session: Session, patient: str, break_glass: str | None = None
                         ) -> SearchResult:
        return await self.searcher.everything(session, patient, break_glass)

    def decide(self, session: Session, meta: dict[str, Any], break_glass: str | None
               ) -> policy.Decision:
        return self._decide(session, meta, break_glass)

    async def summary(self, session: Session, patient: str) -> dict[str, Any]:
        found = (await self.everything(session, patient)).found
        pat = [s.resource for s in found if s.meta["type"] == "Patient"]
        if not pat:
            raise Forbidden("the patient summary needs access to the Patient resource")
        others = [s.resource for s in found if s.meta["type"] != "Patient"]
        return ips.international_patient_summary(pat[0], others, audit_mod.iso_now(self.clock),
                                                 str(uuid.uuid4()),
                                                 base_url=self.config.base_url + "/fhir")

    async def export_sealed(self, session: Session, patient: str) -> list[dict[str, Any]]:
        """Every (not erased) record version of a patient with its sealed blob, for
        client-side decryption with the patient's own key (any node serves it)."""
        self._allowed(session, policy.decide_export(self._caller(session), patient), "export",
                      patient)
        metas = [m for t, i in st.patient_records(self.store, patient)
                 for m in st.record_versions(self.store, t, i) if not st.erased(m)]
        await self.ensure_blobs(metas)
        out = await asyncio.to_thread(lambda: [  # reads every blob: off the event loop
            {"meta": m, "blob": b64e(self.blob_of(m)),
             "rewrapped": self._rewrapped_to(m, patient)} for m in metas])
        self._audit(session, "export", patient, [], detail=f"{len(out)} sealed versions")
        return out

    def _rewrapped_to(self, meta: dict[str, Any], reader: str) -> list[str]:
        """The version's data key re-wrapped to ``reader`` later (e.g. after their key
        rotation), as held here."""
        hashes = st.rewrapped_keys(self.store, meta["type"], meta["id"], meta["v"], reader)
        return [b64e(k) for h in hashes if (k := self.blobs.get(h)) is not None]

    # ------------------------------------------------------------ consent
    def _patient_identity(self, session: Session, patient: str,
                          decision: policy.Decision | None = None,
                          subtype: str = "consent") -> keys.Identity:
        """The patient's key held by their password session, once ``decision`` (default:
        only that patient, ``policy.decide_patient_self``) allowed the act."""
        if decision is None:
            decision = policy.decide_patient_self(self._caller(session), patient,
                                                  "sign with their key")
        self._allowed(session, decision, subtype, patient)
        if session.identity is None:
            raise Forbidden("this session holds no patient key: log in with your password, or "
                            "sign the consent tx yourself and POST it to /ledger/tx")
        return session.identity

    async def put_consent(self, session: Session, rule: dict[str, Any]) -> dict[str, Any]:
        patient = str(rule.get("patient", ""))
        identity = self._patient_identity(
            session, patient, policy.decide_consent_change(self._caller(session), patient))
        rule = {**rule, "id": rule.get("id") or str(uuid.uuid4())}
        await self.submit(identity, "consent.put", rule)
        stored = st.get_json(self.store, f"consent/{patient}/{rule['id']}")
        assert stored is not None
        self._audit(session, "consent", patient, [f"Consent/{rule['id']}"],
                    detail=f"{stored['decision']} {','.join(stored['categories']) or 'all data'}")
        return stored

    async def revoke_consent(self, session: Session, patient: str, cid: str) -> dict[str, Any]:
        identity = self._patient_identity(
            session, patient, policy.decide_consent_change(self._caller(session), patient),
            "consent-revoke")
        await self.submit(identity, "consent.revoke", {"patient": patient, "id": cid})
        self._audit(session, "consent-revoke", patient, [f"Consent/{cid}"])
        stored = st.get_json(self.store, f"consent/{patient}/{cid}")
        assert stored is not None
        return stored

    def consents(self, session: Session, patient: str) -> list[dict[str, Any]]:
        """A patient's consent rules: for the patient, and for practitioners of an
        organisation caring for them (the rules themselves can reveal sensitive facts)."""
        self._allowed(session, policy.decide_consent_read(self.store, self._caller(session),
                                                          patient, self.org.id),
                      "consent-read", patient)
        rules = st.consents(self.store, patient)
        self._audit(session, "consent-read", patient, [f"Consent/{r['id']}" for r in rules])
        return rules

    # ------------------------------------------------------------ audit
    def audit_log(self, session: Session, patient: str, since: str = "", count: int = 100
                  ) -> list[tuple[dict[str, Any], int | None]]:
        self._allowed(session, policy.decide_audit_read(self._caller(session), patient,
                                                        self.org.id), "audit-read", patient)
        if not 1 <= count <= 1000:
            raise InvalidInput("_count must be between 1 and 1000")
        rows = self.store.audit_for_patient(patient, since, count)
        self._audit(session, "audit-read", patient, [], detail=f"{len(rows)} events")
        return [(self.open_event(loads(e)), h) for e, h in rows]

    def open_event(self, ev: dict[str, Any]) -> dict[str, Any]:
        """An audit event with its sealed free text restored (this node's own events, and
        other members' through the epoch keys they wrapped to this organisation)."""
        return audit_mod.open_event(ev, self._epoch_key)

    def _epoch_key(self, node: str, epoch: str) -> bytes | None:
        if node == self.org.id:
            return freetext.epoch_key(self.org.secret_root, epoch)
        cached = self._epoch_keys.get((node, epoch))
        if cached is None:
            wrapped = (st.get_json(self.store, f"akey/{node}/{epoch}") or {}).get(self.org.id)
            if wrapped is None:
                return None
            cached = self._unwrap_any(b64d(wrapped))
            self._epoch_keys[(node, epoch)] = cached
        return cached

    def _unwrap_any(self, wrapped: bytes) -> bytes:
        """A key wrapped to this organisation, with any key it has held (rotations)."""
        for private in self.org.enc_privates[:-1]:
            try:
                return envelope.unwrap_key(wrapped, private)
            except Forbidden:
                continue
        return envelope.unwrap_key(wrapped, self.org.enc_privates[-1])

    async def anchor_pending(self) -> int:
        """Anchor this node's unanchored audit events on the ledger (one tx)."""
        events: list[dict[str, Any]] = []
        size = 0
        for ev in self.auditor.pending(2000):  # stay well inside CometBFT's 1 MB tx limit
            size += len(canonical(ev))
            if events and size > ANCHOR_MAX_BYTES:
                break
            events.append(ev)
        if not events:
            return 0
        body: dict[str, Any] = {"events": events}
        keys_ = self._epoch_keys_to_publish({str(e["k"]) for e in events if e.get("k")})
        if keys_:
            body["keys"] = keys_
        await self.submit(self.org, "audit.anchor", body)
        return len(events)

    def _epoch_keys_to_publish(self, epochs: set[str]) -> dict[str, dict[str, str]]:
        """This node's audit free-text keys of ``epochs`` not yet on the ledger, wrapped to
        every active member organisation (itself included)."""
        out = {}
        members = st.active_orgs(self.store)
        for epoch in sorted(epochs):
            if self.store.get(f"akey/{self.org.id}/{epoch}") is not None:
                continue
            key = freetext.epoch_key(self.org.secret_root, epoch)
            out[epoch] = {o["id"]: b64e(envelope.wrap_key(key, b64d(o["enc_pub"])))
                          for o in members}
        return out

    async def anchor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.anchor_interval_s)
            try:
                await self.anchor_pending()
            except MedledgerError as err:
                log.warning("audit anchoring deferred: %s", err)
            except Exception:
                log.exception("audit anchoring failed")

    # ------------------------------------------------------------ share links
    @property
    def _passcode_key(self) -> bytes:
        return derive_key(self.org.secret_root, "shl passcode verifier v1")

    @property
    def _local_text_key(self) -> bytes:
        return derive_key(self.org.secret_root, "node-local free text v1")

    async def create_share(self, session: Session, selection: dict[str, Any],
                           exp: int | None, passcode: str | None, label: str,
                           recipient: str = "") -> tuple[str, dict[str, Any]]:
        """A share link made here with the patient's session key (the portal)."""
        patient = session.actor_id
        identity = self._patient_identity(
            session, patient, policy.decide_share_create(self._caller(session), patient,
                                                         patient), "share-create")
        if exp is not None and exp <= self.now_s:
            raise InvalidInput("the share's expiry must be in the future")
        shares.check_share_text(passcode, label, recipient)
        heads = [m for t, i in st.patient_records(self.store, patient)
                 if (m := st.record_head(self.store, t, i)) is not None and not st.erased(m)]
        await self.ensure_blobs(heads)
        chosen = shares.select([(self.decrypt(m), m) for m in heads], selection)
        body, jwe, link = shares.build_share(patient, chosen, self.config.base_url,
                                             audit_mod.iso_now(self.clock), exp, passcode,
                                             label, self.org.id)
        tx = make_tx(identity.id, identity.signer(), self.chain, "share.create", body,
                     self._nonce())
        grant = await self.publish_share(session, tx.raw, jwe, passcode, label, recipient)
        return link, grant

    async def publish_share(self, session: Session, raw_tx: bytes, jwe: str,
                            passcode: str | None, label: str, recipient: str
                            ) -> dict[str, Any]:
        """Keep a share's payload here (JWE, passcode verifier, sealed label/recipient),
        then submit its ``share.create`` tx signed by the patient (portal or CLI)."""
        tx = decode_tx(raw_tx)
        if tx.kind != "share.create":
            raise InvalidInput(f"expected a share.create tx, not {tx.kind}")
        self._allowed(session, policy.decide_share_create(
            self._caller(session), str(tx.body.get("patient")), tx.signer), "share-create",
            session.actor_id if session.kind == "patient" else None)
        shares.check_share_text(passcode, label, recipient)
        body = tx.body
        if body.get("node") != self.org.id:
            raise InvalidInput(f"this share names node {body.get('node')!r}; publish it at "
                               f"that node, or name this one ({self.org.id})")
        if body.get("payload") != sha256(jwe.encode("ascii")).hex():
            raise InvalidInput("the JWE does not match the share's payload commitment")
        if bool(body.get("passcode")) != (passcode is not None):
            raise InvalidInput("the share's passcode flag and the passcode given disagree")
        share_id = str(body.get("id"))
        verifier = (None if passcode is None
                    else shares.passcode_verifier(self._passcode_key, share_id, passcode))
        sealed = freetext.seal(self._local_text_key, ["share", share_id],
                               {"label": label, "recipient": recipient})
        self.blobs.put_share(share_id, jwe.encode("ascii"), verifier, sealed.encode("ascii"),
                             self.clock())
        try:
            await self.submit_raw(raw_tx)
        except MedledgerError:
            self.blobs.forget_share(share_id)
            raise
        grant = st.share(self.store, share_id)
        assert grant is not None
        self._audit(session, "share-create", session.actor_id,
                    [f"{t}/{i}/_history/{v}" for t, i, v in grant["records"]],
                    detail=f"share {share_id[:8]} exp {grant['exp']} "
                    f"{len(grant['records'])} records")
        return self._share_view(grant)

    def _share_view(self, grant: dict[str, Any]) -> dict[str, Any]:
        """A grant as its patient sees it: label and recipient where this node holds them."""
        view = {**grant, "label": "", "recipient": ""}
        sealed = self.blobs.share_meta([grant["id"]]).get(grant["id"])
        if sealed is not None:
            view.update(freetext.open_(self._local_text_key, ["share", grant["id"]],
                                       sealed.decode("ascii")))
        return view

    async def revoke_share(self, session: Session, share_id: str) -> dict[str, Any]:
        grant = st.share(self.store, share_id)
        if grant is None:
            raise NotFound(f"no share {share_id}")
        identity = self._patient_identity(
            session, grant["patient"], policy.decide_share_manage(self._caller(session), grant),
            "share-revoke")
        await self.submit(identity, "share.revoke", {"id": share_id})
        self._audit(session, "share-revoke", grant["patient"], [], detail=share_id[:8])
        revoked = st.share(self.store, share_id)
        assert revoked is not None
        return self._share_view(revoked)

    def shares(self, session: Session) -> list[dict[str, Any]]:
        decision = policy.decide_share_list(self._caller(session))
        if not decision.allowed:
            raise Forbidden(decision.reason)
        return [self._share_view(g) for g in st.shares_of(self.store, session.actor_id)]

    async def open_share(self, share_id: str, recipient: str, passcode: str | None
                         ) -> dict[str, Any]:
        """SHL manifest request: check the grant, count passcode failures, audit every use;
        release the JWE only when every check passes."""
        self._check_serving()
        grant = st.share(self.store, share_id)
        if grant is None or grant["node"] != self.org.id:
            raise NotFound("no such share link at this node")
        recipient = (recipient or "unnamed recipient")[:200]

        def audit(outcome: str, reason: str) -> None:
            # the recipient's name is free text: sealed in ``detail`` only, never the
            # plaintext agent of an event anchored on every member's ledger
            ev = self.auditor.event("share-access", agent=f"shl:{share_id[:8]}",
                                    agent_org="external",
                                    agent_role="share-recipient", patient=grant["patient"],
                                    entity=[f"{t}/{i}/_history/{v}" for t, i, v in
                                            grant["records"]],
                                    outcome=outcome, purpose="PATRQT", reason=reason,
                                    basis=f"share:{share_id[:8]}", detail=recipient)
            self.auditor.record(ev)

        self._share_open_or_gone(grant, audit)
        stored = self.blobs.share(share_id)
        if stored is None or not stored[0]:
            audit("4", "share payload no longer held")
            raise Gone("this share link's content is no longer held by this node")
        jwe, verifier, _ = stored
        if grant["passcode"]:
            if not passcode:  # asking without a passcode costs no attempt
                audit("4", "no passcode given")
                raise WrongPasscode(grant["attempts_left"] or 0, "this link needs its passcode")
            # one attempt at a time per link on this node, so concurrent guesses cannot all
            # pass the budget check before any failure is counted
            async with self._share_locks.setdefault(share_id, asyncio.Lock()):
                await self._check_passcode(share_id, passcode, verifier, audit)
        audit("0", f"opened by {recipient}")
        return {"files": [{"contentType": "application/fhir+json",
                           "embedded": jwe.decode("ascii")}]}

    def _share_open_or_gone(self, grant: dict[str, Any],
                            audit: Callable[[str, str], None]) -> None:
        """Refuse (audited, 410) a link the ledger says is revoked, expired or locked; an
        expired link's payload is dropped here at once."""
        decision = policy.decide_share_open(grant, self.now_s)
        if decision.allowed:
            return
        audit("4", decision.reason)
        if decision.basis == "expired":
            self.blobs.drop_shares([grant["id"]])
            raise Gone(f"this share link expired at {iso(grant['exp'] * 10**9)}")
        raise Gone("this share link is locked after too many wrong passcodes"
                   if decision.basis == "locked" else "this share link was revoked")

    async def _check_passcode(self, share_id: str, passcode: str, verifier: bytes | None,
                              audit: Callable[[str, str], None]) -> None:
        grant = st.share(self.store, share_id)  # re-read under the lock: counts committed
        assert grant is not None
        self._share_open_or_gone(grant, audit)
        expected = shares.passcode_verifier(self._passcode_key, share_id, passcode)
        if verifier is None or not hmac.compare_digest(expected, verifier):
            # every failure is a new tx: never the "retry" of an earlier one that a
            # guesser's reused Idempotency-Key would otherwise answer with
            outside_request = idempotency.set_current(None)
            try:
                await self.submit(self.org, "share.attempt", {"id": share_id})
            finally:
                idempotency.reset_current(outside_request)
            left = st.share(self.store, share_id)
            remaining = left["attempts_left"] if left else 0
            audit("4", "wrong passcode")
            raise WrongPasscode(remaining)

    def serve_blobs(self, session: Session, hashes: list[str]) -> dict[str, bytes]:
        """Sealed blobs for a member organisation's node (replication, ADR 4)."""
        self._check_serving()
        decision = policy.decide_blob_serving(self._caller(session), self.org.id)
        if not decision.allowed:
            raise Forbidden(decision.reason)
        return self.replica.serve(hashes)

    # ------------------------------------------------------------ revocation
    async def deactivate(self, session: Session, actor_id: str, reason: str
                         ) -> dict[str, Any]:
        """Remove a practitioner of this organisation (left, key stolen, ...): this
        organisation signs ``actor.deactivate``; from the next block its key signs
        nothing and every node refuses its tokens at the next request."""
        self._allowed(session, policy.decide_node_admin(
            self._caller(session), self.org.id, "remove its practitioners"), "admin", None)
        target = st.actor(self.store, actor_id)
        if target is None or target["org"] != self.org.id:
            raise NotFound(f"{actor_id} is not registered by {self.org.id}")
        await self.submit(self.org, "actor.deactivate", {"id": actor_id, "reason": reason})
        entry = st.actor(self.store, actor_id)
        assert entry is not None
        self._audit(session, "deactivate", actor_id if entry["kind"] == "patient" else None,
                    [f"{'Patient' if entry['kind'] == 'patient' else 'Practitioner'}/"
                     f"{actor_id}"], detail=f"deactivated ({reason})")
        return entry

    async def rotate_org_keys(self, session: Session) -> dict[str, Any]:
        """New signing and encryption keys for this organisation (``key.rotate`` signed
        with the old ones). The keystore keeps the old encryption keys, so what was sealed
        to them still opens; the new keystore is written before the tx is submitted and
        takes the old one's place once the rotation is committed."""
        self._allowed(session, policy.decide_node_admin(
            self._caller(session), self.org.id, "rotate its keys"), "admin", None)
        if self.seal_org is None:
            raise Unavailable("this node was opened without its keystore password; restart it "
                              "with `medledger node start` to rotate its keys")
        new = keys.rotated(self.org)
        pending = self.home.org_keystore.with_name("org.next.json")
        write_private(pending, self.seal_org(new))
        try:
            await self.submit(self.org, "key.rotate", {
                "id": self.org.id, "sign_pub": b64e(new.sign_public),
                "enc_pub": b64e(new.enc_public)})
        except MedledgerError:
            pending.unlink(missing_ok=True)
            raise
        pending.replace(self.home.org_keystore)
        self.org = new
        self._audit(session, "key-rotate", None, [f"Organization/{new.id}"],
                    detail="organisation keys rotated")
        entry = st.org(self.store, new.id)
        assert entry is not None
        return {"id": new.id, "keys_v": entry.get("keys_v", 0), "sign_pub": entry["sign_pub"],
                "enc_pub": entry["enc_pub"]}

    def replace_keystore(self, session: Session, data: bytes) -> None:
        """A user who rotated their key (``medledger key rotate``) replaces the copy of
        their keystore this node holds for password logins. The token proves the new key;
        the keystore stays locked with the user's password (never seen here)."""
        path = self.home.user_keystore(session.actor_id)
        if session.kind == "org" or not path.exists():
            raise NotFound("this node holds no keystore for you")
        doc = loads(data)
        if not isinstance(doc, dict) or doc.get("version") != keys.KEYSTORE_VERSION or \
                doc.get("id") != session.actor_id or not {"kdf", "nonce", "ciphertext"} <= set(doc):
            raise InvalidInput("expected your own medledger keystore (JSON, as written by "
                               "`medledger key rotate`)")
        write_private(path, data)
        self._audit(session, "key-rotate", session.actor_id if session.kind == "patient"
                    else None, [], detail="keystore held at this node replaced")

    def on_commit_keys(self, applied: Any, txs: tuple[bytes, ...]) -> None:
        """Commit listener: when a patient's keys were rotated, re-wrap (in the background)
        the data keys of the record versions this organisation wrote for them to their new
        key, so the new key opens their records from any node."""
        for key, raw in applied.writes.items():
            if not key.startswith("keyhist/") or raw is None:
                continue
            actor = st.actor(self.store, key.split("/")[1])
            if actor is not None and actor["kind"] == "patient":
                self._background(self.rewrap_for_patient(actor["id"],
                                                         int(loads(raw)["until_ns"])))

    def _background(self, job: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(job)
        except RuntimeError:  # no loop (offline tools): nothing runs in the background
            job.close()
            return
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def rewrap_for_patient(self, patient: str, before_ns: int, chunk: int = 1000) -> int:
        """Wrap to ``patient``'s current key the data keys of every version this
        organisation wrote for them before ``before_ns`` (their key rotation)."""
        entry = st.actor(self.store, patient)
        if entry is None:
            return 0
        target = b64d(entry["enc_pub"])
        metas = [m for t, i in st.patient_records(self.store, patient)
                 for m in st.record_versions(self.store, t, i)
                 if m["org"] == self.org.id and m["time_ns"] < before_ns and not st.erased(m)
                 and self.org.id in m["readers"]]
        items = []
        try:
            await self.ensure_blobs(metas)
            with envelope.BatchWrapper() as wrapper:
                for meta in metas:
                    wrapped = self._rewrap(meta, target, wrapper)
                    self.blobs.put([(blob_hash(wrapped), wrapped)],
                                   pending=f"{meta['type']}/{meta['id']}/{meta['v']}"
                                           f"/key:{patient}")
                    items.append({"type": meta["type"], "id": meta["id"],
                                  "version": meta["v"], "reader": patient,
                                  "key": blob_hash(wrapped)})
            for part in iter_chunks(items, chunk):
                await self.submit(self.org, "record.rewrap", {"items": part})
        except MedledgerError as err:
            log.warning("re-wrapping %s's records to their new key failed: %s", patient, err)
            return 0
        return len(items)

    # ------------------------------------------------------------ erasure
    async def erase(self, session: Session, patient: str, scope: dict[str, Any],
                    basis: str) -> dict[str, Any]:
        """Erase a patient's records by crypto-shredding (ADR 4 section 4): signed by the
        patient, or by this node's organisation acting on their documented request. Every
        node deletes the sealed blobs when the erasure commits."""
        if session.kind == "patient" and session.actor_id == patient:
            identity = self._patient_identity(session, patient)
        elif session.kind == "org" and session.actor_id == self.org.id:
            identity = self.org
        else:
            raise self._deny(session, "erase", patient, [],
                             "only the patient, or an organisation caring for them acting on "
                             "their documented request, may erase their records")
        committed = await self.submit(identity, "record.erase",
                                      {"patient": patient, "basis": basis, **scope})
        entry = st.get_json(self.store, f"erasure/{patient}/{committed.tx_hash.hex()}")
        assert entry is not None
        self._audit(session, "erase", patient, [], basis=basis,
                    detail=f"{entry['versions']} versions erased ({basis})")
        return entry

    # ------------------------------------------------------------ ledger (members only)
    def _check_serving(self) -> None:
        if self.integrity_failure:
            raise Unavailable(f"node refuses to serve: {self.integrity_failure}")
        if self.catching_up:
            raise Unavailable(f"not serving content yet: {self.catching_up}")

    def _ledger_decision(self, decision: policy.Decision) -> None:
        if not decision.allowed:
            raise Forbidden(decision.reason)

    def ledger_block(self, session: Session, height: int) -> dict[str, Any]:
        """A block: its header and txs (hash, code, log) for members; its header for any
        other active principal (to cross-check a proof's header at a second node)."""
        decision = policy.decide_block(self._caller(session))
        self._ledger_decision(decision)
        header = self.store.block(height) if 0 < height <= self.store.height else None
        if header is None:
            raise NotFound(f"no block at height {height}")
        if decision.basis != "member":
            return {"header": header}
        return {"header": header, "txs": [{"hash": h.hex(), "code": c, "log": lg}
                                          for _, h, _, c, lg in self.store.block_txs(height)]}

    def ledger_tx_proof(self, session: Session, tx_hash: bytes) -> dict[str, Any]:
        """A tx with its inclusion proof: members; a patient for a tx about them alone."""
        caller = self._caller(session)
        if not policy.is_member(caller) and caller.kind != "patient":
            raise Forbidden(policy.MEMBERS_ONLY)  # before the lookup: no existence oracle
        found = self.store.tx(tx_hash)
        if found is None:
            raise NotFound(f"no tx {tx_hash.hex()}")
        height, idx, raw = found[0], found[1], found[2]
        try:
            tx = decode_tx(raw)
            kind, signer, body = tx.kind, tx.signer, tx.body
        except MedledgerError:  # a refused, malformed tx: about nobody in particular
            kind, signer, body = "", "", {}
        self._ledger_decision(policy.decide_tx_proof(self.store, caller, kind, signer, body))
        header = self.store.block(height)
        assert header is not None
        leaves = [r for _, _, r, _, _ in self.store.block_txs(height)]
        return proofs.make_proof("tx", header, leaves, idx)

    def ledger_audit_proof(self, session: Session, event_id: str) -> dict[str, Any]:
        """An anchored audit event with its proof: members, and the patient it is about."""
        caller = self._caller(session)
        if not policy.is_member(caller) and caller.kind != "patient":
            raise Forbidden(policy.MEMBERS_ONLY)
        found = self.store.audit_event(event_id)
        if found is None:
            raise NotFound(f"audit event {event_id} is not anchored yet (or does not exist)")
        height, leaf, event = found
        self._ledger_decision(policy.decide_audit_proof(caller, loads(event)))
        header = self.store.block(height)
        assert header is not None
        return proofs.make_proof("audit", header, self.store.audit_leaves(height), leaf)

    def ledger_orgs(self, session: Session | None) -> list[dict[str, Any]]:
        """The organisations: in full for members, their public view for anyone else."""
        member = session is not None and policy.is_member(self._caller(session))
        return [policy.org_view(loads(v), member) for _, v in self.store.scan("org/")]

    async def submit_client_tx(self, session: Session, raw: bytes) -> Any:
        """``POST /ledger/tx``: a tx its signer signed client-side, submitted by the signer
        (or relayed by a member organisation), so a refusal reaches only them."""
        tx = decode_tx(raw)
        self._ledger_decision(policy.decide_tx_submission(self._caller(session), tx.signer,
                                                          tx.kind))
        return await self.submit_raw(raw)


_DECOY: list[bytes] = []


def _unlock_or_decoy(path: Path, password: str) -> keys.Identity:
    """Unlock a user keystore; for an id not enrolled here, spend the same scrypt work on a
    decoy keystore and fail the same way (no enrolment oracle, by answer or by timing)."""
    try:
        data = path.read_bytes()
    except OSError:
        if not _DECOY:
            _DECOY.append(keys.lock(keys.new_identity("decoy", "patient"), os.urandom(16).hex()))
        keys.unlock(_DECOY[0], password)
        raise Unauthenticated(LOGIN_FAILED) from None
    return keys.unlock(data, password)


class WrongPasscode(Unauthenticated):
    def __init__(self, remaining: int, message: str = "wrong passcode") -> None:
        super().__init__(f"{message}; {remaining} attempts left")
        self.remaining = remaining


def _new_uuid() -> str:
    return str(uuid.uuid4())


def _ref(meta: dict[str, Any]) -> str:
    return f"{meta['type']}/{meta['id']}/_history/{meta['v']}"


def _purpose(session: Session) -> str:
    return "PATRQT" if session.kind == "patient" else "TREAT"


def _content(resource: dict[str, Any]) -> bytes:
    r = {k: v for k, v in resource.items() if k != "meta"}
    meta = {k: v for k, v in (resource.get("meta") or {}).items()
            if k not in ("versionId", "lastUpdated", "security")}
    if meta:
        r["meta"] = meta
    return canonical(r)


def _parts(ops: list[dict[str, Any]], max_bytes: int) -> Iterable[list[dict[str, Any]]]:
    """Split ops into import parts of at most ``max_bytes`` (and MAX_BATCH_OPS) each."""
    part: list[dict[str, Any]] = []
    size = 0
    for op in ops:
        n = len(canonical(op)) + 1
        if part and (size + n > max_bytes or len(part) >= MAX_BATCH_OPS):
            yield part
            part, size = [], 0
        part.append(op)
        size += n
    if part:
        yield part


def iter_chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
