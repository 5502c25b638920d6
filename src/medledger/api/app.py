"""The node's HTTP API (FastAPI): FHIR R4 REST, auth, ledger proofs, share links, portal.

Routes are thin: parse, call the ``Node``, map errors. Every ``MedledgerError``
becomes a FHIR OperationOutcome with the error's HTTP status; unexpected
exceptions become a 500 OperationOutcome without a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medledger.api import ledger_routes, portal_routes
from medledger.api.common import fhir_json, outcome_response
from medledger.api.fhir_routes import router as fhir_router
from medledger.errors import MedledgerError, TooLarge
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
            if run_background:
                await runtime.stop()

    app = FastAPI(title="medledger node", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.node = node
    app.state.runtime = runtime

    node.auditor.deferred = True
    app.add_middleware(_AuditDurableBeforeResponse, auditor=node.auditor)
    # pure ASGI (no BaseHTTPMiddleware task per request): Content-Length checked up front,
    # chunked bodies counted as they arrive
    app.add_middleware(_StreamedBodyLimit, limit=lambda scope: _body_limit(node.config, scope))

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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return outcome_response(MedledgerError(
            f"internal error ({type(exc).__name__}); the node log has details"), status=500)

    app.include_router(fhir_router, prefix="/fhir")
    app.include_router(ledger_routes.router)
    app.include_router(portal_routes.router)

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

    if STATIC.exists():
        from fastapi.staticfiles import StaticFiles
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _body_limit(config: Config, scope: Any) -> int:
    """Bundles posted to the FHIR base have their own (larger) limit."""
    if scope.get("method") == "POST" and scope.get("path") in ("/fhir", "/fhir/"):
        return config.max_bundle_bytes
    return config.max_body_bytes


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
    return create_app(open_node(os.environ["MEDLEDGER_HOME"], password_from_env()))

