"""Patient-rights routes: erasure, accounting of disclosures, key recovery, onboarding.

Thin: parse, call ``node.erasure`` / ``node.disclosures`` / ``node.recovery`` /
``node.onboarding``, answer FHIR (Parameters, Bundle) or portal JSON.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from medledger.api.common import fhir_json, json_body, node_of, session_of
from medledger.node import erasure

router = APIRouter()


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


# ------------------------------------------------------------------ erasure

@router.post("/fhir/Patient/{pid}/$erase")
async def erase(request: Request, pid: str) -> Response:
    """Crypto-shred a patient's records on every node (ADR 4): Parameters in (basis and
    one scope), Parameters out (what the ledger recorded)."""
    node, session = node_of(request), session_of(request)
    req = erasure.parse_erase_parameters(await json_body(request))
    entry = await erasure.erase(node, session, pid, req)
    found = node.store.tx(bytes.fromhex(entry["tx"]))
    return fhir_json(erasure.erasure_parameters(entry, found[0] if found else None))


@router.get("/api/erasures")
async def my_erasures(request: Request) -> Response:
    node, session = node_of(request), session_of(request)
    patient = request.query_params.get("patient") or session.actor_id
    return _json(erasure.erasures(node, session, patient))
