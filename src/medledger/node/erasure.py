"""Erasure at the node's edges (ADR 4 section 4): requests, results, retention, catch-up.

The state machine marks versions erased (``record.erase``) and every node deletes their
sealed blobs on commit (``node.replica``). This module owns what surrounds that:

- ``parse_erase_parameters``: the FHIR ``Patient/{id}/$erase`` Parameters resource
  (scope, legal basis, optionally a ``record.erase`` tx the patient signed client-side);
- ``erase``: run one request through the node (the patient's session key, a pre-signed
  tx, or this node's organisation acting on a documented request), audited;
- ``erasures``: the patient's erasures as the ledger records them (who, when, basis, scope);
- ``parse_retention``: ``category=10y`` options of ``medledger init`` / ``net up`` into
  genesis ``retention`` (seconds);
- ``catch_up``: a node that starts behind its peers (restarted, or restored from a
  backup) serves no content until it has replayed the blocks it missed, erasures among
  them, so a restored copy never serves what the network erased since it was made.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from medledger.core import policy
from medledger.core import state as st
from medledger.core.machine import ERASURE_BASES, MAX_ERASE_RECORDS, RESOURCE_TYPE_RE
from medledger.core.tx import ID_RE, decode_tx
from medledger.crypto.canonical import b64d
from medledger.errors import Forbidden, InvalidInput, NotFound
from medledger.node.auth import Session

if TYPE_CHECKING:
    from medledger.node.service import Node

log = logging.getLogger(__name__)

ERASE_PARAMETERS = ("basis", "record", "category", "all", "signedTx")
DURATION_RE = re.compile(r"^(\d+)([ydhs]?)\Z")
UNIT_S = {"y": 365 * 86400, "d": 86400, "h": 3600, "s": 1, "": 1}


@dataclass(frozen=True)
class EraseRequest:
    scope: dict[str, Any]  # {"records": [...]} | {"category": c} | {"all": True}
    basis: str
    tx: bytes | None = None  # a record.erase tx signed by the patient's own key


def _value(p: dict[str, Any], name: str) -> Any:
    values = [v for k, v in p.items() if k.startswith("value")]
    if len(values) != 1:
        raise InvalidInput(f"$erase parameter {name!r} needs exactly one value[x]")
    return values[0]


def parse_erase_parameters(doc: Any) -> EraseRequest:
    """A FHIR Parameters resource: ``basis`` (code), exactly one of ``record`` (string
    ``Type/id``, repeatable), ``category`` (code) or ``all`` (boolean true), and
    optionally ``signedTx`` (base64 of a ``record.erase`` tx the patient signed)."""
    if not isinstance(doc, dict) or doc.get("resourceType") != "Parameters":
        raise InvalidInput("$erase takes a FHIR Parameters resource")
    params = doc.get("parameter")
    if not isinstance(params, list) or not params:
        raise InvalidInput("$erase needs parameters: basis and one of record, category, all")
    records: list[str] = []
    found: dict[str, Any] = {}
    for p in params:
        name = p.get("name") if isinstance(p, dict) else None
        if name not in ERASE_PARAMETERS:
            raise InvalidInput(f"$erase: unknown parameter {name!r}; known: "
                               f"{', '.join(ERASE_PARAMETERS)}")
        value = _value(p, name)
        if name == "record":
            records.append(_record_ref(value))
        elif name in found:
            raise InvalidInput(f"$erase: parameter {name!r} given twice")
        else:
            found[name] = value
    basis = found.get("basis")
    if basis not in ERASURE_BASES:
        raise InvalidInput(f"$erase: basis must be one of {', '.join(sorted(ERASURE_BASES))} "
                           f"(the legal ground of the erasure), got {basis!r}")
    scope = _scope(records, found.get("category"), found.get("all"))
    tx = found.get("signedTx")
    if tx is not None and not isinstance(tx, str):
        raise InvalidInput("$erase: signedTx must be base64")
    return EraseRequest(scope, basis, None if tx is None else b64d(tx, field="signedTx"))


def _record_ref(value: Any) -> str:
    rtype, _, rid = value.partition("/") if isinstance(value, str) else ("", "", "")
    if not RESOURCE_TYPE_RE.match(rtype) or not ID_RE.match(rid):
        raise InvalidInput(f"$erase: record must be a reference Type/id, got {value!r}")
    return f"{rtype}/{rid}"


def _scope(records: list[str], category: Any, all_: Any) -> dict[str, Any]:
    given = [n for n, v in (("record", records), ("category", category), ("all", all_)) if v]
    if len(given) != 1:
        raise InvalidInput("$erase: give exactly one scope: record (one or more), category, "
                           f"or all=true (got {', '.join(given) or 'none'})")
    if records:
        if len(records) > MAX_ERASE_RECORDS:
            raise InvalidInput(f"$erase: at most {MAX_ERASE_RECORDS} records at once")
        return {"records": sorted(set(records))}
    if category is not None:
        if category not in policy.CATEGORIES or category == policy.DIRECTORY:
            raise InvalidInput(f"$erase: unknown category {category!r}; one of "
                               + ", ".join(c for c in policy.CATEGORIES
                                           if c != policy.DIRECTORY))
        return {"category": category}
    if all_ is not True:
        raise InvalidInput("$erase: all must be true")
    return {"all": True}


async def erase(node: Node, session: Session, patient: str, req: EraseRequest
                ) -> dict[str, Any]:
    """Erase through ``node``: a pre-signed tx, or ``Node.erase`` (session key / org)."""
    if st.actor(node.store, patient) is None:
        raise NotFound(f"Patient/{patient} is not registered")
    if req.tx is None:
        return await node.erase(session, patient, req.scope, req.basis)
    tx = decode_tx(req.tx)
    body = dict(tx.body)
    if tx.kind != "record.erase" or tx.signer != patient or session.actor_id != patient \
            or body.get("patient") != patient:
        raise node._deny(session, "erase", patient, [],
                         "signedTx must be a record.erase of this patient, signed by them, "
                         "sent in their own session")
    if body.get("basis") != req.basis or {k: body.get(k) for k in req.scope} != req.scope:
        raise InvalidInput("signedTx's basis or scope differ from the parameters")
    committed = await node.submit_raw(req.tx)
    entry = st.get_json(node.store, f"erasure/{patient}/{committed.tx_hash.hex()}")
    assert entry is not None
    node._audit(session, "erase", patient, [], basis=req.basis,
                detail=f"{entry['versions']} versions erased ({req.basis})")
    return entry


def erasures(node: Node, session: Session, patient: str) -> list[dict[str, Any]]:
    """The patient's erasures, newest first (the patient, or this node's organisation
    when it cares for them)."""
    if not (session.kind == "patient" and session.actor_id == patient) and not (
            session.kind == "org" and session.actor_id == node.org.id
            and st.has_care(node.store, patient, node.org.id)):
        raise Forbidden("only the patient, or an organisation caring for them, sees their "
                        "erasures")
    out = [st.get_json(node.store, k) or {} for k, _ in node.store.scan(f"erasure/{patient}/")]
    return sorted(out, key=lambda e: e.get("at", 0), reverse=True)


def erasure_parameters(entry: dict[str, Any], height: int | None = None) -> dict[str, Any]:
    """The ``$erase`` answer: a Parameters resource naming what the ledger recorded."""
    from medledger.node.service import iso
    params: list[dict[str, Any]] = [
        {"name": "versionsErased", "valueInteger": entry["versions"]},
        {"name": "basis", "valueCode": entry["basis"]},
        {"name": "erasedBy", "valueString": entry["by"]},
        {"name": "erasedAt", "valueInstant": iso(entry["at"])},
        {"name": "transaction", "valueString": entry["tx"]}]
    scope = entry.get("scope") or {}
    for ref in scope.get("records") or []:
        params.append({"name": "record", "valueString": ref})
    if scope.get("category"):
        params.append({"name": "category", "valueCode": scope["category"]})
    if scope.get("all"):
        params.append({"name": "all", "valueBoolean": True})
    if height is not None:
        params.append({"name": "height", "valueInteger": height})
    return {"resourceType": "Parameters", "parameter": params}


def parse_retention(specs: list[str]) -> dict[str, int]:
    """``["mental-health=10y", "claims=6y"]`` -> ``{category: seconds}`` (units y, d, h, s)."""
    rules: dict[str, int] = {}
    for spec in specs:
        cat, sep, dur = spec.partition("=")
        m = DURATION_RE.match(dur.strip())
        if not sep or m is None:
            raise InvalidInput(f"retention {spec!r}: write CATEGORY=DURATION, e.g. "
                               "conditions=10y (units y, d, h, s)")
        if cat not in policy.CATEGORIES or cat == policy.DIRECTORY:
            raise InvalidInput(f"retention {spec!r}: unknown category {cat!r}")
        if cat in rules:
            raise InvalidInput(f"retention: category {cat} given twice")
        rules[cat] = int(m.group(1)) * UNIT_S[m.group(2)]
    return rules


# ---------------------------------------------------------------- catch-up after a restart

async def peer_height(node: Node, timeout_s: float = 2.0) -> int:
    """The height the reachable member nodes agree on (``trusted_height``; 0 when none
    answers)."""
    peers = node.replica.peers()
    heights = []
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for url in peers.values():
            try:
                doc = (await client.get(f"{url}/ledger/status")).json()
                heights.append(int(doc.get("height", 0)))
            except (httpx.HTTPError, ValueError, TypeError):
                continue
    return trusted_height(heights, members=len(peers) + 1)


def trusted_height(reported: list[int], members: int) -> int:
    """The highest height that cannot come from liars alone: with ``members`` nodes, up
    to ``f = (members - 1) // 3`` may be faulty (BFT), so the ``f`` highest reports are
    set aside. A peer claiming a height nobody has cannot keep this node from serving;
    honest peers differ by a block or two, and blocks after the target are applied as
    the node follows the network anyway. With no more answers than ``f`` the lowest
    claim is the target (``catch_up`` asks again while it waits)."""
    liars = (members - 1) // 3
    heights = sorted(h for h in reported if h >= 0)
    if len(heights) <= liars:  # too few answers to outvote a liar: the lowest claim
        return heights[0] if heights else 0
    return heights[len(heights) - liars - 1]


async def catch_up(node: Node, poll_s: float = 0.2, ask_again_s: float = 5.0) -> None:
    """Serve no content until this node has the blocks its peers had when it started.

    Set before the API answers (``node.catching_up``), cleared once the local height
    reaches the peers' height: every erasure committed meanwhile has then been replayed
    and its blobs deleted (a backup restored from before an erasure included)."""
    node.catching_up = "asking member nodes for their height"
    try:
        target = await peer_height(node)
        asked = time.monotonic()
        while node.store.height < target:
            node.catching_up = (f"catching up with the network (block {node.store.height} of "
                                f"{target}); content is served once every erasure since "
                                "this node's copy was made has been applied")
            await asyncio.sleep(poll_s)
            if time.monotonic() - asked > ask_again_s:  # more peers may answer by now
                fresh = await peer_height(node)
                target = min(target, fresh) if fresh else target
                asked = time.monotonic()
        if target:
            log.info("caught up with the network at height %d", node.store.height)
    finally:
        node.catching_up = None
