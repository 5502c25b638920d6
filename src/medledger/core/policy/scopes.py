"""SMART App Launch v2 scopes: which a principal may obtain, and what a token's scopes allow.

A scope is ``<context>/<ResourceType|*>.<interactions>`` with interactions from
``cruds`` (create, read, update, delete, search): ``user/Observation.rs``,
``patient/*.rs``, ``system/*.cruds``. Scopes are checked per resource type — for a
single read and for every resource a search, ``$everything`` or ``$summary`` would
return.
"""

from __future__ import annotations

from medledger.errors import Forbidden

DEFAULT_SCOPES = {
    "patient": "patient/*.rs patient/Consent.cruds",
    "practitioner": "user/*.cruds",
    "org": "system/*.cruds",
}
INTERACTIONS = "cruds"


def _split(scope: str) -> tuple[str, str, str] | None:
    try:
        ctx, rest = scope.split("/", 1)
        rtype, perms = rest.split(".", 1)
    except ValueError:
        return None
    return ctx, rtype, perms


def parse_scopes(requested: str | None, kind: str) -> frozenset[str]:
    """The scopes a token for a ``kind`` principal gets: what it asked for, within what
    its kind may hold (everything allowed when it asks for nothing)."""
    allowed = set(DEFAULT_SCOPES[kind].split())
    if not requested:
        return frozenset(allowed)
    granted = {s for s in requested.split() if scope_within(s, allowed)}
    if not granted:
        raise Forbidden(f"none of the requested scopes ({requested}) is allowed for a {kind}; "
                        f"allowed: {DEFAULT_SCOPES[kind]}")
    return frozenset(granted)


def scope_within(scope: str, allowed: set[str]) -> bool:
    parts = _split(scope)
    if parts is None:
        return False
    ctx, rtype, perms = parts
    for a in allowed:
        actx, atype, aperms = _split(a) or ("", "", "")
        if actx == ctx and atype in ("*", rtype) and set(perms) <= set(aperms):
            return True
    return False


def scope_allows(scopes: frozenset[str], rtype: str, interaction: str) -> bool:
    """Does any scope allow ``interaction`` (one of ``cruds``) on resources of ``rtype``?"""
    for s in scopes:
        parts = _split(s)
        if parts is not None and parts[1] in ("*", rtype) and interaction in parts[2]:
            return True
    return False


def scope_denial(scopes: frozenset[str], rtype: str, interaction: str) -> str | None:
    """Why the scopes refuse ``interaction`` on ``rtype`` (None if they allow it)."""
    if scope_allows(scopes, rtype, interaction):
        return None
    return (f"token scopes ({' '.join(sorted(scopes))}) do not allow '{interaction}' on "
            f"{rtype}")
