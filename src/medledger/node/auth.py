"""Authentication: SMART Backend Services style key assertions and short-lived bearer tokens.

A client (practitioner, patient, organisation) proves possession of its
ledger-registered Ed25519 key by signing a JWT assertion (``alg: EdDSA``,
``iss == sub ==`` its id, ``aud`` = this node's token URL, ``exp`` within five
minutes, unique ``jti``) and exchanges it for an opaque bearer token with SMART
v2 scopes. Users enrolled at this node may instead log in with their keystore
password (the web portal); their unlocked key then signs their own txs
(consents, share links) for the session.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medledger.core import state as st
from medledger.core.policy.scopes import (  # noqa: F401  (re-exported: callers import here)
    DEFAULT_SCOPES,
    parse_scopes,
    scope_allows,
)
from medledger.crypto.canonical import b64d, b64e
from medledger.crypto.keys import Identity
from medledger.errors import (
    InvalidInput,
    TooManyRequests,
    Unauthenticated,
    busy,
)
from medledger.node.pacing import PacedSlots

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_S = 300


@dataclass
class Session:
    actor_id: str
    kind: str  # "org" | "practitioner" | "patient"
    role: str | None
    org: str
    scopes: frozenset[str]
    expires_s: float
    identity: Identity | None = field(default=None, repr=False)
    keys_v: int = 0  # the key version the token was issued under (``key.rotate``)


def make_assertion(identity: Identity, token_url: str, now: float | None = None) -> str:
    """The signed JWT a client sends to ``/auth/token`` (used by the CLI and tests)."""
    now = time.time() if now is None else now
    key = Ed25519PrivateKey.from_private_bytes(identity.sign_seed)
    claims = {"iss": identity.id, "sub": identity.id, "aud": token_url, "iat": int(now),
              "exp": int(now) + 240, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": identity.id})


class Authenticator:
    def __init__(self, state: st.StateReader, token_url: str | Callable[[], str], ttl_s: int,
                 clock: Callable[[], float] = time.time,
                 used_assertions: Callable[[str, float, float], bool] | None = None,
                 sessions_state: st.StateReader | None = None) -> None:
        """``used_assertions(jti, exp, now)`` records a jti and says if it was new; by
        default an in-memory set (the node passes its durable store's). ``token_url`` may
        be a function: the audience then follows the URL the node actually serves (a
        ``--port``/``--tls-cert`` given at start). ``sessions_state``: where a live
        session's principal is read on every request (the node's state cache); a token
        request names an unverified client, so it reads ``state`` (its misses are not
        cached for anyone who asks)."""
        self.state = state
        self.sessions_state = sessions_state if sessions_state is not None else state
        self._token_url = token_url
        self.ttl_s = ttl_s
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.used_assertions = used_assertions or _MemoryJti()

    @property
    def token_url(self) -> str:
        return self._token_url if isinstance(self._token_url, str) else self._token_url()

    def exchange(self, assertion: str, scope: str | None) -> tuple[str, Session]:
        now = self.clock()
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise InvalidInput(f"client_assertion is not a JWT: {exc}") from exc
        if header.get("alg") != "EdDSA":
            raise Unauthenticated("client_assertion must be signed with EdDSA (Ed25519)")
        _check_claim_types(unverified)
        actor_id = str(unverified.get("iss", ""))
        if unverified.get("sub") != actor_id:
            raise Unauthenticated("client_assertion iss and sub must both be the client id")
        principal = st.principal(self.state, actor_id)
        if principal is None:
            raise Unauthenticated(f"unknown client {actor_id!r}: not registered on the ledger")
        if principal.get("kind") == "org" and principal.get("status") != "active":
            raise Unauthenticated(f"organisation {actor_id} is not an active member yet")
        if not st.is_active(principal):
            raise Unauthenticated(f"{actor_id} was deactivated; it gets no tokens")
        pub = Ed25519PublicKey.from_public_bytes(b64d(principal["sign_pub"]))
        try:
            claims = jwt.decode(assertion, pub, algorithms=["EdDSA"], audience=self.token_url,
                                options={"require": ["exp", "jti", "aud"]}, leeway=5)
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("client_assertion has expired; sign a fresh one") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated(f"client_assertion aud must be {self.token_url}") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"client_assertion rejected: {exc}") from exc
        if claims["exp"] - now > MAX_ASSERTION_LIFETIME_S + 5:
            raise Unauthenticated("client_assertion exp is more than five minutes ahead")
        if not self.used_assertions(str(claims["jti"]), float(claims["exp"]), now):
            raise Unauthenticated("client_assertion jti was already used (replay)")
        return self._open_session(principal, parse_scopes(scope, _kind(principal)), None)

    def login(self, identity: Identity, scope: str | None = None) -> tuple[str, Session]:
        """A session for a user whose keystore this node unlocked with their password."""
        principal = st.principal(self.state, identity.id)
        if principal is None or b64d(principal["sign_pub"]) != identity.sign_public:
            raise Unauthenticated(f"{identity.id} is not registered with this key")
        problem = standing_problem(principal, identity.id, _keys_v(principal))
        if problem is not None:
            raise Unauthenticated(problem)
        return self._open_session(principal, parse_scopes(scope, _kind(principal)), identity)

    def _open_session(self, principal: dict[str, object], scopes: frozenset[str],
                      identity: Identity | None) -> tuple[str, Session]:
        kind = _kind(principal)
        org = str(principal["id"]) if kind == "org" else str(principal["org"])
        role = principal.get("role")
        session = Session(str(principal["id"]), kind, str(role) if role else None, org, scopes,
                          self.clock() + self.ttl_s, identity, _keys_v(principal))
        token = b64e(os.urandom(32))
        self.sessions[token] = session
        return token, session

    def session(self, token: str | None) -> Session:
        if not token:
            raise Unauthenticated("missing bearer token: authenticate at /auth/token first")
        session = self.sessions.get(token)
        if session is None:
            raise Unauthenticated("unknown or revoked bearer token")
        if session.expires_s <= self.clock():
            del self.sessions[token]
            raise Unauthenticated("bearer token has expired; request a new one at /auth/token")
        problem = standing_problem(st.principal(self.sessions_state, session.actor_id),
                                   session.actor_id, session.keys_v)
        if problem is not None:  # deactivated, left, or re-keyed since: refused at once
            del self.sessions[token]
            raise Unauthenticated(problem)
        return session

    def revoke(self, token: str) -> bool:
        """Revoke a bearer token (RFC 7009); False if it was not a live token here."""
        return self.sessions.pop(token, None) is not None

    def logout(self, token: str) -> None:
        self.sessions.pop(token, None)



def _check_claim_types(claims: Any) -> None:
    """PyJWT accepts ``"exp": "123"`` (it calls ``int()``); the registered time claims must
    be JSON numbers and the identifiers strings, or the assertion is malformed."""
    if not isinstance(claims, dict):
        raise InvalidInput("client_assertion claims must be a JSON object")
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0 <= value < 2**53):
            raise InvalidInput(f"client_assertion {name} must be a number of epoch seconds")
    for name in ("iss", "sub", "jti"):
        value = claims.get(name)
        if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 256):
            raise InvalidInput(f"client_assertion {name} must be a non-empty string")
    if not isinstance(claims.get("aud", ""), str | list):
        raise InvalidInput("client_assertion aud must be a string")


class _MemoryJti:
    """In-memory jti register (tests, in-process use); the node uses its store's."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def __call__(self, jti: str, exp: float, now: float) -> bool:
        if len(self.seen) > 10_000:
            self.seen = {j: e for j, e in self.seen.items() if e > now}
        if jti in self.seen:
            return False
        self.seen[jti] = exp
        return True


def standing_problem(principal: dict[str, Any] | None, who: str, keys_v: int) -> str | None:
    """Why ``who`` may no longer act (checked on every request): gone, deactivated, no
    longer an active member, or its keys rotated since its token was issued (under key
    version ``keys_v``). None while it is in good standing."""
    if principal is None:
        return f"{who} is no longer registered"
    if principal.get("kind") == "org" and principal.get("status") != "active":
        return f"organisation {who} is no longer an active member"
    if not st.is_active(principal):
        return f"{who} was deactivated; its tokens no longer work"
    if _keys_v(principal) != keys_v:
        return f"the keys of {who} were rotated; authenticate again with the new key"
    return None


def _keys_v(principal: dict[str, Any]) -> int:
    return int(principal.get("keys_v") or 0)


def _kind(principal: dict[str, object]) -> str:
    return "org" if principal.get("kind") == "org" else str(principal["kind"])


LOGIN_FAILED = "wrong password, or no such user at this node"


@dataclass
class _Failures:
    count: int = 0
    last_s: float = 0.0
    blocked_until_s: float = 0.0


class LoginGuard:
    """Password logins that a flood cannot turn into a stall or an oracle.

    * **Throttling with back-off**, per login id and per client address: the first
      ``free_per_id`` (``free_per_client``) failures are free; each further one doubles
      a lock-out (``first_backoff_s``, 2x, 4x ... at most ``max_backoff_s``) during which
      every attempt is refused with ``TooManyRequests`` (HTTP 429 + Retry-After) *before*
      any password hashing. An attempt is charged as a failure when admitted and refunded on
      success, so concurrent guesses cannot all pass before one is counted. Failures are
      forgotten ``window_s`` after the last one.
    * **Bounded hashing off the event loop**: scrypt runs on ``workers`` threads
      (OpenSSL releases the GIL); more than ``max_waiting`` logins waiting is a 503. When
      logins queue, hashing keeps to ``max_cpu_share`` of a core (``node.pacing``): a
      flood of logins (from many addresses, or the free tries of one) leaves the rest to
      the node's other clients; a login that finds the worker free is not delayed.

    The clock is passed in (tests use a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.time, *, free_per_id: int = 5,
                 free_per_client: int = 20, max_backoff_s: int = 900, window_s: int = 900,
                 workers: int = 1, max_waiting: int = 32, first_backoff_s: float = 1,
                 max_cpu_share: float = 0.5) -> None:
        self.clock = clock
        self.free = {"id": free_per_id, "client": free_per_client}
        self.max_backoff_s = max_backoff_s
        self.first_backoff_s = first_backoff_s
        self.window_s = window_s
        self._failures: dict[tuple[str, str], _Failures] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._workers = workers
        self._slots = PacedSlots(workers, max_cpu_share)
        self._waiting = 0
        self.max_waiting = max_waiting

    # ------------------------------------------------------------ throttling
    def admit(self, actor_id: str, client: str) -> None:
        """Refuse a throttled attempt; otherwise charge it as a failure (see class doc)."""
        now = self.clock()
        self._prune(now)
        keys = (("id", actor_id), ("client", client))
        wait = max(self._entry(k, now).blocked_until_s - now for k in keys)
        if wait > 0:
            raise throttled(wait)
        for key in keys:
            entry = self._entry(key, now)
            entry.count += 1
            entry.last_s = now
            over = entry.count - self.free[key[0]]
            if over > 0:
                entry.blocked_until_s = now + min(self.first_backoff_s * 2 ** (over - 1),
                                                  self.max_backoff_s)

    def client_blocked_s(self, client: str) -> float:
        """Seconds the address stays locked out (0: it may try). A lookup and nothing
        else: the HTTP layer refuses a locked-out address before it parses the request."""
        entry = self._failures.get(("client", client))
        return max(0.0, entry.blocked_until_s - self.clock()) if entry is not None else 0.0

    def succeeded(self, actor_id: str, client: str) -> None:
        """Refund the charged attempt; the id starts afresh (the address does not: one good
        account must not launder guesses at others)."""
        self._failures.pop(("id", actor_id), None)
        entry = self._failures.get(("client", client))
        if entry is not None:
            entry.count = max(0, entry.count - 1)
            if entry.count <= self.free["client"]:
                entry.blocked_until_s = 0.0

    def _entry(self, key: tuple[str, str], now: float) -> _Failures:
        entry = self._failures.get(key)
        if entry is None or now - entry.last_s > self.window_s and entry.blocked_until_s <= now:
            entry = self._failures[key] = _Failures()
        return entry

    def _prune(self, now: float) -> None:
        if len(self._failures) > 50_000:
            self._failures = {k: e for k, e in self._failures.items()
                              if now - e.last_s <= self.window_s or e.blocked_until_s > now}

    # ------------------------------------------------------------ hashing
    async def hash_off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a password-hashing function on the bounded login pool."""
        if self._waiting >= self.max_waiting:
            raise busy("too many logins in progress; retry in a moment")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="login",
                                            initializer=_lower_thread_priority)
        self._waiting += 1
        try:
            async with self._slots.hold():
                return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._waiting -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def throttled(wait_s: float) -> TooManyRequests:
    """The one refusal of a locked-out login (the same words for an id and an address)."""
    return TooManyRequests("too many failed logins for this account or from this address; "
                           f"try again in {math.ceil(wait_s)} s", math.ceil(wait_s))


def _lower_thread_priority() -> None:
    """Password hashing yields the CPU to the node's event loop (Linux: per-thread nice).
    scrypt runs without the GIL, so a descheduled hashing thread blocks nobody."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
