"""Ledger state: an ordered key-value space, read through a ``StateReader``.

Keys (UTF-8 strings) and their canonical-JSON values::

    org/{org}                       organisation: keys, status, approvals, api_url
    actor/{id}                      practitioner or patient: kind, org, role, keys, status
    keyhist/{id}/{n:04d}            an identity's keys before its n-th rotation
    n/{signer}/{nonce}              used nonces (replay protection) -> tx hash (hex)
    rec/{type}/{id}                 head version of a record (patient null: directory)
    ver/{type}/{id}/{version:010d}  every version: metadata, blob hash, readers, erasure
    pat/{patient}/{type}/{id}       patient compartment index
    care/{patient}/{org}            care relationship (the org registered the patient)
    consent/{patient}/{id}          consent rules
    share/{id}                      share grants (SMART Health Links; payload off-chain)
    pshare/{patient}/{id}           a patient's share grants (index)
    wrap/{type}/{id}/{v:010d}/{reader}/{by}  hash of a data key re-wrapped later (blob)
    erasure/{patient}/{tx}          an erasure: who, when, basis, scope (no content)
    imp/{import}                    a staged import: org, parts expected and received
    stage/{import}/{part:06d}       a staged import part's operations (invisible)
    akey/{node}/{epoch}             a node's audit free-text key, wrapped to members
    policy/retention                retention rules: category -> minimum seconds kept
    recovery/{patient}              key recovery setup: guardians, threshold, share hashes
    recoveryreq/{id}                a recovery request: ephemeral key, guardian approvals
    precovery/{patient}/{id}        a patient's recovery requests (index)

``Overlay`` stacks a block's (or a batch's) pending writes on a reader, so the
machine sees its own writes and can drop them whole when a batch fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from medledger.crypto.canonical import canonical, loads


class StateReader(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def scan(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        """Every (key, value) whose key starts with ``prefix``, in key order."""
        ...


class Writes(dict[str, bytes | None]):
    """An overlay's pending writes, indexed by every ``/``-terminated prefix of their keys.

    State is scanned by such prefixes (``consent/{patient}/``, ``ver/{type}/{id}/``...),
    once or more per operation; a block or a staged import holds up to hundreds of
    thousands of writes, so a scan must not walk them all. Keys are never removed
    (a deletion is a ``None`` value), so the index only grows. It is built lazily, at
    the first scan after new keys arrived: most per-tx overlays are never scanned.
    """

    def __init__(self) -> None:
        super().__init__()
        self._by_prefix: dict[str, set[str]] = {}
        self._unindexed: list[str] = []

    def __setitem__(self, key: str, value: bytes | None) -> None:
        if key not in self:
            self._unindexed.append(key)
        super().__setitem__(key, value)

    def update(self, *others: Any, **more: Any) -> None:
        for other in (*others, more):
            if isinstance(other, dict):
                self._unindexed.extend(key for key in other if key not in self)
                super().update(other)
                continue
            for key, value in other:
                self[key] = value

    def setdefault(self, key: str, default: bytes | None = None) -> bytes | None:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> Writes:  # type: ignore[override,misc]
        self.update(other)
        return self

    def _index(self) -> None:
        by_prefix = self._by_prefix
        for key in self._unindexed:
            end = key.find("/")
            while end != -1:
                by_prefix.setdefault(key[:end + 1], set()).add(key)
                end = key.find("/", end + 1)
        self._unindexed.clear()

    def with_prefix(self, prefix: str) -> Iterable[str]:
        """Keys starting with ``prefix`` (any order)."""
        if not prefix:
            return list(self)
        if prefix.endswith("/"):
            if self._unindexed:
                self._index()
            return self._by_prefix.get(prefix, ())
        return [key for key in self if key.startswith(prefix)]


class Overlay:
    """Pending writes over a base reader. ``None`` marks a deletion."""

    def __init__(self, base: StateReader) -> None:
        self.base = base
        self.writes = Writes()

    def get(self, key: str) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        return self.base.get(key)

    def scan(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        merged = dict(self.base.scan(prefix))
        for key in self.writes.with_prefix(prefix):
            value = self.writes[key]
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        for key in sorted(merged):
            yield key, merged[key]

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """``{key: get(key)}``; what the writes do not hold, read from the base at once."""
        out: dict[str, bytes | None] = {}
        rest = []
        for key in keys:
            if key in self.writes:
                out[key] = self.writes[key]
            else:
                rest.append(key)
        if rest:
            out.update(self._base_many(rest))
        return out

    def _base_many(self, keys: list[str]) -> dict[str, bytes | None]:
        return get_many(self.base, keys)

    def put(self, key: str, value: bytes | None) -> None:
        self.writes[key] = value

    def merge_into(self, parent: Overlay) -> None:
        parent.writes.update(self.writes)


class ReadTrackingOverlay(Overlay):
    """An ``Overlay`` that remembers what it read from its base (``base_reads``).

    A block's overlay: the base does not change while the block is applied, so a value
    read there before the block wrote the key is that key's old value, which the state
    digest update needs (``machine.block_digests``) and then need not read again."""

    def __init__(self, base: StateReader) -> None:
        super().__init__(base)
        self.base_reads: dict[str, bytes | None] = {}

    def get(self, key: str) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        value = self.base.get(key)
        self.base_reads[key] = value
        return value

    def _base_many(self, keys: list[str]) -> dict[str, bytes | None]:
        values = get_many(self.base, keys)
        self.base_reads.update(values)
        return values


class MemoryState:
    """A plain in-memory state (the twin of the SQLite store's state table)."""

    def __init__(self, data: dict[str, bytes] | None = None) -> None:
        self.data: dict[str, bytes] = dict(data or {})

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def scan(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        for key in sorted(k for k in self.data if k.startswith(prefix)):
            yield key, self.data[key]

    def apply(self, writes: dict[str, bytes | None]) -> None:
        for key, value in writes.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


def get_many(state: StateReader, keys: Iterable[str]) -> dict[str, bytes | None]:
    """``{key: state.get(key)}``, in one round trip if the reader offers ``get_many``
    (the node's SQLite-backed state cache does)."""
    many = getattr(state, "get_many", None)
    if many is not None:
        return dict(many(keys))
    return {key: state.get(key) for key in keys}


def get_json(state: StateReader, key: str) -> dict[str, Any] | None:
    raw = state.get(key)
    return None if raw is None else loads(raw)


def put_json(state: Overlay, key: str, value: dict[str, Any]) -> None:
    state.put(key, canonical(value))


def version_key(rtype: str, rid: str, version: int) -> str:
    return f"ver/{rtype}/{rid}/{version:010d}"


def org(state: StateReader, org_id: str) -> dict[str, Any] | None:
    return get_json(state, f"org/{org_id}")


def actor(state: StateReader, actor_id: str) -> dict[str, Any] | None:
    return get_json(state, f"actor/{actor_id}")


def principal(state: StateReader, pid: str) -> dict[str, Any] | None:
    """An organisation or an actor, as ``{"kind": ..., ...}``."""
    o = org(state, pid)
    if o is not None:
        return {**o, "kind": "org"}
    return actor(state, pid)


def active_orgs(state: StateReader) -> list[dict[str, Any]]:
    return [o for _, raw in state.scan("org/") if (o := loads(raw))["status"] == "active"]


def peer_admitted(state: StateReader, node_id: str) -> bool:
    """May a CometBFT node with p2p id ``node_id`` be a peer (CometBFT's ``filter_peers``)?

    Once the ledger names its members' nodes (``node_ids`` in organisation entries, set
    at genesis, in ``org.propose`` or by ``org.nodes``), only an active member's node; a
    ledger that names none (a chain from before node ids, or whose organisations were
    not given them) admits any, as CometBFT does unfiltered."""
    named = {n for o in active_orgs(state) for n in o.get("node_ids", ())}
    return not named or node_id in named


def record_head(state: StateReader, rtype: str, rid: str) -> dict[str, Any] | None:
    return get_json(state, f"rec/{rtype}/{rid}")


def record_heads(state: StateReader, refs: Iterable[tuple[str, str]]
                 ) -> dict[tuple[str, str], dict[str, Any]]:
    """The heads of the records ``refs`` ((type, id) pairs) that exist, in one batched
    read (``get_many``) rather than one per record."""
    raw = get_many(state, [f"rec/{rtype}/{rid}" for rtype, rid in refs])
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in raw.items():
        if value is not None:
            _, rtype, rid = key.split("/", 2)
            out[(rtype, rid)] = loads(value)
    return out


def record_version(state: StateReader, rtype: str, rid: str, version: int) -> dict[str, Any] | None:
    return get_json(state, version_key(rtype, rid, version))


def record_versions(state: StateReader, rtype: str, rid: str) -> list[dict[str, Any]]:
    return [loads(v) for _, v in state.scan(f"ver/{rtype}/{rid}/")]


def patient_records(state: StateReader, patient: str, rtype: str | None = None
                    ) -> list[tuple[str, str]]:
    """(type, id) of every record in a patient's compartment."""
    prefix = f"pat/{patient}/" + (f"{rtype}/" if rtype else "")
    out = []
    for key, _ in state.scan(prefix):
        _, _, t, i = key.split("/", 3)
        out.append((t, i))
    return out


def rewrapped_keys(state: StateReader, rtype: str, rid: str, version: int, reader: str
                   ) -> list[str]:
    """Data keys of a version wrapped to ``reader`` after sealing (one per wrapping org)."""
    prefix = f"wrap/{rtype}/{rid}/{version:010d}/{reader}/"
    return [loads(v)["key"] for _, v in state.scan(prefix)]


def is_active(entry: dict[str, Any]) -> bool:
    """Actors are active unless deactivated; organisations once approved."""
    return bool(entry.get("status", "active") == "active")


def retention_rules(state: StateReader) -> dict[str, int]:
    return get_json(state, "policy/retention") or {}


def erased(meta: dict[str, Any]) -> bool:
    return meta.get("erased") is not None


def consents(state: StateReader, patient: str) -> list[dict[str, Any]]:
    return [loads(v) for _, v in state.scan(f"consent/{patient}/")]


def has_care(state: StateReader, patient: str, org_id: str) -> bool:
    return state.get(f"care/{patient}/{org_id}") is not None


def share(state: StateReader, share_id: str) -> dict[str, Any] | None:
    return get_json(state, f"share/{share_id}")


def shares_of(state: StateReader, patient: str) -> list[dict[str, Any]]:
    ids = [key.rsplit("/", 1)[1] for key, _ in state.scan(f"pshare/{patient}/")]
    return [g for i in ids if (g := share(state, i)) is not None]


def recovery_setup(state: StateReader, patient: str) -> dict[str, Any] | None:
    return get_json(state, f"recovery/{patient}")


def recovery_request(state: StateReader, rid: str) -> dict[str, Any] | None:
    return get_json(state, f"recoveryreq/{rid}")


def recovery_requests(state: StateReader, patient: str) -> list[dict[str, Any]]:
    ids = [key.rsplit("/", 1)[1] for key, _ in state.scan(f"precovery/{patient}/")]
    return [r for i in ids if (r := recovery_request(state, i)) is not None]
