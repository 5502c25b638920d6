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

import os
import time
import uuid
from collections.abc import Callable
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
from medledger.errors import InvalidInput, Unauthenticated

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
    def __init__(self, state: st.StateReader, token_url: str, ttl_s: int,
                 clock: Callable[[], float] = time.time,
                 used_assertions: Callable[[str, float, float], bool] | None = None) -> None:
        """``used_assertions(jti, exp, now)`` records a jti and says if it was new; by
        default an in-memory set (the node passes its durable store's)."""
        self.state = state
        self.token_url = token_url
        self.ttl_s = ttl_s
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.used_assertions = used_assertions or _MemoryJti()

    def exchange(self, assertion: str, scope: str | None) -> tuple[str, Session]:
        now = self.clock()
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise InvalidInput(f"client_assertion is not a JWT: {exc}") from exc
        if header.get("alg") != "EdDSA":
            raise Unauthenticated("client_assertion must be signed with EdDSA (Ed25519)")
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
        problem = standing_problem(st.principal(self.state, session.actor_id), session.actor_id,
                                   session.keys_v)
        if problem is not None:  # deactivated, left, or re-keyed since: refused at once
            del self.sessions[token]
            raise Unauthenticated(problem)
        return session

    def revoke(self, token: str) -> bool:
        """Revoke a bearer token (RFC 7009); False if it was not a live token here."""
        return self.sessions.pop(token, None) is not None

    def logout(self, token: str) -> None:
        self.sessions.pop(token, None)



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
