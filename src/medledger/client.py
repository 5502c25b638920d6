"""A small HTTP client for a medledger node, used by the CLI, tests and benchmarks.

Authenticates with the caller's own key (SMART Backend Services: a signed JWT
assertion exchanged for a bearer token), signs txs client-side where the
ledger requires the patient's own signature, and decrypts sealed records with
the patient's key, so a key file opens its owner's records from any node.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import httpx
import orjson

from medledger.core.tx import Tx, make_tx
from medledger.crypto.canonical import b64d
from medledger.crypto.keys import Identity
from medledger.errors import MedledgerError, Unavailable
from medledger.node.auth import ASSERTION_TYPE, make_assertion
from medledger.node.records import open_any


class NodeError(MedledgerError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"node answered {status}: {message}")
        self.status = status
        self.http_status = status


def _diagnosis(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        return "; ".join(i.get("diagnostics", "") for i in doc.get("issue", []))
    if isinstance(doc, dict) and "error" in doc:
        return str(doc["error"])
    return str(doc)[:300]


MAX_RETRY_WAIT_S = 30  # a Retry-After longer than this is not waited for in one step


def _retryable_write(method: str, path: str) -> bool:
    """Writes the node makes idempotent by key (Bundles included; not the token endpoint)."""
    return method in ("POST", "PUT", "DELETE") and path.rstrip("/") != "/auth/token"


class Client:
    def __init__(self, base_url: str, identity: Identity | None = None, *,
                 timeout: float = 60.0, retries: int = 3, retry_backoff_s: float = 1.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.identity = identity
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._token: str | None = None
        self._token_exp = 0.0
        self._chain: str | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ auth
    def token(self, scope: str | None = None) -> str:
        if self._token and self._token_exp - 30 > time.time():
            return self._token
        if self.identity is None:
            raise NodeError(401, "no key given: this command needs --key")
        data = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": make_assertion(self.identity, self.base_url + "/auth/token")}
        if scope:
            data["scope"] = scope
        doc = self._check(self._send("POST", "/auth/token", data=data, auth=False)).json()
        self._token, self._token_exp = doc["access_token"], time.time() + doc["expires_in"]
        return self._token

    def _send(self, method: str, path: str, *, auth: bool = True, headers: dict[str, str]
              | None = None, **kw: Any) -> httpx.Response:
        hdrs = dict(headers or {})
        if auth:
            hdrs["Authorization"] = f"Bearer {self.token()}"
        try:
            return self.http.request(method, path, headers=hdrs, **kw)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach node at {self.base_url}: {exc}") from exc

    @staticmethod
    def _check(resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            raise NodeError(resp.status_code, _diagnosis(resp))
        return resp

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                headers: dict[str, str] | None = None,
                idempotency_key: str | None = None) -> httpx.Response:
        """One request; a write is sent with an ``Idempotency-Key`` (``idempotency_key``, or
        a fresh one) and retried with that same key when the node answers 503 or cannot
        be reached, so a retry can never create a second record. A read is retried when
        the node answers 503 with ``Retry-After`` (busy, or its search index catching up);
        a 503 without it (e.g. a node refusing to serve) is final. Waits follow the
        node's ``Retry-After`` when it names one, else a doubling back-off."""
        content = None if body is None else (body if isinstance(body, bytes)
                                             else orjson.dumps(body))
        hdrs = {"Content-Type": "application/fhir+json", **(headers or {})}
        write = _retryable_write(method, path)
        if write:
            hdrs["Idempotency-Key"] = idempotency_key or uuid.uuid4().hex
        elif method not in ("GET", "HEAD"):  # e.g. the token endpoint: sent once
            return self._check(self._send(method, path, auth=auth, headers=hdrs,
                                          content=content))
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            resp: httpx.Response | None = None
            try:
                resp = self._send(method, path, auth=auth, headers=hdrs, content=content)
            except Unavailable:
                if last or not write:
                    raise
            else:
                transient = resp.status_code == 503 and (
                    write or "retry-after" in resp.headers)
                if not transient or last:
                    return self._check(resp)
            time.sleep(self._wait_s(resp, attempt))
        raise AssertionError("unreachable")

    def _wait_s(self, resp: httpx.Response | None, attempt: int) -> float:
        """The node's ``Retry-After`` (seconds, at most ``MAX_RETRY_WAIT_S``) or the
        doubling back-off."""
        named = resp.headers.get("retry-after", "") if resp is not None else ""
        if named.isdigit():
            return float(min(int(named), MAX_RETRY_WAIT_S))
        return float(self.retry_backoff_s * 2 ** attempt)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).json()

    def post(self, path: str, body: Any, **kw: Any) -> Any:
        return self.request("POST", path, body, **kw).json()

    def put(self, path: str, body: Any, **kw: Any) -> Any:
        return self.request("PUT", path, body, **kw).json()

    # ------------------------------------------------------------ ledger
    @property
    def chain(self) -> str:
        if self._chain is None:
            self._chain = self.get("/ledger/status", auth=False)["chain"]
        return self._chain

    def sign_tx(self, kind: str, body: dict[str, Any]) -> Tx:
        """A tx signed with our own key (not submitted)."""
        assert self.identity is not None
        return make_tx(self.identity.id, self.identity.signer(), self.chain, kind, body,
                       os.urandom(16).hex())

    def submit_tx(self, kind: str, body: dict[str, Any]) -> Any:
        """Sign ``body`` with our own key and submit it (with our own bearer token: the
        node takes raw txs from their signer, or a member organisation relaying them).
        Retries resend the same signed bytes: a tx already committed answers with its
        first outcome."""
        tx = self.sign_tx(kind, body)
        return self.submit_raw(tx.raw)

    def submit_raw(self, raw: bytes) -> Any:
        return self.request("POST", "/ledger/tx", raw,
                            headers={"Content-Type": "application/octet-stream"}).json()

    def export_heads(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Fetch our sealed records; decrypt each record's newest version with our own key
        (the current one, one held before a rotation, or a key re-wrapped to us since).

        Returns (resource, ledger metadata) pairs."""
        assert self.identity is not None
        doc = self.get(f"/ledger/patients/{self.identity.id}/sealed")
        heads: dict[tuple[str, str], dict[str, Any]] = {}
        for item in doc["records"]:
            key = (item["meta"]["type"], item["meta"]["id"])
            if key not in heads or heads[key]["meta"]["v"] < item["meta"]["v"]:
                heads[key] = item
        return [(open_any(doc["chain"], item["meta"], b64d(item["blob"], field="blob"),
                          self.identity.id, self.identity.enc_privates,
                          [b64d(k, field="rewrapped") for k in item.get("rewrapped") or []]),
                 item["meta"]) for item in heads.values()]

    def export_records(self) -> list[dict[str, Any]]:
        """Our complete record (newest versions), decrypted client-side."""
        return [resource for resource, _ in self.export_heads()]
