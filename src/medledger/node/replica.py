"""Sealed-blob replication between member nodes, and erasure of what the ledger erased.

The ledger commits to each record version's sealed blob by hash; the blob itself
lives in member nodes' blob stores (ADR 4). This module owns moving blobs:

- ``on_commit`` (a ledger commit listener) notes the blobs a committed block
  references that this node lacks, deletes the blobs of versions the block erased,
  and drops the payloads of share links this node issued that were revoked;
- ``run`` is the fetch loop: it asks the author organisation's node first, then any
  member (``POST /replica/blobs``, authenticated with this organisation's key), and
  accepts a blob only if it hashes to the ledger's hash and its keys are wrapped to
  exactly the readers the tx names;
- ``ensure`` fetches, on demand, the blobs a read needs (bounded wait), so a record
  written at another node a moment ago can be read here;
- ``purge_erased`` removes, at start-up, blobs a restored backup still holds for
  versions the ledger has erased since; ``collect_garbage`` removes blobs sealed here
  for writes the ledger never committed (refused, or cut short by a crash).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httpx

from medledger.core import state as st
from medledger.core.machine import BlockApplied
from medledger.crypto.canonical import b64d, loads
from medledger.errors import IntegrityError, MedledgerError, Unavailable
from medledger.node.auth import ASSERTION_TYPE, make_assertion
from medledger.node.records import blob_readers
from medledger.storage.blobs import blob_hash

if TYPE_CHECKING:
    from medledger.node.service import Node

log = logging.getLogger(__name__)

FETCH_BATCH = 256
GARBAGE_AGE_S = 3600.0  # a write not committed within an hour of sealing never will be
ENSURE_TIMEOUT_S = 5.0
MAX_SERVE_HASHES = 512
MAX_SERVE_BYTES = 48 * 1024 * 1024


def ref_of(meta: dict[str, Any]) -> str:
    return f"{meta['type']}/{meta['id']}/{meta['v']}"


class Replicator:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.blobs = node.blobs
        self._wake: asyncio.Event | None = None
        self._tokens: dict[str, tuple[str, float]] = {}
        self._http: httpx.AsyncClient | None = None

    # ------------------------------------------------------------ on commit
    def on_commit(self, applied: BlockApplied, txs: tuple[bytes, ...]) -> None:
        height = int(applied.header["height"])
        want: list[tuple[str, str, str, int]] = []
        erased: list[dict[str, Any]] = []
        revoked: list[str] = []
        for key, raw in applied.writes.items():
            if raw is None:
                continue
            if key.startswith("ver/"):
                meta = loads(raw)
                if st.erased(meta):
                    erased.append(meta)
                else:
                    want.append((meta["blob"], ref_of(meta), meta["org"], height))
            elif key.startswith("wrap/"):
                _, rtype, rid, v, reader, by = key.split("/")
                want.append((loads(raw)["key"], f"{rtype}/{rid}/{int(v)}/key:{reader}", by,
                             height))
            elif key.startswith("share/"):
                grant = loads(raw)
                if grant["revoked"] and grant.get("node") == self.node.org.id:
                    revoked.append(grant["id"])
        if erased:
            self.erase_blobs(erased)
        if revoked:
            self.blobs.drop_shares(revoked)
        held = self.blobs.have(h for h, _, _, _ in want)
        self.blobs.settle(held)
        lacking = [w for w in want if w[0] not in held]
        if lacking:
            self.blobs.want(lacking)
            if self._wake is not None:
                self._wake.set()

    def erase_blobs(self, metas: Iterable[dict[str, Any]]) -> int:
        """Delete the sealed blobs and re-wrapped keys of erased versions."""
        hashes: list[str] = []
        for meta in metas:
            hashes.append(meta["blob"])
            prefix = f"wrap/{meta['type']}/{meta['id']}/{meta['v']:010d}/"
            hashes.extend(loads(v)["key"] for _, v in self.node.store.scan(prefix))
        n = self.blobs.delete(hashes)
        for listener in self.node.on_erase:
            listener(list(metas))
        return n

    def purge_erased(self) -> int:
        """Delete blobs a restored backup still holds for versions erased since."""
        metas: list[dict[str, Any]] = []
        for key, raw in self.node.store.scan("erasure/"):
            patient = key.split("/")[1]
            tx = loads(raw)["tx"]
            for t, i in st.patient_records(self.node.store, patient):
                metas.extend(m for m in st.record_versions(self.node.store, t, i)
                             if st.erased(m) and m["erased"]["tx"] == tx)
        present = self.blobs.have(m["blob"] for m in metas)
        return self.erase_blobs([m for m in metas if m["blob"] in present]) if present else 0

    def collect_garbage(self, now: float) -> int:
        """Delete blobs sealed here for writes that no committed tx references."""
        stale = self.blobs.stale_pending(now - GARBAGE_AGE_S)
        orphans: list[str] = []
        settled: list[str] = []
        for h, ref in stale:
            (settled if self._referenced(h, ref) else orphans).append(h)
        self.blobs.settle(settled)
        if orphans:
            log.info("deleting %d sealed blobs of writes that were never committed",
                     len(orphans))
        return self.blobs.delete(orphans)

    def sweep_share_payloads(self, now: float) -> int:
        """Drop the payloads of this node's expired links, and of links whose tx never
        committed (an hour after they were kept)."""
        dropped, forgotten = [], []
        for share_id, created in self.blobs.share_ids():
            grant = st.share(self.node.store, share_id)
            if grant is None:
                if created < now - GARBAGE_AGE_S:
                    forgotten.append(share_id)
            elif grant["exp"] is not None and grant["exp"] <= now:
                dropped.append(share_id)
        for share_id in forgotten:
            self.blobs.forget_share(share_id)
        if dropped:
            self.blobs.drop_shares(dropped)
        return len(dropped) + len(forgotten)

    def _referenced(self, h: str, ref: str) -> bool:
        """Does the ledger reference blob ``h`` as ``ref`` ("Type/id/v[/key:reader]")?"""
        parts = ref.split("/")
        if len(parts) < 3 or not parts[2].isdigit():
            return False
        rtype, rid, v = parts[0], parts[1], int(parts[2])
        if len(parts) == 4 and parts[3].startswith("key:"):
            prefix = f"wrap/{rtype}/{rid}/{v:010d}/{parts[3][4:]}/"
            return any(loads(raw)["key"] == h for _, raw in self.node.store.scan(prefix))
        meta = st.record_version(self.node.store, rtype, rid, v)
        return meta is not None and meta["blob"] == h

    # ------------------------------------------------------------ fetching
    async def run(self) -> None:
        self._wake = asyncio.Event()
        self._wake.set()
        next_gc = 0.0
        while True:
            if time.time() >= next_gc:
                next_gc = time.time() + 600
                try:
                    self.collect_garbage(time.time())
                    self.sweep_share_payloads(time.time())
                except MedledgerError as exc:
                    log.warning("blob garbage collection deferred: %s", exc)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                due = self.blobs.wanted(time.time(), FETCH_BATCH)
                if due:
                    await self.fetch(due)
            except Exception:  # a bad peer must never stop replication
                log.exception("blob replication round failed")

    async def fetch(self, items: list[tuple[str, str, str]]) -> set[str]:
        """Fetch (hash, ref, source org) from the source first, then other members."""
        got: set[str] = set()
        peers = self.peers()
        by_source: dict[str, list[tuple[str, str]]] = {}
        for h, ref, src in items:
            by_source.setdefault(src, []).append((h, ref))
        for src, wanted in by_source.items():
            order = [src, *sorted(p for p in peers if p != src)]
            for org in order:
                rest = [(h, ref) for h, ref in wanted if h not in got]
                if not rest or org not in peers:
                    continue
                got |= await self._fetch_from(org, peers[org], rest)
        failed = [h for h, _, _ in items if h not in got]
        if failed:
            self.blobs.retry_later(failed, time.time())
        return got

    async def _fetch_from(self, org: str, url: str, wanted: list[tuple[str, str]]
                          ) -> set[str]:
        try:
            token = await self._token(url)
            resp = await self._client().post(f"{url}/replica/blobs",
                                             json={"hashes": [h for h, _ in wanted]},
                                             headers={"Authorization": f"Bearer {token}"})
        except (httpx.HTTPError, MedledgerError) as exc:
            log.info("replication: %s at %s unreachable: %s", org, url, exc)
            return set()
        if resp.status_code != 200:
            log.info("replication: %s answered %s", org, resp.status_code)
            self._tokens.pop(url, None)
            return set()
        blobs = resp.json().get("blobs", {})
        accepted = []
        for h, ref in wanted:
            data = b64d(blobs[h], field="blob") if isinstance(blobs.get(h), str) else None
            if data is not None and self._acceptable(h, ref, data):
                accepted.append((h, data))
            elif data is not None:
                log.warning("replication: %s sent a blob for %s that does not match the "
                            "ledger; ignored", org, ref)
        if accepted:
            self.blobs.put(accepted)
        return {h for h, _ in accepted}

    def _acceptable(self, h: str, ref: str, data: bytes) -> bool:
        if blob_hash(data) != h:
            return False
        rtype, rid, v, *key = ref.split("/")
        if key:  # a re-wrapped data key: its hash is all the ledger says of it
            return True
        meta = st.record_version(self.node.store, rtype, rid, int(v))
        if meta is None or meta["blob"] != h or st.erased(meta):
            return False
        try:
            return bool(blob_readers(data) == meta["readers"])
        except IntegrityError:
            return False

    async def ensure(self, metas: Iterable[dict[str, Any]]) -> None:
        """Make the blobs of these (not erased) versions local, fetching what is missing;
        raise ``Unavailable`` naming what could not be had."""
        need = {m["blob"]: m for m in metas if not st.erased(m)}
        need.update({h: m for m in list(need.values()) for h in self._rewrap_hashes(m)})
        held = self.blobs.have(need)
        lacking = [h for h in need if h not in held]
        if not lacking:
            return
        items = [(h, ref_of(need[h]) if need[h]["blob"] == h else
                  f"{ref_of(need[h])}/key:{self.node.org.id}", need[h]["org"])
                 for h in lacking]
        try:
            got = await asyncio.wait_for(self.fetch(items), ENSURE_TIMEOUT_S)
        except TimeoutError:
            got = set()
        still = [need[h] for h in lacking if h not in got]
        if still:
            refs = ", ".join(sorted({f"{m['type']}/{m['id']}" for m in still})[:5])
            raise Unavailable(f"the content of {refs} has not been replicated to this node yet "
                              f"(written at {still[0]['org']}'s node); try again shortly")

    def _rewrap_hashes(self, meta: dict[str, Any]) -> list[str]:
        if self.node.org.id in meta["readers"]:
            return []
        prefix = f"wrap/{meta['type']}/{meta['id']}/{meta['v']:010d}/{self.node.org.id}/"
        return [loads(v)["key"] for _, v in self.node.store.scan(prefix)]

    # ------------------------------------------------------------ serving
    def serve(self, hashes: list[str]) -> dict[str, bytes]:
        """Blobs for a member's fetcher: those held (erased ones are gone already)."""
        out: dict[str, bytes] = {}
        size = 0
        for h in hashes[:MAX_SERVE_HASHES]:
            data = self.blobs.get(h)
            if data is None:
                continue
            size += len(data)
            if out and size > MAX_SERVE_BYTES:
                break
            out[h] = data
        return out

    # ------------------------------------------------------------ peers
    def peers(self) -> dict[str, str]:
        """Member organisations' API URLs (ledger ``api_url``; ``extra.peers`` overrides)."""
        urls = {o["id"]: o["api_url"] for o in st.active_orgs(self.node.store)
                if o.get("api_url")}
        urls.update(self.node.config.extra.get("peers") or {})
        urls.pop(self.node.org.id, None)
        return {k: str(v).rstrip("/") for k, v in urls.items()}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=10.0)
        return self._http

    async def _token(self, url: str) -> str:
        cached = self._tokens.get(url)
        if cached and cached[1] > time.time() + 30:
            return cached[0]
        data = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": make_assertion(self.node.org, f"{url}/auth/token")}
        resp = await self._client().post(f"{url}/auth/token", data=data)
        if resp.status_code != 200:
            raise Unavailable(f"peer {url} refused this node's credentials "
                              f"({resp.status_code})")
        doc = resp.json()
        self._tokens[url] = (doc["access_token"], time.time() + float(doc["expires_in"]))
        return str(doc["access_token"])

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
