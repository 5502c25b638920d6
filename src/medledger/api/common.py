"""Helpers shared by the route modules: JSON responses, errors, sessions, bodies."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
from fastapi import Request, Response

from medledger.errors import (
    Forbidden,
    InvalidInput,
    MedledgerError,
    UnsupportedMediaType,
    busy,
)
from medledger.fhir.outcome import operation_outcome
from medledger.node.auth import Session
from medledger.node.pacing import PacedSlots
from medledger.node.service import Node

FHIR_JSON = "application/fhir+json"
T = TypeVar("T")


def fhir_json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=FHIR_JSON,
                    headers=headers)


def outcome_response(err: MedledgerError, status: int | None = None,
                     code: str | None = None) -> Response:
    doc = operation_outcome("error", code or err.issue_code, str(err))
    headers = {"WWW-Authenticate": "Bearer"} if (status or err.http_status) == 401 else {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    return fhir_json(doc, status or err.http_status, headers)


def node_of(request: Request) -> Node:
    return request.app.state.node  # type: ignore[no-any-return]


def session_of(request: Request) -> Session:
    """The caller's session from ``Authorization: Bearer`` or, for the portal, the session
    cookie; a cookie-authenticated state change must come from this origin (CSRF)."""
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else None
    if token is None:
        token = request.cookies.get("medledger_token")
        if token and request.method not in SAFE_METHODS:
            check_browser_write(request)
    return node_of(request).auth.session(token)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
JSON_TYPES = frozenset({"application/json", "application/fhir+json"})


def check_browser_write(request: Request, *, origin_required: bool = True) -> None:
    """CSRF defence for requests a browser sends with our cookie: the ``Origin`` must be
    this node's own origin (scheme, host and port: a page on another port of the same
    host is another origin, though the same *site* for SameSite cookies), and the body
    must be JSON (a cross-site HTML form cannot send that content type)."""
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    public = node_of(request).config.base_url.rstrip("/").lower()
    if origin is None and not origin_required:
        pass  # not a browser (browsers send Origin with every POST)
    elif origin is None or origin.lower() not in (own.lower(), public):
        raise Forbidden(f"cross-origin request refused: Origin {origin or '(none)'} is not "
                        f"{own}; browsers must send this node's own origin with the session "
                        "cookie (API clients use a bearer token)")
    if request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
        raise Forbidden("cross-site request refused (Sec-Fetch-Site)")
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise UnsupportedMediaType(f"a browser request with the session cookie must send "
                                   f"Content-Type: application/json (got {ctype or 'none'})")


def client_address(request: Request) -> str:
    """The peer address the login throttle counts (no proxy headers trusted)."""
    return request.client.host if request.client else ""


async def off_loop(request: Request, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a costly node call (search, decryption of many records) bounded: a plain
    function on the node's worker threads, so the event loop keeps answering everyone
    else; a coroutine function (one that awaits I/O itself) in the same bounded slots."""
    limiter: WorkLimiter = request.app.state.work_limiter
    if inspect.iscoroutinefunction(fn):
        return await limiter.run_async(fn, *args)
    return await limiter.run(fn, *args)


class WorkLimiter:
    """At most ``workers`` costly calls at once, at most ``max_waiting`` queued behind them;
    beyond that a 503 (busy, retry) instead of an ever-longer queue. When calls queue,
    they keep to ``max_share`` of the node's time (``node.pacing.PacedSlots``): a search
    flood leaves the rest to the other clients' reads; a client searching alone is never
    slowed."""

    def __init__(self, workers: int = 2, max_waiting: int = 64, max_share: float = 1.0
                 ) -> None:
        self.workers = workers
        self.max_waiting = max_waiting
        self._pool: ThreadPoolExecutor | None = None
        self._slots = PacedSlots(workers, max_share)
        self._queued = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="work")
        pool = self._pool
        call = functools.partial(fn, *args)
        return await self.run_async(
            lambda: asyncio.get_running_loop().run_in_executor(pool, call))

    async def run_async(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._queued >= self.workers + self.max_waiting:
            raise busy("the node is busy with other searches; retry in a moment")
        self._queued += 1
        try:
            async with self._slots.hold():
                return await fn(*args)
        finally:
            self._queued -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise InvalidInput("request body is empty; expected JSON")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from exc


def parse_count(value: str | None, default: int, name: str = "_count",
                maximum: int = 1000, minimum: int = 1) -> int:
    """A page size from a query string: ASCII digits only (``"²".isdigit()`` is true),
    1..``maximum``; anything else is a 400."""
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit() and len(value) <= 6) or not \
            minimum <= int(value) <= maximum:
        raise InvalidInput(f"{name} must be a whole number from {minimum} to {maximum}")
    return int(value)


def json_body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI for a route that parses its JSON body itself (docs and API fuzzing)."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


def query_schema(params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """OpenAPI for query parameters a route reads from ``request.query_params``."""
    return {"parameters": [{"name": n, "in": "query", "required": False, "schema": s}
                           for n, s in params.items()]}


def break_glass(request: Request) -> str | None:
    value = request.headers.get("x-break-glass-reason")
    return value if value is not None else None
