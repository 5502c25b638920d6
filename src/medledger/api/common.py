"""Helpers shared by the route modules: JSON responses, errors, sessions, bodies."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request, Response

from medledger.errors import InvalidInput, MedledgerError
from medledger.fhir.outcome import operation_outcome
from medledger.node.auth import Session
from medledger.node.service import Node

FHIR_JSON = "application/fhir+json"


def fhir_json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=FHIR_JSON,
                    headers=headers)


def outcome_response(err: MedledgerError, status: int | None = None,
                     code: str | None = None) -> Response:
    doc = operation_outcome("error", code or err.issue_code, str(err))
    headers = {"WWW-Authenticate": "Bearer"} if (status or err.http_status) == 401 else None
    return fhir_json(doc, status or err.http_status, headers)


def node_of(request: Request) -> Node:
    return request.app.state.node  # type: ignore[no-any-return]


def session_of(request: Request) -> Session:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else None
    if token is None:
        token = request.cookies.get("medledger_token")
    return node_of(request).auth.session(token)


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise InvalidInput("request body is empty; expected JSON")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from exc


def break_glass(request: Request) -> str | None:
    value = request.headers.get("x-break-glass-reason")
    return value if value is not None else None
