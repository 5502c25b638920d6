"""FHIR ``transaction`` and ``batch`` Bundles at the node (FHIR R4 http.html#transaction).

This module owns what happens between a Bundle's bytes and the ledger:

1. planning (:mod:`medledger.fhir.bundle`: parse, validate, ids) on the validation
   pool, so the node's loop keeps producing blocks;
2. answering the plan's conditional queries (``ifNoneExist``, ``PUT Type?query``,
   ``Practitioner?identifier=...`` references) from the search index
   (:class:`IndexLookup`);
3. sealing every write (``Node._prepare_put``: policy, encryption, blob) and committing:
   a **transaction** all or nothing — one ``batch`` tx, or a staged import
   (``import.begin``/``part``/``commit``, ADR 4 §5) when it is larger than a tx, so
   nothing is visible before the commit block and a crash leaves only invisible stage
   entries that the node aborts when it starts; a **batch** entry by entry, each with
   its own status and OperationOutcome;
4. the reads (GET entries) once the writes are committed, and the response entries.

Re-posting the same Bundle changes nothing: ids come from the ``urn:uuid:`` fullUrls,
conditional creates find what the first load created, and identical content makes no
new version. Functions here are the node's own (they use ``Node``'s write helpers).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medledger.core import policy
from medledger.core import state as st
from medledger.crypto import envelope
from medledger.crypto.canonical import canonical, loads, sha256
from medledger.errors import InvalidInput, MedledgerError, PreconditionFailed
from medledger.fhir import bundle as fb
from medledger.fhir.labels import patient_of
from medledger.fhir.outcome import (
    EntryResponse,
    etag,
    operation_outcome,
    searchset_bundle,
    status_line,
)
from medledger.node import idempotency
from medledger.node.records import seal_record
from medledger.node.service import BulkWrite, Node, PutJob, iso
from medledger.search.compartment import directory_type
from medledger.search.extract import Extracted, extract

if TYPE_CHECKING:
    from medledger.node.auth import Session

__all__ = ["BundleResult", "IndexLookup", "process_bundle"]


@dataclass(frozen=True, slots=True)
class BundleResult:
    """The response of a transaction/batch: one entry per request entry, in order."""

    kind: str  # "transaction" | "batch"
    entries: list[EntryResponse]

    @property
    def response_type(self) -> str:
        return f"{self.kind}-response"


# -- conditional queries ----------------------------------------------------------------------


class IndexLookup:
    """Conditional queries of a Bundle (``ifNoneExist``, ``PUT Type?query``,
    ``Practitioner?identifier=...`` references) answered by the node's search index.

    Directory records (Practitioner, Organization, Location, ...) are looked up by the
    node itself — one shared directory, readable by every member's staff. Queries on
    patient records are searches with the caller's own session, so policy applies and
    the probe is audited: a record the caller may not see matches nothing.
    """

    def __init__(self, node: Node) -> None:
        self.node = node

    async def answer(self, session: Session, queries: Iterable[fb.Query]
                     ) -> dict[fb.Query, list[str]]:
        out: dict[fb.Query, list[str]] = {}
        for query in queries:
            if directory_type(query.resource_type):
                out[query] = await self.node.searcher.resolve(query.resource_type,
                                                              query.params)
            else:
                found = await self.node.search(session, query.resource_type,
                                               [*query.params, ("_count", "2")])
                out[query] = [str(h.meta["id"]) for h in found.found]
        return out


# -- the whole Bundle -------------------------------------------------------------------------


async def process_bundle(node: Node, session: Session, data: bytes | str) -> BundleResult:
    """Plan, resolve, seal and commit a transaction or batch Bundle (see the module doc);
    with an ``Idempotency-Key``, once per key (``idempotency.BundleJournal``)."""
    node._allowed(session, policy.decide_write_scope(node._caller(session), "*", True),
                  "transaction", None)
    node._writer_of(session)
    req = idempotency.current()
    if req is None:
        return await _process(node, session, data, _new_uuid)
    body = data.encode() if isinstance(data, str) else data
    first = node.bundle_journal.begin(req, sha256(body))
    if first is not None:
        return _result_from_journal(first)
    del body
    # the Bundle is idempotent as a whole: its txs are not journaled one by one
    outside = idempotency.set_current(None)
    journaled: bytes | None = None
    refused = False
    try:
        result = await _process(node, session, data, idempotency.KeyedIds(req.scope, req.key))
        journaled = _result_for_journal(result)
    except MedledgerError as err:
        refused = err.http_status < 500  # nothing committed: the key is free again
        raise
    finally:
        idempotency.reset_current(outside)
        node.bundle_journal.finish(req, journaled, refused)
    return result


def _result_for_journal(result: BundleResult) -> bytes | None:
    """The response as the journal keeps it, or None if it holds a resource or an
    OperationOutcome (a retry then runs again; see ``idempotency.BundleJournal``)."""
    if any(e.resource is not None or e.outcome is not None for e in result.entries):
        return None
    return canonical([result.kind, [[e.status, e.location, e.etag, e.last_modified]
                                    for e in result.entries]])


def _result_from_journal(raw: bytes) -> BundleResult:
    kind, entries = loads(raw)
    return BundleResult(kind, [EntryResponse(*e) for e in entries])


async def _process(node: Node, session: Session, data: bytes | str,
                   new_id: Callable[[], str]) -> BundleResult:
    draft = await _read_bundle(node, data, new_id)
    answers = await IndexLookup(node).answer(session, draft.queries)
    plan = fb.finish_plan(draft, answers)
    del draft  # the plan holds the resources now
    bulk = BulkWrite(node._writer_of(session), {})  # looked up once per Bundle
    if plan.kind == "transaction":
        responses = await _transaction(node, session, plan, bulk)
    else:
        responses = await _batch(node, session, plan, bulk)
    responses.update(await _reads(node, session, plan))
    return BundleResult(plan.kind, [responses[i] for i in sorted(responses)])


SPLIT_BYTES = 1024 * 1024  # a Bundle from this size is validated on every worker


async def _read_bundle(node: Node, data: bytes | str, new_id: Callable[[], str]) -> fb.BundleDraft:
    """Read and validate the Bundle on the validation pool: a large one in as many
    slices as the pool has workers, validated at once (each worker parses the JSON and
    validates its slice); a transaction's first problem in entry order is raised. New
    ids are drawn here, on the loop, in entry order."""
    parts = node.validator_workers if len(data) >= SPLIT_BYTES else 1
    read: list[fb.BundleDraft] = await _all_then_first_failure(
        node._off_loop(fb.read_entries, data, k, parts) for k in range(parts))
    return fb.assign_ids(fb.join(read), new_id)


async def _all_then_first_failure(jobs: Iterable[Awaitable[Any]]) -> list[Any]:
    """Every job's result, in order, once all have ended; else the first failure in
    order, raised only when every job has ended (none is left running after it)."""
    done = await asyncio.gather(*jobs, return_exceptions=True)
    for outcome in done:
        if isinstance(outcome, BaseException):
            raise outcome
    return done


@dataclass(slots=True)
class _Write:
    """A planned write: authorised (``job``, to be sealed) or unchanged (``body`` None),
    with the registration ops of a patient it creates."""

    entry: fb.PlannedEntry
    ops: list[dict[str, Any]]
    job: PutJob | None
    head: dict[str, Any] | None
    body: dict[str, Any] | None = None  # the record.put body once sealed


async def _authorise(node: Node, session: Session, entry: fb.PlannedEntry,
                     new_patient_keys: dict[str, bytes], bulk: BulkWrite) -> _Write:
    """Authorise one write (a new Patient also gets its ``actor.register`` op and
    keystore); sealing comes after, for all writes at once (:func:`_seal`)."""
    resource = dict(entry.resource)
    head = bulk.head(node.store, entry.resource_type, entry.resource_id)
    if entry.if_none_match == "*" and head is not None:
        raise PreconditionFailed(f"{entry.resource_type}/{entry.resource_id} exists "
                                 f"(version {head['v']}) and ifNoneMatch is *")
    ops: list[dict[str, Any]] = []
    patient: str | None
    if entry.resource_type == "Patient":
        patient = entry.resource_id
        if head is None:
            node._authorise_registration(session)
            await node._duplicate_check(session, resource)
            _set_aside_orphan_keystore(node, patient)
            ops, identity, _ = await node._patient_ops(resource, None)
            new_patient_keys[patient] = identity.enc_public
    else:
        patient = patient_of(resource)
    bulk.kind = entry.kind
    try:
        if patient in new_patient_keys:  # registered by this Bundle: wrap to their new key
            job = await node._authorise_put(session, resource, entry.resource_id,
                                            entry.if_match, patient, new_patient_keys[patient],
                                            bulk=bulk)
        else:
            job = await node._authorise_put(session, resource, entry.resource_id,
                                            entry.if_match, bulk=bulk)
    except MedledgerError:
        if ops:  # not registered after all: its keystore goes
            node.home.user_keystore(entry.resource_id).unlink(missing_ok=True)
            new_patient_keys.pop(entry.resource_id, None)
        raise
    if isinstance(job, PutJob):
        return _Write(entry, ops, job, job.head)
    return _Write(entry, ops, None, job.head)


SEAL_CHUNK = 256  # writes per sealing task on the worker pool
SEAL_CHUNKS_IN_FLIGHT = 4


async def _seal(node: Node, writes: list[_Write]) -> None:
    """Seal every authorised write (AES-GCM + a key wrap per reader: the costliest part
    of a write after validation) on the worker pool, in parallel chunks. Each chunk's
    blobs are stored as soon as it is sealed (on a thread: hashing and SQLite release the
    loop), before the ledger references them, and its resources are released then: a
    large Bundle is never held twice, as plaintext and as sealed blobs."""
    pending = [w for w in writes if w.job is not None]
    chunks = [pending[i:i + SEAL_CHUNK] for i in range(0, len(pending), SEAL_CHUNK)]
    in_flight = asyncio.Semaphore(SEAL_CHUNKS_IN_FLIGHT)  # bounds what waits pickled

    async def seal_chunk(chunk: list[_Write]) -> None:
        async with in_flight:
            sealed: list[tuple[dict[str, Any], bytes, Extracted]] = await node._off_loop(
                seal_many, node.chain,
                [(w.job.resource, w.job.patient, w.job.version, w.job.readers)
                 for w in chunk if w.job is not None])
            blobs: list[tuple[str, bytes]] = []
            refs: dict[str, str] = {}
            for w, (fields, blob, values) in zip(chunk, sealed, strict=True):
                assert w.job is not None
                # the index takes these values when the version commits (no decryption);
                # a Patient's resource too, for its blocking keys
                node.index_hint(fields["blob"], values, w.job.resource
                                if w.entry.resource_type == "Patient" else None)
                body = w.job.prepared(fields).body
                assert body is not None
                w.body = body
                w.ops.append({"kind": "record.put", "body": body})
                w.job = None  # sealed: the plaintext goes (the plan's copy too)
                w.entry.resource.clear()
                blobs.append((fields["blob"], blob))
                refs[fields["blob"]] = f"{body['type']}/{body['id']}/{body['version']}"
            del sealed
            # "pending" until the import commits
            await asyncio.to_thread(node.blobs.put, blobs, refs)

    # every chunk ends before a failure is raised: none stores blobs after an undo
    await _all_then_first_failure(seal_chunk(chunk) for chunk in chunks)


def seal_many(chain: str, items: list[tuple[dict[str, Any], str | None, int, dict[str, bytes]]]
              ) -> list[tuple[dict[str, Any], bytes, Extracted]]:
    """``seal_record`` for many writes (runs on the worker pool), as one batch: every
    version gets its own data key, wrapped to each reader under one ephemeral X25519 key
    per reader for the whole batch (``envelope.BatchWrapper``), discarded when done. Each
    comes with its search index values, extracted here from the plaintext the worker
    holds anyway, so the node's index need not decrypt its own writes."""
    with envelope.BatchWrapper() as wrapper:
        return [(*seal_record(chain, resource, patient, version, readers, wrapper=wrapper),
                 extract(resource))
                for resource, patient, version, readers in items]


def _set_aside_orphan_keystore(node: Node, pid: str) -> None:
    """A keystore made for a registration that an earlier run of this node never
    committed (killed mid-import) would block the client's retry: it is renamed aside
    (kept, not deleted) when its patient is not registered and the file predates this
    process. A keystore being written by this process is never touched."""
    path = node.home.user_keystore(pid)
    try:
        made = path.stat().st_mtime
    except FileNotFoundError:
        return
    if st.principal(node.store, pid) is None and made < node.started_s:
        path.rename(path.with_name(f"{path.name}.orphan-{int(made)}"))


def _entry_error(entry: fb.EntryPlan | fb.PlannedEntry, err: MedledgerError) -> MedledgerError:
    """``err`` with the entry named, as planning problems are."""
    if err.message.startswith("Bundle.entry["):
        return err
    where = f"Bundle.entry[{entry.index}] ({entry.resource_type}/{entry.resource_id})"
    named = type(err)(f"{where}: {err.message}", hint=err.hint)
    return named


def _undo(node: Node, writes: Iterable[_Write], new_patient_keys: Mapping[str, bytes]) -> None:
    """Forget what was sealed for writes that were not committed: blobs and keystores."""
    node._drop_blobs(w.body for w in writes)
    for pid in new_patient_keys:
        if st.actor(node.store, pid) is None:
            node.home.user_keystore(pid).unlink(missing_ok=True)


async def _transaction(node: Node, session: Session, plan: fb.BundlePlan, bulk: BulkWrite
                       ) -> dict[int, EntryResponse]:
    writes: list[_Write] = []
    new_patient_keys: dict[str, bytes] = {}
    # Patients first: the records of a patient this Bundle registers are sealed to them.
    ordered = sorted(plan.writes(), key=lambda e: e.resource_type != "Patient")
    bulk.heads = _heads(node, ordered)
    try:
        for entry in ordered:
            try:
                writes.append(await _authorise(node, session, entry, new_patient_keys, bulk))
            except MedledgerError as err:
                raise _entry_error(entry, err) from err
        await _seal(node, writes)
        ops = [op for w in writes for op in w.ops]
        try:
            await node.submit_ops(ops)
        except MedledgerError as err:
            node._audit(session, "transaction", None, [], outcome="4", reason=str(err))
            raise
    except BaseException:
        _undo(node, writes, new_patient_keys)
        raise
    responses = _transaction_written(node, writes)
    responses.update(_matched(plan, st.record_heads(node.store, _match_refs(plan))))
    patients = {w.entry.resource_id if w.entry.resource_type == "Patient"
                else (w.body or w.head or {}).get("patient") for w in writes}
    for pid in sorted(p for p in patients if p):
        node._audit(session, "transaction", pid, [],
                    detail=f"{len(plan.entries)} bundle entries")
    return responses


async def _batch(node: Node, session: Session, plan: fb.BundlePlan, bulk: BulkWrite
                 ) -> dict[int, EntryResponse]:
    responses: dict[int, EntryResponse] = {}
    for planned in plan.entries:
        if planned.problem is not None:
            responses[planned.index] = _failed(planned.problem)
    responses.update(_matched(plan, st.record_heads(node.store, _match_refs(plan))))
    writes: list[_Write] = []
    new_patient_keys: dict[str, bytes] = {}
    ordered = sorted(plan.writes(), key=lambda e: e.resource_type != "Patient")
    bulk.heads = _heads(node, ordered)
    for entry in ordered:
        try:
            writes.append(await _authorise(node, session, entry, new_patient_keys, bulk))
        except MedledgerError as err:
            responses[entry.index] = _failed(_entry_error(entry, err))
    await _seal(node, writes)
    pending = [w for w in writes if w.ops]
    try:
        await node.submit_ops([op for w in pending for op in w.ops])
        committed = writes
    except MedledgerError:
        # one entry the ledger refused must not take the others with it: one by one
        committed = [w for w in writes if not w.ops]
        for w in pending:
            try:
                await node.submit_ops(w.ops)
                committed.append(w)
            except MedledgerError as err:
                _undo(node, [w], {})
                responses[w.entry.index] = _failed(_entry_error(w.entry, err))
    for pid in new_patient_keys:
        if st.actor(node.store, pid) is None:
            node.home.user_keystore(pid).unlink(missing_ok=True)
    heads = st.record_heads(node.store, [(w.entry.resource_type, w.entry.resource_id)
                                         for w in committed])
    for w in committed:
        responses[w.entry.index] = _written(w, heads)
    patients = sorted({str(h["patient"]) for h in heads.values() if h["patient"]})
    for pid in patients:
        node._audit(session, "batch", pid, [], detail=f"{len(plan.entries)} bundle entries")
    return responses


Heads = dict[tuple[str, str], dict[str, Any]]


def _heads(node: Node, entries: Iterable[fb.PlannedEntry]
           ) -> dict[tuple[str, str], dict[str, Any]]:
    """The current heads of the records ``entries`` write, in one batched read."""
    return st.record_heads(node.store, [(e.resource_type, e.resource_id) for e in entries])


def _transaction_written(node: Node, writes: list[_Write]) -> dict[int, EntryResponse]:
    """Response entries of a committed transaction's writes, from what it committed
    rather than a read per entry: its ``record.put`` ops commit in one block (one
    ``batch`` tx, or the staged import's commit), so each version is its body's and
    the time that block's, read once from a version entry (no later write replaces
    it). An unchanged entry answers with the head it matched."""
    bodies = [w.body for w in writes if w.body is not None]
    time_ns = 0
    if bodies:
        first = st.record_version(node.store, bodies[0]["type"], bodies[0]["id"],
                                  bodies[0]["version"])
        assert first is not None  # committed
        time_ns = first["time_ns"]
    out: dict[int, EntryResponse] = {}
    for w in writes:
        if w.body is not None:
            meta = {"type": w.body["type"], "id": w.body["id"], "v": w.body["version"],
                    "time_ns": time_ns}
        else:
            assert w.head is not None  # unchanged: it matched the head
            meta = w.head
        out[w.entry.index] = _located(meta, "201 Created" if w.head is None else "200 OK")
    return out


def _match_refs(plan: fb.BundlePlan) -> list[tuple[str, str]]:
    refs = []
    for entry in plan.entries:
        if entry.action == "match":
            assert entry.resource_type is not None and entry.resource_id is not None
            refs.append((entry.resource_type, entry.resource_id))
    return refs


def _written(write: _Write, heads: Heads) -> EntryResponse:
    meta = heads[(write.entry.resource_type, write.entry.resource_id)]
    status = "201 Created" if write.head is None else "200 OK"
    return _located(meta, status)


def _matched(plan: fb.BundlePlan, heads: Heads) -> dict[int, EntryResponse]:
    """Conditional creates that found their resource: 200 with its location."""
    out: dict[int, EntryResponse] = {}
    for entry in plan.entries:
        if entry.action == "match":
            meta = heads.get((str(entry.resource_type), str(entry.resource_id)))
            if meta is not None:
                out[entry.index] = _located(meta, "200 OK")
    return out


@functools.lru_cache(maxsize=64)
def _iso(time_ns: int) -> str:
    """``iso``, once per block time (every write of a block shares it)."""
    return iso(time_ns)


def _located(meta: dict[str, Any], status: str) -> EntryResponse:
    return EntryResponse(status, f"{meta['type']}/{meta['id']}/_history/{meta['v']}",
                         etag(meta["v"]), _iso(meta["time_ns"]))


def _failed(err: MedledgerError) -> EntryResponse:
    return EntryResponse(status_line(err.http_status),
                         outcome=operation_outcome("error", err.issue_code, str(err)))


# -- reads (GET entries) ----------------------------------------------------------------------


async def _reads(node: Node, session: Session, plan: fb.BundlePlan
                 ) -> dict[int, EntryResponse]:
    """GET entries, answered after the writes with the caller's own rights. In a
    transaction the writes are committed by then: a refused read is reported on its
    entry rather than undoing them."""
    out: dict[int, EntryResponse] = {}
    for entry in plan.entries:
        if entry.action != "read":
            continue
        try:
            out[entry.index] = await _read(node, session, entry)
        except MedledgerError as err:
            out[entry.index] = _failed(_entry_error(entry, err))
    return out


async def _read(node: Node, session: Session, entry: fb.EntryPlan) -> EntryResponse:
    url = entry.url or ""
    path, _, query = url.partition("?")
    parts = path.split("/")
    rtype = parts[0]
    if query or len(parts) == 1:
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        result = await node.search(session, rtype, params)
        resources = [s.resource for s in result.found]
        base = node.config.base_url + "/fhir"
        total = result.total if result.total is not None else len(resources)
        found = searchset_bundle(resources, base, total, f"{base}/{url}")
        return EntryResponse("200 OK", resource=found)
    version = None
    if len(parts) == 4 and parts[2] == "_history" and parts[3].isdigit():
        version = int(parts[3])
    elif len(parts) != 2:
        raise InvalidInput(f"request.url {url!r}: GET entries read Type/id, "
                           "Type/id/_history/version or search Type?params")
    stored = await node.read(session, rtype, parts[1], version)
    meta = stored.meta
    if entry.if_none_match is not None and entry.if_none_match == meta["v"]:
        return EntryResponse("304 Not Modified", etag=etag(meta["v"]))
    return EntryResponse("200 OK", f"{rtype}/{meta['id']}/_history/{meta['v']}",
                         etag(meta["v"]), iso(meta["time_ns"]), resource=stored.resource)


def _new_uuid() -> str:
    return str(uuid.uuid4())


