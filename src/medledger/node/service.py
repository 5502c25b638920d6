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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from medledger.core import policy
from medledger.core import state as st
from medledger.core.machine import MAX_BATCH_OPS
from medledger.core.tx import decode_tx, make_tx
from medledger.crypto import envelope, freetext, keys
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
from medledger.fhir.labels import classify
from medledger.fhir.validate import parse_resource
from medledger.node import audit as audit_mod
from medledger.node import shares
from medledger.node.audit import Auditor
from medledger.node.auth import Authenticator, Session, scope_allows
from medledger.node.home import Config, Home
from medledger.node.ledger_app import LedgerApp
from medledger.node.records import open_as, open_blob, rewrap_key, seal_record
from medledger.node.replica import Replicator
from medledger.storage.blobs import BlobStore, blob_hash
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


@dataclass(frozen=True)
class Withheld:
    ref: str
    category: str
    reason: str


class SearchResult(NamedTuple):
    found: list[Stored]  # the page (``_count``), newest first
    withheld: list[Withheld]
    total: int  # every match the caller may see, before paging


def iso(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


ANCHOR_MAX_BYTES = 512 * 1024
# An import part (the whole signed tx) stays inside CometBFT's defaults: mempool
# max_tx_bytes (1 MiB) and the RPC request that carries it base64-encoded in JSON
# (rpc.max_body_bytes, 1,000,000 bytes): 4/3 x 720 KiB + the envelope < 1,000,000.
STAGE_PART_BYTES = 720 * 1024
# Resource types outside every patient compartment: directory records (ADR 5).
# TODO(search): replaced by the Patient CompartmentDefinition (search/compartment.py).
DIRECTORY_TYPES = frozenset({
    "Organization", "OrganizationAffiliation", "Location", "Practitioner", "PractitionerRole",
    "HealthcareService", "Endpoint", "Medication", "MedicationKnowledge", "Substance",
    "Device", "DeviceDefinition", "Group", "InsurancePlan", "CareTeam", "Library",
    "Questionnaire", "ValueSet", "CodeSystem", "StructureDefinition", "PlanDefinition",
    "ActivityDefinition", "Measure", "ResearchStudy", "BiologicallyDerivedProduct"})
SEARCH_PARAMS = {"patient", "subject", "category", "code", "date", "name", "_count", "_id"}


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
        self.on_erase: list[Callable[[list[dict[str, Any]]], None]] = []
        self.submitter: Submitter | None = None
        self.auth = Authenticator(store, config.base_url + "/auth/token", config.token_ttl_s,
                                  clock, store.use_assertion)
        self.auditor = Auditor(store, org.id, clock, org.enc_private)
        self.anchor_interval_s = 0.5
        self._patients: dict[str, dict[str, Any]] = {}  # decrypted Patient heads for $match
        self._epoch_keys: dict[tuple[str, str], bytes | None] = {}
        self.integrity_failure: str | None = None
        self.validator_pool: Executor | None = None
        self._share_locks: dict[str, asyncio.Lock] = {}
        from medledger.node.bundles import IdentifierLookup  # (bundles builds on Node)
        self.identifiers = IdentifierLookup(self)  # conditional queries of Bundles

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
        tx = make_tx(identity.id, identity.signer(), self.chain, kind, body, self._nonce())
        return await self.submit_raw(tx.raw)

    async def submit_raw(self, raw: bytes) -> Any:
        if self.submitter is None:
            raise Unavailable("this node has no consensus driver running")
        committed = await self.submitter.submit(raw)
        if committed.code != 0:
            raise error_for(committed.code, committed.log)
        return committed

    def _actor(self, session: Session) -> dict[str, Any]:
        entry = st.actor(self.store, session.actor_id)
        if entry is None:
            if session.kind == "org":
                return {"id": session.actor_id, "kind": "org", "org": session.actor_id}
            raise Unauthenticated(f"{session.actor_id} is no longer registered")
        return entry

    def _need_scope(self, session: Session, rtype: str, interaction: str) -> None:
        if not scope_allows(session.scopes, rtype, interaction):
            raise Forbidden(f"token scopes ({' '.join(sorted(session.scopes))}) do not allow "
                            f"'{interaction}' on {rtype}")

    def _audit(self, session: Session, subtype: str, patient: str | None, entity: list[str],
               outcome: str = "0", **kw: Any) -> dict[str, Any]:
        ev = self.auditor.event(subtype, agent=session.actor_id, agent_org=session.org,
                                agent_role=session.role or session.kind, patient=patient,
                                entity=entity, outcome=outcome, **kw)
        self.auditor.record(ev)
        return ev

    def _deny(self, session: Session, subtype: str, patient: str | None, entity: list[str],
              reason: str) -> Forbidden:
        self._audit(session, subtype, patient, entity, outcome="4", reason=reason,
                    basis="denied")
        return Forbidden(reason)

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
        """Open a version as this node's organisation (callers decide policy first)."""
        blob = self.blob_of(meta)
        if self.org.id in meta["readers"]:
            return open_as(self.chain, meta, blob, self.org.id, self.org.enc_private)
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
                return open_blob(self.chain, meta, blob, self.org.enc_private, wrapped)
            except MedledgerError as err:  # a bad wrap by one member: try the next
                failure = err
        raise failure

    async def rewrap_for(self, session: Session, target: str, chunk: int = 1000) -> int:
        """Wrap the data key of every record version this node can open to ``target``, an
        organisation that joined after they were sealed. Returns how many were wrapped."""
        if session.kind != "org" or session.actor_id != self.org.id:
            raise Forbidden("only this node's organisation may re-wrap its keys")
        org = st.org(self.store, target)
        if org is None or org["status"] != "active":
            raise InvalidInput(f"{target} is not an active member organisation")
        target_pub = b64d(org["enc_pub"])
        items: list[dict[str, Any]] = []
        for _, raw in self.store.scan("ver/"):
            meta = loads(raw)
            if st.erased(meta) or target in meta["readers"] or \
                    self.org.id not in meta["readers"]:
                continue
            if any(True for _ in self.store.scan(
                    f"wrap/{meta['type']}/{meta['id']}/{meta['v']:010d}/{target}/")):
                continue
            wrapped = rewrap_key(self.blob_of(meta), self.org.id, self.org.enc_private,
                                 target_pub)
            self.blobs.put([(blob_hash(wrapped), wrapped)])
            items.append({"type": meta["type"], "id": meta["id"], "version": meta["v"],
                          "reader": target, "key": blob_hash(wrapped)})
        for part in iter_chunks(items, chunk):
            await self.submit(self.org, "record.rewrap", {"items": part})
        return len(items)

    async def validate(self, data: Any, rtype: str) -> dict[str, Any]:
        """FHIR validation (the costliest step of a write: ~0.6 ms) on the worker pool."""
        return await self._off_loop(parse_resource, data, rtype)  # type: ignore[no-any-return]

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a pure function on the validation process pool when there is one (the
        API server starts it: the node's own loop stays free for ledger work)."""
        if self.validator_pool is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.validator_pool, fn, *args)

    # ------------------------------------------------------------ identities
    async def register_practitioner(self, session: Session, actor_id: str, role: str,
                                    password: str) -> keys.Identity:
        if session.kind != "org" or session.actor_id != self.org.id:
            raise Forbidden("only this node's organisation may register its practitioners")
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

    def login(self, actor_id: str, password: str) -> tuple[str, Session]:
        path = self.home.user_keystore(actor_id)
        if not path.exists():
            raise Unauthenticated(f"{actor_id} is not enrolled at this node; use your key file "
                                  "(SMART backend services) instead")
        return self.auth.login(keys.load_keystore(path, password))

    # ------------------------------------------------------------ patients and $match
    def known_patients(self) -> list[dict[str, Any]]:
        for _, raw in self.store.scan("rec/Patient/"):
            meta = loads(raw)
            cached = self._patients.get(meta["id"])
            if cached is None or cached["meta"]["versionId"] != str(meta["v"]):
                try:
                    self._patients[meta["id"]] = self.decrypt(meta)
                except MedledgerError:
                    continue
        return list(self._patients.values())

    def match_patients(self, session: Session, resource: dict[str, Any], only_certain: bool,
                       count: int | None) -> list[tuple[dict[str, Any], match.MatchResult]]:
        if session.kind != "practitioner":
            raise Forbidden("only practitioners may search the patient index")
        self._need_scope(session, "Patient", "s")
        candidate = parse_resource(resource, "Patient")
        found = match.find_matches(candidate, self.known_patients(), only_certain, count)
        visible = []
        for p, r in found:  # only patients whose demographics this practitioner may read
            meta = st.record_head(self.store, "Patient", str(p["id"]))
            if meta is not None and self._decide(session, meta, None).allowed:
                visible.append((dict(p), r))
                self._audit(session, "match", str(p["id"]), [_ref(meta)],
                            detail=f"$match candidate ({r.grade})")
        return visible

    def _duplicate_check(self, resource: dict[str, Any]) -> tuple[str | None, str]:
        """Raise ``Conflict`` on a certain match not linked by the client; flag probables."""
        linked = {str(link.get("other", {}).get("reference", "")).removeprefix("Patient/")
                  for link in resource.get("link", [])}
        warning = None
        for existing, result in match.find_matches(resource, self.known_patients()):
            if existing.get("id") == resource.get("id") or existing.get("id") in linked:
                continue
            if result.grade == "certain":
                raise Conflict(f"this patient is already registered as Patient/{existing['id']} "
                               "(certain match); link to it with Patient.link or update it "
                               "instead")
            if result.grade == "probable" and warning is None:
                warning = str(existing["id"])
        return warning, "" if warning is None else f"probable duplicate of Patient/{warning}"

    async def _patient_ops(self, resource: dict[str, Any], password: str | None
                           ) -> tuple[list[dict[str, Any]], keys.Identity, str]:
        """actor.register op for a new patient; saves their keystore at this node (scrypt,
        ~0.1 s of CPU: on the worker pool, so bulk imports do not stall the node)."""
        pid = resource["id"]
        if st.principal(self.store, pid) is not None:
            raise Conflict(f"id {pid} is already registered (not as this patient)")
        identity = keys.new_identity(pid, "patient")
        secret = password or b64e(os.urandom(12))
        # exclusive: never replace someone's keystore (a concurrent or hostile create)
        await self._off_loop(keys.save_keystore, self.home.user_keystore(pid), identity, secret,
                             keys.DEFAULT_SCRYPT_N, True)
        return ([{"kind": "actor.register", "body": self._register_body(identity, None)}],
                identity, secret)

    # ------------------------------------------------------------ writes
    def _writer_of(self, session: Session) -> tuple[dict[str, Any], policy.Role]:
        """(writer entry, role) a write is judged by: a practitioner of this node's
        organisation, or the organisation itself (bulk import)."""
        if session.kind == "org" and session.actor_id == self.org.id:
            return policy.org_writer(self.org.id), policy.SYSTEM
        if session.kind == "practitioner" and session.org == self.org.id:
            actor = self._actor(session)
            role = policy.ROLES.get(str(actor.get("role")))
            if role is not None:
                return actor, role
        if session.kind == "patient":
            raise Forbidden("patients contribute data through their provider in this version")
        raise Forbidden(f"{session.actor_id} writes through the node of its own organisation "
                        f"({session.org}); this node co-signs only {self.org.id}'s writes")

    def _record_kind(self, resource: dict[str, Any], patient: str | None
                     ) -> tuple[str | None, str, list[str]]:
        """(patient, category, labels): a patient record, or a directory record (ADR 5)."""
        cls = classify(resource)
        patient = patient or cls.patient_id
        if patient is not None:
            return patient, cls.category, sorted(cls.labels)
        rtype = resource["resourceType"]
        if rtype not in DIRECTORY_TYPES:
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
        self.blobs.put([(fields["blob"], blob)])  # stored before the ledger references it
        return job.prepared(fields)

    async def _authorise_put(self, session: Session, resource: dict[str, Any], rid: str,
                             if_match: int | None, patient_override: str | None = None,
                             new_patient_key: bytes | None = None,
                             break_glass: str | None = None) -> PutJob | Prepared:
        """Everything of a write but the sealing (which bulk imports do on the worker
        pool): policy, preconditions, the version, its metadata and readers. Identical
        content to the head answers ``Prepared`` with no body."""
        rtype = resource["resourceType"]
        resource = {**resource, "id": rid}
        patient, category, labels = self._record_kind(resource, patient_override)
        head = st.record_head(self.store, rtype, rid)
        writer, role = self._writer_of(session)
        state: st.StateReader = self.store
        if new_patient_key is not None and patient is not None:  # registered by this batch
            state = st.Overlay(self.store)
            state.put(f"care/{patient}/{self.org.id}", b"1")
        if break_glass is not None and len(break_glass.strip()) < policy.BREAK_GLASS_MIN_REASON:
            raise InvalidInput("break-the-glass needs a reason of at least "
                               f"{policy.BREAK_GLASS_MIN_REASON} characters")
        # authorised before anything about the current content is looked at (no oracle)
        decision = policy.decide_write(state, writer, role, patient, category, labels,
                                       self.now_s, head, break_glass is not None)
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
        readers = self.readers_for(patient)
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

    async def put_resource(self, session: Session, data: Any, rtype: str, rid: str | None,
                           if_match: int | None = None, password: str | None = None,
                           break_glass: str | None = None) -> Stored:
        """Create (``rid`` None) or update a record; identical content makes no new version."""
        self._need_scope(session, rtype, "c" if rid is None else "u")
        self._writer_of(session)
        resource = await self.validate(data, rtype)
        if rid is not None and resource.get("id") not in (None, rid):
            raise InvalidInput(f"resource id {resource.get('id')!r} does not match the URL id "
                               f"{rid!r}")
        new = rid is None or st.record_head(self.store, rtype, rid) is None
        rid = rid or str(uuid.uuid4())
        ops: list[dict[str, Any]] = []
        warning, detail, patient_key, secret = None, "", None, None
        if rtype == "Patient" and new:
            resource["id"] = rid
            self._authorise_registration(session)
            warning, detail = self._duplicate_check(resource)
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
            if ops:  # the registration did not happen: drop the keystore made for it
                self.home.user_keystore(rid).unlink(missing_ok=True)
            self._drop_blobs([body])
            self._audit(session, "create" if new else "update", patient,
                        [f"{rtype}/{rid}"], outcome="4" if err.http_status < 500 else "8",
                        reason=str(err))
            raise
        meta = st.record_head(self.store, rtype, rid)
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
        writer, role = self._writer_of(session)
        if not policy.may_write(role, "demographics"):
            raise self._deny(session, "register", None, [],
                             f"{writer['id']} ({role.name}) may not register patients")

    async def process_bundle(self, session: Session, data: bytes | str) -> BundleResult:
        """A FHIR transaction (all or nothing) or batch (entry by entry) Bundle: see
        ``node.bundles``."""
        from medledger.node import bundles
        return await bundles.process_bundle(self, session, data)

    # ------------------------------------------------------------ reads
    def _decide(self, session: Session, meta: dict[str, Any], break_glass: str | None
                ) -> policy.Decision:
        if session.kind == "org":
            return policy.Decision(False, "denied", "organisation credentials manage the node; "
                                   "clinical reads need a practitioner or the patient")
        return policy.decide_read(self.store, self._actor(session), meta["patient"],
                                  meta["category"], meta["labels"], self.now_s, break_glass)

    async def read(self, session: Session, rtype: str, rid: str, version: int | None = None,
                   break_glass: str | None = None) -> Stored:
        self._need_scope(session, rtype, "r")
        self._check_serving()
        meta = (st.record_head(self.store, rtype, rid) if version is None
                else st.record_version(self.store, rtype, rid, version))
        if meta is None:
            raise NotFound(f"{rtype}/{rid}" + (f" version {version}" if version else "")
                           + " does not exist")
        decision = self._decide(session, meta, break_glass)
        subtype = "read" if version is None else "vread"
        if not decision.allowed:
            raise self._deny(session, subtype, meta["patient"], [_ref(meta)], decision.reason)
        await self.ensure_blobs([meta])
        resource = self.decrypt(meta)
        self._audit(session, subtype, meta["patient"], [_ref(meta)], basis=decision.basis,
                    break_glass=decision.break_glass,
                    purpose="ETREAT" if decision.break_glass else _purpose(session),
                    reason=break_glass or "")
        return Stored(resource, meta)

    async def history(self, session: Session, rtype: str, rid: str,
                      break_glass: str | None = None) -> list[Stored]:
        self._need_scope(session, rtype, "r")
        self._check_serving()
        versions = st.record_versions(self.store, rtype, rid)
        if not versions:
            raise NotFound(f"{rtype}/{rid} does not exist")
        head = versions[-1]
        decision = self._decide(session, head, break_glass)
        if not decision.allowed:
            raise self._deny(session, "history", head["patient"], [f"{rtype}/{rid}"],
                             decision.reason)
        # each version is judged on its own: a record whose category or labels changed
        # must not reveal an older, more sensitive version through its history
        shown, hidden, erased = [], 0, 0
        for m in reversed(versions):
            if st.erased(m):
                erased += 1
            elif m is head or self._decide(session, m, break_glass).allowed:
                shown.append(m)
            else:
                hidden += 1
        await self.ensure_blobs(shown)
        out = [Stored(self.decrypt(m), m) for m in shown]
        self._audit(session, "history", head["patient"], [f"{rtype}/{rid}"],
                    basis=decision.basis, break_glass=decision.break_glass,
                    reason=break_glass or "", purpose="ETREAT" if decision.break_glass
                    else _purpose(session),
                    detail=", ".join(x for x in (
                        f"{hidden} older versions withheld" if hidden else "",
                        f"{erased} versions erased" if erased else "") if x))
        return out

    async def search(self, session: Session, rtype: str, params: dict[str, str],
                     break_glass: str | None = None, subtype: str = "search") -> SearchResult:
        """FHIR search over the records the caller may see; denied ones are reported withheld."""
        if rtype != "*":
            self._need_scope(session, rtype, "s")
        self._check_serving()
        unknown = set(params) - SEARCH_PARAMS
        if unknown:
            raise InvalidInput(f"unsupported search parameters: {', '.join(sorted(unknown))}; "
                               f"supported: {', '.join(sorted(SEARCH_PARAMS))}")
        if params.get("name") and rtype != "Patient":
            raise InvalidInput("the name search parameter applies to Patient only")
        patient = params.get("patient") or params.get("subject")
        if patient:
            patient = patient.rsplit("/", 1)[-1]
        if session.kind == "patient":
            if patient and patient != session.actor_id:
                raise self._deny(session, subtype, patient, [],
                                 "patients may search only their own records")
            patient = session.actor_id
        if break_glass is not None and not patient:
            raise InvalidInput("break-the-glass applies to one patient: add patient=<id>")
        metas = self._candidates(rtype, patient, params.get("_id"))
        categories = set(params["category"].split(",")) if params.get("category") else None
        found, withheld = [], []
        decisions: dict[str, int] = {}
        bg = False
        allowed: list[tuple[dict[str, Any], policy.Decision]] = []
        for meta in metas:
            if (categories and meta["category"] not in categories) or st.erased(meta):
                continue
            decision = self._decide(session, meta, break_glass)
            if not decision.allowed:
                withheld.append(Withheld(_ref(meta), meta["category"], decision.reason))
                continue
            allowed.append((meta, decision))
        await self.ensure_blobs(m for m, _ in allowed)
        for meta, decision in allowed:
            bg = bg or decision.break_glass
            resource = self.decrypt(meta)
            if not _matches(resource, params):
                continue
            decisions[decision.basis] = decisions.get(decision.basis, 0) + 1
            found.append(Stored(resource, meta))
        raw_count = params.get("_count") or "0"
        if not raw_count.isdigit():
            raise InvalidInput("_count must be a positive integer")
        count = int(raw_count)
        found.sort(key=lambda s: s.meta["time_ns"], reverse=True)
        total = len(found)
        if count:
            found = found[:count]
        detail = (f"{rtype} search ({', '.join(sorted(params))}): {len(found)} returned, "
                  f"{len(withheld)} withheld")
        if patient:
            self._audit(session, subtype, patient, [_ref(s.meta) for s in found][:50],
                        basis=",".join(sorted(decisions)), break_glass=bg,
                        purpose="ETREAT" if bg else _purpose(session),
                        reason=break_glass or "", detail=detail)
        else:  # a type-wide search: every patient whose records it returned sees it
            by_patient: dict[str, list[str]] = {}
            for stored in found:
                if stored.meta["patient"] is not None:
                    by_patient.setdefault(stored.meta["patient"], []).append(_ref(stored.meta))
            for pid, refs in sorted(by_patient.items()):
                self._audit(session, subtype, pid, refs[:50], basis=",".join(sorted(decisions)),
                            purpose=_purpose(session), detail=detail)
            if not by_patient:
                self._audit(session, subtype, None, [], detail=detail)
        return SearchResult(found, withheld, total)

    def _candidates(self, rtype: str, patient: str | None, rid: str | None
                    ) -> list[dict[str, Any]]:
        if rid and rtype != "*":
            head = st.record_head(self.store, rtype, rid)
            return [head] if head and (not patient or head["patient"] == patient) else []
        if patient:
            refs = st.patient_records(self.store, patient, None if rtype == "*" else rtype)
            return [m for t, i in refs if (m := st.record_head(self.store, t, i)) is not None]
        if rtype == "*":
            raise InvalidInput("a search across all types needs a patient")
        return [loads(v) for _, v in self.store.scan(f"rec/{rtype}/")]

    async def everything(self, session: Session, patient: str, break_glass: str | None = None
                         ) -> SearchResult:
        if st.actor(self.store, patient) is None:
            raise NotFound(f"Patient/{patient} does not exist")
        return await self.search(session, "*", {"patient": patient}, break_glass, "everything")

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
        if session.kind != "patient" or session.actor_id != patient:
            raise self._deny(session, "export", patient, [],
                             "only the patient may export their sealed records")
        metas = [m for t, i in st.patient_records(self.store, patient)
                 for m in st.record_versions(self.store, t, i) if not st.erased(m)]
        await self.ensure_blobs(metas)
        out = [{"meta": m, "blob": b64e(self.blob_of(m))} for m in metas]
        self._audit(session, "export", patient, [], detail=f"{len(out)} sealed versions")
        return out

    # ------------------------------------------------------------ consent
    def _patient_identity(self, session: Session, patient: str) -> keys.Identity:
        if session.kind != "patient" or session.actor_id != patient:
            raise self._deny(session, "consent", patient, [],
                             f"only patient {patient} may change their consents")
        if session.identity is None:
            raise Forbidden("this session holds no patient key: log in with your password, or "
                            "sign the consent tx yourself and POST it to /ledger/tx")
        return session.identity

    async def put_consent(self, session: Session, rule: dict[str, Any]) -> dict[str, Any]:
        patient = str(rule.get("patient", ""))
        identity = self._patient_identity(session, patient)
        rule = {**rule, "id": rule.get("id") or str(uuid.uuid4())}
        await self.submit(identity, "consent.put", rule)
        stored = st.get_json(self.store, f"consent/{patient}/{rule['id']}")
        assert stored is not None
        self._audit(session, "consent", patient, [f"Consent/{rule['id']}"],
                    detail=f"{stored['decision']} {','.join(stored['categories']) or 'all data'}")
        return stored

    async def revoke_consent(self, session: Session, patient: str, cid: str) -> dict[str, Any]:
        identity = self._patient_identity(session, patient)
        await self.submit(identity, "consent.revoke", {"patient": patient, "id": cid})
        self._audit(session, "consent-revoke", patient, [f"Consent/{cid}"])
        stored = st.get_json(self.store, f"consent/{patient}/{cid}")
        assert stored is not None
        return stored

    def consents(self, session: Session, patient: str) -> list[dict[str, Any]]:
        """A patient's consent rules: for the patient, and for practitioners of an
        organisation caring for them (the rules themselves can reveal sensitive facts)."""
        if session.kind == "patient" and session.actor_id != patient:
            raise self._deny(session, "consent-read", patient, [],
                             "patients may see only their own consents")
        if session.kind == "practitioner":
            self._need_scope(session, "Consent", "r")
            if not st.has_care(self.store, patient, session.org):
                raise self._deny(session, "consent-read", patient, [],
                                 f"organisation {session.org} has no care relationship with "
                                 "this patient")
        if session.kind == "org" and session.actor_id != self.org.id:
            raise Forbidden("only this node's organisation may read consents here")
        rules = st.consents(self.store, patient)
        self._audit(session, "consent-read", patient, [f"Consent/{r['id']}" for r in rules])
        return rules

    # ------------------------------------------------------------ audit
    def audit_log(self, session: Session, patient: str, since: str = "", count: int = 100
                  ) -> list[tuple[dict[str, Any], int | None]]:
        if not (session.kind == "patient" and session.actor_id == patient) and not (
                session.kind == "org" and session.actor_id == self.org.id):
            raise self._deny(session, "audit-read", patient, [],
                             "only the patient (or a node's organisation) may read the "
                             "patient's access log")
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
            return freetext.epoch_key(self.org.enc_private, epoch)
        cached = self._epoch_keys.get((node, epoch))
        if cached is None:
            wrapped = (st.get_json(self.store, f"akey/{node}/{epoch}") or {}).get(self.org.id)
            if wrapped is None:
                return None
            cached = envelope.unwrap_key(b64d(wrapped), self.org.enc_private)
            self._epoch_keys[(node, epoch)] = cached
        return cached

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
            key = freetext.epoch_key(self.org.enc_private, epoch)
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
        return derive_key(self.org.enc_private, "shl passcode verifier v1")

    @property
    def _local_text_key(self) -> bytes:
        return derive_key(self.org.enc_private, "node-local free text v1")

    async def create_share(self, session: Session, selection: dict[str, Any],
                           exp: int | None, passcode: str | None, label: str,
                           recipient: str = "") -> tuple[str, dict[str, Any]]:
        """A share link made here with the patient's session key (the portal)."""
        patient = session.actor_id
        identity = self._patient_identity(session, patient)
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
        if tx.kind != "share.create" or session.kind != "patient" or \
                tx.signer != session.actor_id:
            raise self._deny(session, "share-create", session.actor_id, [],
                             "a share link is published by its patient, signed with their key")
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
        identity = self._patient_identity(session, grant["patient"])
        await self.submit(identity, "share.revoke", {"id": share_id})
        self._audit(session, "share-revoke", grant["patient"], [], detail=share_id[:8])
        revoked = st.share(self.store, share_id)
        assert revoked is not None
        return self._share_view(revoked)

    def shares(self, session: Session) -> list[dict[str, Any]]:
        if session.kind != "patient":
            raise Forbidden("only patients have share links")
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
            ev = self.auditor.event("share-access", agent=recipient[:64], agent_org="external",
                                    agent_role="share-recipient", patient=grant["patient"],
                                    entity=[f"{t}/{i}/_history/{v}" for t, i, v in
                                            grant["records"]],
                                    outcome=outcome, purpose="PATRQT", reason=reason,
                                    basis=f"share:{share_id[:8]}", detail=recipient)
            self.auditor.record(ev)

        if grant["revoked"]:
            audit("4", "share link was revoked" if grant.get("revoked_reason") != "erased"
                  else "shared records were erased")
            raise Gone("this share link was revoked")
        if grant["exp"] is not None and grant["exp"] <= self.now_s:
            self.blobs.drop_shares([share_id])
            audit("4", "share link expired")
            raise Gone(f"this share link expired at {iso(grant['exp'] * 10**9)}")
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

    async def _check_passcode(self, share_id: str, passcode: str, verifier: bytes | None,
                              audit: Callable[[str, str], None]) -> None:
        grant = st.share(self.store, share_id)  # re-read under the lock: counts committed
        assert grant is not None
        if grant["attempts_left"] is not None and grant["attempts_left"] <= 0:
            audit("4", "share link locked after too many wrong passcodes")
            raise Gone("this share link is locked after too many wrong passcodes")
        expected = shares.passcode_verifier(self._passcode_key, share_id, passcode)
        if verifier is None or not hmac.compare_digest(expected, verifier):
            await self.submit(self.org, "share.attempt", {"id": share_id})
            left = st.share(self.store, share_id)
            remaining = left["attempts_left"] if left else 0
            audit("4", "wrong passcode")
            raise WrongPasscode(remaining)

    def serve_blobs(self, session: Session, hashes: list[str]) -> dict[str, bytes]:
        """Sealed blobs for a member organisation's node (replication, ADR 4)."""
        self._check_serving()
        org = st.org(self.store, session.actor_id) if session.kind == "org" else None
        if org is None or org["status"] != "active" or session.actor_id == self.org.id:
            raise Forbidden("sealed blobs are served to other member organisations' nodes only")
        return self.replica.serve(hashes)

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

    # ------------------------------------------------------------ ledger
    def _check_serving(self) -> None:
        if self.integrity_failure:
            raise Unavailable(f"node refuses to serve: {self.integrity_failure}")


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


def _matches(resource: dict[str, Any], params: dict[str, str]) -> bool:
    if params.get("name") and not _name_matches(resource, params["name"]):
        return False
    if params.get("code"):
        wanted = set(params["code"].split(","))
        codes = set(classify(resource).codes)
        bare = {c.split("|", 1)[-1] for c in codes}
        if not any(w in codes or w in bare for w in wanted):
            return False
    if params.get("date"):
        date = classify(resource).date
        if date is None or not _date_matches(date, params["date"]):
            return False
    return True


def _name_matches(resource: dict[str, Any], query: str) -> bool:
    """Patient name search: every word of ``query`` is contained (case-insensitive) in a
    family, given or text part of one of the patient's names."""
    words = query.casefold().split()
    for name in resource.get("name") or []:
        parts = [str(name.get("family") or ""), str(name.get("text") or ""),
                 *(str(g) for g in name.get("given") or [])]
        folded = [p.casefold() for p in parts if p]
        if all(any(w in p for p in folded) for w in words):
            return True
    return False


def _date_matches(value: str, expr: str) -> bool:
    """``expr``: ``&``-joined repeats (all must hold), each a comma list (any may hold)."""
    return all(any(_date_test(value, alt) for alt in part.split(","))
               for part in expr.split("&"))


def _date_test(value: str, part: str) -> bool:
    op, operand = (part[:2], part[2:]) if part[:2] in ("eq", "ne", "gt", "lt", "ge", "le") \
        else ("eq", part)
    if not operand or not operand[:4].isdigit():
        raise InvalidInput(f"bad date search value {part!r}; use e.g. ge2024-01-01")
    v = value[:len(operand)]
    return {"eq": v == operand, "ne": v != operand, "gt": v > operand, "lt": v < operand,
            "ge": v >= operand, "le": v <= operand}[op]


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
