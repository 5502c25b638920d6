"""The node's HTTP API (FastAPI): FHIR R4 REST, auth, ledger proofs, share links, portal.

Routes are thin: parse, call the ``Node``, map errors. Every ``MedledgerError``
becomes a FHIR OperationOutcome with the error's HTTP status; unexpected
exceptions become a 500 OperationOutcome without a stack trace (logged once), a
client that went away mid-request one log line.

Pure-ASGI middlewares, outermost first: security headers on every response (CSP,
frame-ancestors, nosniff, no referrer, no caching of API answers); audit events
durable before any response; the error boundary; refusal of every data route
while the node's start check has failed (one 503 message); the body-size limit.
``/docs`` is Swagger UI served from the pinned ``swagger-ui-bundle-v2`` package,
no CDN, no inline script.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import swagger_ui_bundle
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medledger.api import ledger_routes, portal_routes, rights_routes
from medledger.api.common import WorkLimiter, fhir_json, outcome_response
from medledger.api.fhir_routes import router as fhir_router
from medledger.errors import InvalidInput, MedledgerError, TooLarge, Unavailable
from medledger.node.auth import throttled
from medledger.node.home import Config
from medledger.node.runtime import NodeRuntime
from medledger.node.service import Node, WrongPasscode

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def create_app(node: Node, *, run_background: bool = True) -> FastAPI:
    runtime = NodeRuntime(node)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if run_background:
            await runtime.start()
        try:
            yield
        finally:
            app.state.work_limiter.close()
            node.login_guard.close()
            if run_background:
                await runtime.stop()
            node.auditor.close()

    app = FastAPI(title="medledger node", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.node = node
    app.state.runtime = runtime
    app.state.work_limiter = WorkLimiter(
        int(node.config.extra.get("search_workers", 1)),
        max_share=float(node.config.extra.get("search_max_share", 0.33)))
    # worker threads (searches) hand the GIL back to the event loop after 1 ms, not 5 ms
    sys.setswitchinterval(float(node.config.extra.get("gil_switch_interval_s", 0.001)))

    node.auditor.deferred = True
    # pure ASGI (no BaseHTTPMiddleware task per request); the last added is the outermost
    app.add_middleware(_StreamedBodyLimit, limit=lambda scope: _body_limit(node.config, scope))
    app.add_middleware(_LoginLockoutGate, node=node)
    app.add_middleware(_RefuseWhenTampered, node=node)
    app.add_middleware(_ErrorBoundary)
    app.add_middleware(_AuditDurableBeforeResponse, auditor=node.auditor)
    app.add_middleware(_SecurityHeaders)
    app.add_middleware(_IdempotencyKey, node=node)

    @app.exception_handler(WrongPasscode)
    async def wrong_passcode(request: Request, exc: WrongPasscode) -> Response:
        return Response(orjson.dumps({"error": str(exc), "remainingAttempts": exc.remaining}),
                        status_code=401, media_type="application/json")

    @app.exception_handler(MedledgerError)
    async def medledger_error(request: Request, exc: MedledgerError) -> Response:
        return outcome_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return outcome_response(MedledgerError(f"invalid request: {first.get('msg')} at {where}"),
                                status=400, code="invalid")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return outcome_response(MedledgerError(str(exc.detail)), status=exc.status_code,
                                code="not-found" if exc.status_code == 404 else "exception")

    app.include_router(fhir_router, prefix="/fhir")
    app.include_router(ledger_routes.router)
    app.include_router(portal_routes.router)
    app.include_router(rights_routes.router)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        if (STATIC / "index.html").exists():
            return FileResponse(STATIC / "index.html")
        return RedirectResponse("/docs")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return fhir_json({"status": "ok" if not node.integrity_failure else "refusing",
                          "org": node.org.id, "height": node.store.height,
                          "reason": node.integrity_failure or ""},
                         status=200 if not node.integrity_failure else 503)

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        """Ready to take writes: serving, and (network mode) the network is committing."""
        from medledger.node.runtime import readiness
        ready, doc = readiness(node)
        return fhir_json({"status": "ready" if ready else "not ready", **doc},
                         status=200 if ready else 503)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return HTMLResponse(DOCS_HTML)

    from fastapi.staticfiles import StaticFiles
    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
              name="swagger-ui")
    if STATIC.exists():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medledger node API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/static/js/docs.js"></script></body></html>
"""
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
# Swagger UI sets style attributes from its scripts; its own page may allow that
DOCS_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"), (b"cross-origin-opener-policy", b"same-origin")]
# what a node with a failed start check still answers: nothing read from its ledger
REFUSING_ALLOWS = ("/healthz", "/ledger/status", "/", "/docs", "/openapi.json")
REFUSING_ALLOWS_UNDER = ("/static/", "/docs/assets/")


class _SecurityHeaders:
    """Security headers on every response, error and static ones included."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        csp = (DOCS_CSP if path == "/docs" else CSP).encode()
        static = path.startswith(("/static/", "/docs/assets/"))

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() not in _OURS]
                headers += [(b"content-security-policy", csp), *SECURITY_HEADERS]
                if not static:  # answers carry PHI and tokens: never cached
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


_OURS = {b"content-security-policy", b"x-content-type-options", b"referrer-policy",
         b"x-frame-options", b"cross-origin-opener-policy", b"cache-control"}


class _ErrorBoundary:
    """The last word on any exception a route lets escape.

    A client that disconnected mid-request is one log line (no traceback, no answer:
    nobody is listening); a nesting too deep for the parsers is a 400; anything else
    is logged once with its traceback and answered with a 500 OperationOutcome, so
    no exception reaches the server (which would log it a second time).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            log.info("client %s went away during %s %s", _peer(scope), scope.get("method"),
                     scope.get("path"))
        except Exception as exc:
            if started:  # too late to answer: the client sees a cut response
                log.error("error after the response started on %s %s: %s",
                          scope.get("method"), scope.get("path"), exc)
                return
            if isinstance(exc, RecursionError):
                response = outcome_response(InvalidInput(
                    "the request is nested too deeply to process"))
            else:
                log.exception("unexpected error on %s %s", scope.get("method"),
                              scope.get("path"))
                response = outcome_response(MedledgerError(
                    f"internal error ({type(exc).__name__}); the node log has details"),
                    status=500)
            try:
                await response(scope, receive, send)
            except OSError:  # the client is gone as well
                pass


def _peer(scope: Any) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


class _RefuseWhenTampered:
    """A node whose start check failed answers every data route with one 503.

    One place for every route (FHIR, auth and tokens, ledger, portal API, share links),
    in solo and network mode alike; only health, status and the static portal answer.
    """

    def __init__(self, app: Any, node: Node) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        failure = self.node.integrity_failure
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if failure and scope["type"] == "http" and path not in REFUSING_ALLOWS and \
                not path.startswith(REFUSING_ALLOWS_UNDER):
            response = outcome_response(Unavailable(
                f"this node refuses to serve: {failure}. Its local ledger must be restored "
                "(or re-synced from the network) and pass `medledger verify`."))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _body_limit(config: Config, scope: Any) -> int:
    """Bundles posted to the FHIR base have their own (larger) limit."""
    if scope.get("method") == "POST" and scope.get("path") in ("/fhir", "/fhir/"):
        return config.max_bundle_bytes
    return config.max_body_bytes


LOGIN = "/auth/login"


class _LoginLockoutGate:
    """A login from a locked-out address is answered 429 here, before routing and body
    parsing, and only after ``tarpit_s`` (at most ``MAX_HELD`` answers held at once): a
    client guessing back to back sends one guess a second instead of hundreds, and each
    costs the event loop (which serves everyone else) a lookup and a small answer. The
    wait costs the node a timer; the lock-out was going to refuse the guess anyway."""

    MAX_HELD = 256

    def __init__(self, app: Any, node: Node) -> None:
        self.app = app
        self.guard = node.login_guard
        self.tarpit_s = float(node.config.extra.get("login_tarpit_s", 1.0))
        self.held = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == LOGIN:
            client = scope.get("client")
            address = client[0] if client else ""
            wait = self.guard.client_blocked_s(address)
            if wait > 0 and self.held < self.MAX_HELD:
                self.held += 1
                try:
                    await asyncio.sleep(min(wait, self.tarpit_s))
                finally:
                    self.held -= 1
                wait = self.guard.client_blocked_s(address)
            if wait > 0:
                await outcome_response(throttled(wait))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _StreamedBodyLimit:
    """Enforce ``max_body_bytes`` on bodies without a Content-Length (chunked uploads).

    The body is counted as the route reads it; crossing the limit raises ``TooLarge``
    inside the route, which the error handler turns into a 413 OperationOutcome.
    """

    def __init__(self, app: Any, limit: Callable[[Any], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, seen = self.limit(scope), 0
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                response = outcome_response(TooLarge(
                    f"request body of {int(value)} bytes exceeds the {limit}-byte limit"))
                await response(scope, receive, send)
                return

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(f"request body exceeds the {limit}-byte limit")
            return message

        await self.app(scope, counted, send)


class _IdempotencyKey:
    """``Idempotency-Key`` / ``X-Request-Id`` on a write: the key (scoped to the caller)
    is made current for the request, so ``Node.submit`` retries safely
    (``node.idempotency``)."""

    def __init__(self, app: Any, node: Node) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from medledger.node import idempotency
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        raw = next((headers[h] for h in idempotency.HEADERS if h in headers), None)
        if raw is None:
            await self.app(scope, receive, send)
            return
        try:
            key = idempotency.check_key(raw.decode("utf-8", "replace"))
        except MedledgerError as err:
            await outcome_response(err)(scope, receive, send)
            return
        token = idempotency.set_current(idempotency.RequestKey(key, self._caller(headers)))
        try:
            await self.app(scope, receive, send)
        finally:
            idempotency.reset_current(token)

    def _caller(self, headers: dict[bytes, bytes]) -> str:
        """Who the key belongs to: the authenticated actor ("" if none)."""
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if token is None:
            cookies = headers.get(b"cookie", b"").decode("latin-1")
            token = next((c.split("=", 1)[1] for c in cookies.split("; ")
                          if c.startswith("medledger_token=")), None)
        try:
            return self.node.auth.session(token).actor_id if token else ""
        except MedledgerError:
            return ""


class _AuditDurableBeforeResponse:
    """Commit buffered audit events before the first byte of any response leaves.

    Outermost middleware: whatever the route (or an error handler) answers, its
    audit events are durable first; if they cannot be made durable the client
    gets a 503 instead of the answer.
    """

    def __init__(self, app: Any, auditor: Any) -> None:
        self.app = app
        self.auditor = auditor

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        failed = False

        async def send_after_audit(message: Any) -> None:
            nonlocal failed
            if failed:
                return
            if message["type"] == "http.response.start":
                try:
                    await self.auditor.flush()
                except Exception as exc:
                    failed = True
                    log.error("audit events could not be made durable: %s", exc)
                    response = outcome_response(MedledgerError(
                        "the access could not be audited durably; refusing to answer"),
                        status=503, code="transient")
                    await response(scope, receive, send)
                    return
            await send(message)

        await self.app(scope, receive, send_after_audit)


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (reads MEDLEDGER_HOME, MEDLEDGER_PASSWORD)."""
    import os

    from medledger.node.runtime import open_node, password_from_env
    from medledger.node.startcheck import start_check
    node = open_node(os.environ["MEDLEDGER_HOME"], password_from_env())
    start_check(node)
    return create_app(node)

