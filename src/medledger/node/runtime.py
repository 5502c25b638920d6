"""Start and stop a node process: open the store, pick the consensus driver, run loops.

``open_node`` builds a ``Node`` from a home; ``NodeRuntime`` runs its background
tasks (solo producer or the ABCI server + CometBFT submitter, audit anchoring)
inside the API server's event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable, Iterable
from concurrent.futures import BrokenExecutor, CancelledError, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

from medledger.consensus.solo import SoloProducer
from medledger.core import state as st
from medledger.core.machine import DigestMap
from medledger.crypto import keys
from medledger.crypto.canonical import b64e, loads
from medledger.errors import InvalidInput, Unauthenticated
from medledger.node.home import Home
from medledger.node.ledger_app import LedgerApp
from medledger.node.service import Node
from medledger.storage.sqlite import SqliteStore

log = logging.getLogger(__name__)
T = TypeVar("T")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``), so a kill -9 of a node leaves no orphaned workers."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers exit when their pipe closes
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


# The cyclic collector's first generation runs every 50,000 net container allocations
# instead of 700: a Bundle's resources are millions of dicts and lists, made in bursts
# (parsing, unpickling a worker's result) and all alive until the import ends, and each
# collection walks the young ones again. Unpickling the 15,446 resources of one Synthea
# patient took 1.09 s at the default, 0.18 s at this (bench/README.md, Synthea import).
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Collector thresholds for bulk work (:data:`GC_THRESHOLDS`); what was allocated so
    far (modules, models, caches) lives as long as the process: it is frozen out of the
    collector, whose full passes over it stalled every thread for 80-190 ms (gc
    callbacks, bench.flood); they now cost 10-30 ms."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.collect()
    gc.freeze()


def worker_init() -> None:
    """Initializer of the node's validation workers: tied to the node, models loaded."""
    die_with_parent()
    from medledger.fhir.validate import preload_models
    from medledger.search.extract import indexed_params
    preload_models()
    indexed_params("Observation")  # the search parameter registry: sealing extracts values
    tune_gc()


def password_from_env(var: str = "MEDLEDGER_PASSWORD") -> str:
    password = os.environ.get(var)
    if not password:
        raise Unauthenticated(f"set {var} to the organisation keystore password")
    return password


def open_node(home_path: str, password: str) -> Node:
    home = Home(home_path)
    config = home.load_config()
    org = home.unlock_org(password)
    if org.id != config.org_id:
        raise InvalidInput(f"keystore is for {org.id}, config says {config.org_id}")
    store = SqliteStore(home.db_path)
    org = settle_org_rotation(home, store, org, password)
    app = LedgerApp(store, config.chain)
    node = Node(home, config, store, app, org)
    n = int(loads(home.org_keystore.read_bytes())["kdf"]["n"])
    node.seal_org = lambda identity: keys.lock(identity, password, n)
    return node


def settle_org_rotation(home: Home, store: SqliteStore, org: keys.Identity,
                        password: str) -> keys.Identity:
    """A key rotation interrupted between its commit and the keystore swap: adopt the
    pending keystore if the ledger has its keys, else drop it."""
    pending = home.org_keystore.with_name("org.next.json")
    if not pending.exists():
        return org
    new = keys.load_keystore(pending, password)
    entry = st.org(store, org.id)
    if entry is not None and entry["sign_pub"] == b64e(new.sign_public):
        pending.replace(home.org_keystore)
        log.warning("adopted the rotated keys of %s (rotation committed before a restart)",
                    org.id)
        return new
    pending.unlink()
    return org


class NodeRuntime:
    """Background machinery of a running node, started inside the server's loop."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.tasks: list[asyncio.Task[Any]] = []
        self.producer: SoloProducer | None = None
        self.abci: Any = None
        self.comet: Any = None
        self.pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        node = self.node
        if node.config.mode == "solo":
            if node.store.meta("chain") is None:
                genesis = node.home.load_genesis()
                node.app.init_chain(genesis["chain_id"], _app_state(genesis), 0)
                node.chain = node.app.chain
            self.producer = SoloProducer(node.app)
            self.producer.last_time_ns = node.app.last_time_ns
            self.producer.start()
            node.submitter = self.producer
        elif node.config.mode == "cometbft":
            from medledger.node.network import start_network_mode
            self.abci, self.comet = await start_network_mode(node)
        else:
            raise InvalidInput(f"unknown consensus mode {node.config.mode!r}")
        workers = int(node.config.extra.get("validation_workers", 1))
        if workers > 0:
            self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                            initializer=worker_init)
            node.validator_pool, node.validator_workers = self.pool, workers
            self.pool.submit(os.getpid)  # start the worker now, not on the first write
            node.app.digest_map = _digest_map(self.pool, lambda: node.pool_jobs == 0)
        purged = node.replica.purge_erased()  # a restored backup must not serve erased data
        if purged:
            log.warning("deleted %d sealed blobs the ledger has erased since this copy was "
                        "made", purged)
        node.store.checkpoint_in_background()  # no WAL fsync while a request waits
        loop = asyncio.get_running_loop()
        if node.config.mode == "cometbft" and node.replica.peers():
            from medledger.node.erasure import catch_up
            node.catching_up = "starting"  # before the API answers its first request
            self.tasks.append(loop.create_task(catch_up(node)))
        self.tasks.append(loop.create_task(node.anchor_loop()))
        self.tasks.append(loop.create_task(node.replica.run()))
        self.tasks.append(loop.create_task(self._abort_open_imports()))
        _ = node.searcher  # open the search index: it catches up and follows commits
        tune_gc()

    async def _abort_open_imports(self) -> None:
        """Staged imports this organisation left open (a crash mid-import) are aborted."""
        try:
            n = await self.node.abort_open_imports()
        except Exception as exc:  # retried at the next start
            log.warning("could not abort open staged imports: %s", exc)
            return
        if n:
            log.warning("aborted %d staged imports left open by an earlier run", n)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        try:  # anchor what is left while the driver still runs
            await asyncio.wait_for(self.node.anchor_pending(), timeout=5)
        except Exception as exc:
            log.warning("could not anchor remaining audit events at shutdown: %s", exc)
        for t in self.tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.producer:
            await self.producer.stop()
        await self.node.replica.aclose()
        self.node.blobs.close()
        if self.pool is not None:
            self.node.validator_pool, self.node.validator_workers = None, 1
            self.node.app.digest_map = None
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self.abci is not None:
            await self.abci.stop()
        if self.comet is not None:
            await self.comet.aclose()
        self.node.close_search()
        self.node.store.close()


def _digest_map(pool: ProcessPoolExecutor, idle: Callable[[], bool]) -> DigestMap:
    """``pool.map`` for a large block's digests (``machine.block_digests``): the workers
    hash the slices while the loop waits for them, as a one-client import's commit
    block does. The loop computes them itself when the pool has other work queued (the
    slices would wait behind it) or is broken or shut down: a block never waits for a
    busy pool and is never refused for it."""
    def digest_map(fn: Callable[..., T], *iterables: Iterable[Any]) -> list[T]:
        columns = [list(it) for it in iterables]  # read once: the fallback reads them again
        if idle():
            try:
                return list(pool.map(fn, *columns))
            except (BrokenExecutor, CancelledError, RuntimeError) as exc:
                log.warning("block digests computed on the loop: the worker pool failed "
                            "(%s)", exc)
        return [fn(*args) for args in zip(*columns, strict=True)]
    return digest_map


def readiness(node: Node) -> tuple[bool, dict[str, Any]]:
    """Can this node take writes now? ``(ready, document)`` for ``/readyz``.

    Not ready when the node refuses to serve (its ledger failed a check), or in network
    mode when its CometBFT does not answer or the network is not committing (the
    document then names the validators that are not voting)."""
    doc: dict[str, Any] = {"org": node.org.id, "mode": node.config.mode,
                           "height": node.app.height, "reason": ""}
    indexed = node.search_index_height
    if indexed is not None:  # informational: searches wait for it, writes do not
        doc["search_index_height"] = indexed
    if node.integrity_failure:
        doc["reason"] = f"refusing to serve: {node.integrity_failure}"
        return False, doc
    monitor = getattr(node.submitter, "monitor", None)
    if monitor is None:
        ready = node.submitter is not None
        doc["reason"] = "" if ready else "no consensus driver is running"
        return ready, doc
    q = monitor.quorum
    if q is not None:
        doc["consensus"] = q.to_dict()
    doc["reason"] = monitor.problem or (q.reason if q is not None else
                                        "waiting for the first answer from CometBFT")
    return not doc["reason"], doc


def _app_state(genesis: dict[str, Any]) -> bytes:
    from medledger.crypto.canonical import canonical
    return canonical({k: genesis[k] for k in ("orgs", "retention") if k in genesis})
