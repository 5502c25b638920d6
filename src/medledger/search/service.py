"""Search for one node: its index, the sync worker, the engine, ``$match`` and the
duplicate check, with the node's rules (scopes, policy per record, withheld notices,
audit per patient, break-the-glass on one patient, patients see only their own).

``Node`` keeps thin methods that call these; nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medledger.core import policy
from medledger.core import state as st
from medledger.crypto.kdf import derive_key
from medledger.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    MedledgerError,
    NotFound,
    StorageError,
    Unavailable,
    busy,
)
from medledger.fhir import match
from medledger.fhir.validate import parse_resource
from medledger.search import matching
from medledger.search.engine import (
    Cursors,
    Engine,
    Scope,
    SearchResult,
    candidates,
    check_patient_scope,
    plan,
    ref,
)
from medledger.search.index import SearchIndex, index_key
from medledger.search.sync import IndexSync

log = logging.getLogger(__name__)
CURSOR_INFO = "medledger search cursor v1"
WAIT_S = 30.0  # how long a search waits for the index to reach the ledger height


def open_index(path: Path, key: bytes) -> SearchIndex:
    """The node's index; one made under an earlier organisation key (``key rotate``) or
    damaged is derived data: it is deleted and rebuilt from the ledger (catch-up)."""
    try:
        return SearchIndex(path, key, matching.blocking_keys)
    except StorageError as err:
        log.warning("search index: %s; rebuilding it from the ledger", err)
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        return SearchIndex(path, key, matching.blocking_keys)


def as_items(params: Mapping[str, str] | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(params, Mapping):
        return [(k, v) for k, v in params.items()]
    return list(params)


class NodeSearch:
    def __init__(self, node: Any) -> None:
        self.node = node
        key = node.org.enc_private
        self.index = open_index(node.home.index_path, index_key(key))
        self.sync = IndexSync(self.index, node.store, node.decrypt, node.blobs.have)
        self.engine = Engine(self.index, Cursors(derive_key(key, CURSOR_INFO)),
                             lambda: int(node.clock() * 1000))
        node.app.on_commit.append(self.sync.on_commit)
        self.sync.start()

    def close(self) -> None:
        if self.sync.on_commit in self.node.app.on_commit:
            self.node.app.on_commit.remove(self.sync.on_commit)
        self.sync.stop()
        self.index.close()

    # ------------------------------------------------------------ freshness
    async def wait(self) -> None:
        """Wait (bounded, off the event loop) until the index reflects the ledger as of
        now: a client sees its own writes."""
        height = int(self.node.store.height)
        if self.index.height < height:
            ok = await asyncio.to_thread(self.sync.wait_for, height, WAIT_S)
            if not ok:
                if self.sync.error:
                    raise Unavailable(self.sync.error)
                raise busy("the search index is still catching up with the ledger "
                           f"(at block {self.index.height} of {height}); retry in a moment",
                           retry_after_s=2)

    async def _opened(self, q_elements: tuple[str, ...] | None, result: SearchResult
                      ) -> SearchResult:
        """Fetch the page's content if this node lacks it (ADR 4), then decrypt it on a
        worker thread (the event loop keeps answering other clients meanwhile)."""
        await self.node.ensure_blobs([h.meta for h in (*result.found, *result.included)])
        return await asyncio.to_thread(self.engine.open, self.node, result, q_elements)

    # ------------------------------------------------------------ conditional queries
    async def resolve(self, rtype: str, params: Sequence[tuple[str, str]], limit: int = 2
                      ) -> list[str]:
        """Ids (at most ``limit``) of the current records of ``rtype`` that a conditional
        query matches (a Bundle's ``ifNoneExist``, conditional update or reference). The
        node's own lookup: no reader's policy, so callers use it for directory records
        and search with the caller's session for patient records."""
        await self.wait()
        q = self.engine.parse(rtype, list(params), True)
        p = plan(self.index, q, Scope(None, None, None))
        if p is None:
            return []
        return [str(row[2]) for row in candidates(self.index, p, None, limit, False)]

    # ------------------------------------------------------------ search
    async def search(self, session: Any, rtype: str,
                     params: Mapping[str, str] | Sequence[tuple[str, str]],
                     break_glass: str | None = None, subtype: str = "search",
                     strict: bool = False) -> SearchResult:
        node = self.node
        node._check_serving()
        items = as_items(params)
        await self.wait()
        q = self.engine.parse(rtype, items, strict)
        patients = q.patient_refs
        caller = node._caller(session)
        named = sorted(patients)[0] if len(patients) == 1 else None
        node._allowed(session, policy.decide_search(caller, rtype, named), subtype, named)
        try:
            own = check_patient_scope(session, q)
        except Forbidden as err:
            raise node._deny(session, subtype, sorted(patients)[0], [],
                             err.message) from err
        if break_glass is not None and len(patients) != 1:
            raise InvalidInput("break-the-glass applies to one patient: add patient=<id>")
        scope = Scope(session, break_glass, own)
        found = await asyncio.to_thread(self.engine.run, node, q, items, scope, False)
        result = await self._opened(q.elements, found)
        self._audit(session, rtype, items, result, subtype, break_glass,
                    next(iter(patients)) if len(patients) == 1 else own)
        return result

    async def everything(self, session: Any, patient: str, break_glass: str | None = None
                         ) -> SearchResult:
        node = self.node
        node._check_serving()
        node._allowed(session, policy.decide_everything(node._caller(session), patient),
                      "everything", patient)
        if st.actor(node.store, patient) is None:
            raise NotFound(f"Patient/{patient} does not exist")
        await self.wait()
        q = self.engine.parse("*", [], False)
        scope = Scope(session, break_glass, None, everything_of=patient, unlimited=True)
        found = await asyncio.to_thread(self.engine.run, node, q, [], scope, False)
        result = await self._opened(None, found)
        self._audit(session, "*", [("patient", patient)], result, "everything", break_glass,
                    patient)
        return result

    def _audit(self, session: Any, rtype: str, items: list[tuple[str, str]],
               result: SearchResult, subtype: str, break_glass: str | None,
               patient: str | None) -> None:
        node = self.node
        names = sorted({n for n, _ in items})
        detail = (f"{rtype} search ({', '.join(names)}): {len(result.found)} returned, "
                  f"{len(result.withheld)} withheld")
        hits = [*result.found, *result.included]
        basis = ",".join(sorted(result.bases))
        purpose = "PATRQT" if session.kind == "patient" else "TREAT"
        if patient:
            node._audit(session, subtype, patient, [ref(h.meta) for h in hits][:50],
                        basis=basis, break_glass=result.break_glass,
                        purpose="ETREAT" if result.break_glass else purpose,
                        reason=break_glass or "", detail=detail)
            return
        by_patient: dict[str, list[str]] = {}  # a type-wide search: every patient whose
        denied = [w.meta for w in result.withheld if w.meta is not None]  # records it
        for m in [h.meta for h in hits] + denied:  # returned or withheld sees it (a probe)
            if m.get("patient"):
                by_patient.setdefault(m["patient"], []).append(ref(m))
        for pid, refs in sorted(by_patient.items()):
            node._audit(session, subtype, pid, refs[:50], basis=basis, purpose=purpose,
                        detail=detail)
        if not by_patient:
            node._audit(session, subtype, None, [], detail=detail)

    # ------------------------------------------------------------ matching
    async def _candidates(self, resource: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Decrypted heads of the patients sharing a blocking key with ``resource``."""
        await self.wait()
        metas = [m for pid in matching.candidate_ids(self.index, resource)
                 if (m := st.record_head(self.node.store, "Patient", pid)) is not None
                 and not st.erased(m)]
        try:
            await self.node.ensure_blobs(metas)
        except MedledgerError as err:  # score what is here; say what is not
            log.warning("$match: some candidates' content is not here yet: %s", err)
        out = []
        for meta in metas:
            try:
                out.append(self.node.decrypt(meta))
            except MedledgerError:
                continue
        return out

    async def match_patients(self, session: Any, resource: dict[str, Any], only_certain: bool,
                             count: int | None
                             ) -> list[tuple[dict[str, Any], match.MatchResult]]:
        node = self.node
        caller = node._caller(session)
        node._allowed(session, policy.decide_match(caller), "match", None)
        candidate = parse_resource(resource, "Patient")
        found = matching.score(candidate, await self._candidates(candidate), only_certain,
                               count)
        visible = []
        for p, r in found:  # only patients whose demographics this practitioner may read
            meta = st.record_head(node.store, "Patient", str(p["id"]))
            if meta is None:
                continue
            decision = policy.decide_record(node.store, caller, meta, node.now_s)
            if decision.allowed:
                visible.append((dict(p), r))
            node._audit(session, "match", str(p["id"]), [ref(meta)],
                        outcome="0" if decision.allowed else "4",
                        detail=f"$match candidate ({r.grade})"
                        + ("" if decision.allowed else ": withheld from the caller"))
        return visible

    async def duplicate_check(self, session: Any, resource: dict[str, Any]
                              ) -> tuple[str | None, str]:
        """Raise ``Conflict`` on a certain match not linked by the client; flag probables.
        Each match is told the registrar as the node's ``duplicate_notice`` allows."""
        linked = {str(link.get("other", {}).get("reference", "")).removeprefix("Patient/")
                  for link in resource.get("link", [])}
        warning = None
        for existing, result in matching.score(resource, await self._candidates(resource)):
            if existing.get("id") == resource.get("id") or existing.get("id") in linked:
                continue
            if result.grade == "certain":
                raise Conflict(self.node.duplicate_notice(session, str(existing["id"]),
                                                          "certain"))
            if result.grade == "probable" and warning is None:
                warning = self.node.duplicate_notice(session, str(existing["id"]), "probable")
        return warning, warning or ""
