"""Network mode: a node as one validator of a CometBFT network, and the local testnet tooling.

Two halves:

1. **Inside a node process** (``mode = "cometbft"``): ``start_network_mode`` serves the
   ledger application to CometBFT over ABCI (``consensus.abci.AbciServer`` on
   ``config.abci_port``) and installs a ``CometSubmitter``, which broadcasts txs to
   this node's CometBFT (``config.cometbft_rpc``) and waits for them to be committed:
   an in-process future per tx hash, resolved by the application's ``on_commit``
   listener, so a write is acknowledged only once it is in a decided block here.
   CometBFT is a separate process that connects to the ABCI port; genesis (chain id,
   ``app_state = {"orgs": [...]}``, validators) and block time come from it.

   Before serving, the local store is re-checked (every block's header links, tx
   hashes and tx roots, and that the stored app hash is the head header's). A store
   that fails is never offered to CometBFT: the node keeps its API up only to say so
   (``/healthz`` 503, reads and writes refused with 503), its CometBFT cannot connect
   and stops, and the other validators carry on.

2. **Local networks** (``medledger net``): ``create_network`` makes n organisations
   with one node home and one CometBFT home each, all sharing one genesis that lists
   every organisation with its validator key; ``start_member``/``stop_member`` run the
   two processes of a member detached; ``network_status`` collects what every member
   reports. The layout is kept in ``<dir>/network.json`` so any shell can manage it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from medledger.consensus import cometbft, quorum
from medledger.consensus.app import AppInfo, BlockOutcome, QueryResult, TxResult
from medledger.consensus.cometbft import CometRpc, CometRpcError
from medledger.consensus.solo import Committed
from medledger.core.machine import BlockApplied
from medledger.crypto import keys
from medledger.crypto.canonical import b64d, b64e, loads, sha256
from medledger.errors import (
    Conflict,
    IntegrityError,
    InvalidInput,
    MedledgerError,
    NotFound,
    Replay,
    Unavailable,
)
from medledger.node.home import Home, init_home, is_loopback, org_genesis_entry

log = logging.getLogger(__name__)

__all__ = [
    "COMMIT_TIMEOUT_S",
    "CometSubmitter",
    "ConsensusMonitor",
    "Member",
    "MemberStatus",
    "Network",
    "check_store_for_network",
    "create_network",
    "load_network",
    "network_status",
    "group_members",
    "pid_alive",
    "reap_group",
    "start_member",
    "start_members",
    "start_network_mode",
    "stop_member",
    "stop_network",
    "validator_pub",
]

COMMIT_TIMEOUT_S = 30.0
_WATCH_INTERVAL_S = 1.0
_MONITOR_INTERVAL_S = 1.0


class ConsensusMonitor:
    """Polls this node's CometBFT once a second and judges progress (``consensus.quorum``).

    ``quorum`` is the latest judgement (``None`` until the first poll answers; a CometBFT
    that does not answer is reported as such in ``problem``).
    """

    def __init__(self, rpc: CometRpc, store: Any, *,
                 stall_after_s: float = quorum.STALL_AFTER_S,
                 on_change: Callable[[quorum.Quorum], None] = lambda _: None) -> None:
        self.rpc = rpc
        self.store = store
        self.stall_after_s = stall_after_s
        self.on_change = on_change
        self.quorum: quorum.Quorum | None = None
        self.problem = ""
        self._height = -1
        self._moved_at = time.monotonic()

    def validators(self, answer: dict[str, Any]) -> list[quorum.Validator]:
        names = {}
        for _, raw in self.store.scan("org/"):
            org = loads(raw)
            if org.get("validator_pub"):
                names[quorum.validator_address(b64d(org["validator_pub"]))] = org["id"]
        return [quorum.Validator(str(v["address"]), int(v["voting_power"]),
                                 names.get(str(v["address"]), ""))
                for v in answer.get("validators", [])]

    async def poll(self) -> quorum.Quorum | None:
        try:
            status = await self.rpc.status()
            if status.height != self._height:
                self._height, self._moved_at = status.height, time.monotonic()
            cs = await self.rpc.call("consensus_state")
            unconfirmed = await self.rpc.call("num_unconfirmed_txs")
            vals = await self.rpc.call("validators", {"per_page": "100"})
        except CometRpcError as exc:
            self.problem = f"CometBFT does not answer: {exc}"
            self.quorum = None
            return None
        self.problem = ""
        q = quorum.assess(status.height, time.monotonic() - self._moved_at,
                          int(unconfirmed.get("n_txs", 0)), self.validators(vals), cs,
                          self.stall_after_s)
        changed = self.quorum is None or (self.quorum.committing, self.quorum.quorum) != (
            q.committing, q.quorum)
        self.quorum = q
        if changed:
            if q.committing:
                log.info("consensus: committing at height %d", q.height)
            else:
                log.warning("consensus: %s", q.reason)
            self.on_change(q)
        return q

    @property
    def refusal(self) -> str:
        """Why writes should fail now (empty when they may go ahead). A network that is
        only slow (every validator still voting) is waited for, not refused."""
        if self.quorum is not None and not self.quorum.quorum:
            return self.quorum.reason
        return self.problem

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # never let the monitor die silently
                log.exception("consensus monitor failed")
            await asyncio.sleep(_MONITOR_INTERVAL_S)


# =========================================================================== in the node


class CometSubmitter:
    """Submit a raw tx through this node's CometBFT and wait until it is committed.

    Same contract as ``SoloProducer.submit``: a ``Committed`` with the CheckTx code if
    the mempool refused the tx, else the FinalizeBlock result once the block holding it
    is committed by the local application. A tx not committed within ``timeout_s``
    raises ``Unavailable`` (it stays in the mempool and may still commit later).
    """

    def __init__(self, app: Any, rpc_url: str, *, timeout_s: float = COMMIT_TIMEOUT_S) -> None:
        self.app = app
        self.rpc_url = rpc_url
        self.rpc = CometRpc(rpc_url)
        self.timeout_s = timeout_s
        self.refusal: str | None = None  # set when the node must not take writes
        self.monitor = ConsensusMonitor(self.rpc, app.store, on_change=self._on_consensus)
        self._waiting: dict[bytes, list[asyncio.Future[Committed]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        app.on_commit.append(self._on_commit)

    async def submit(self, raw: bytes) -> Committed:
        if self.refusal:
            raise Unavailable(f"node refuses to serve: {self.refusal}")
        if self.monitor.refusal:  # fail fast: nothing would commit
            raise Unavailable(f"{self.monitor.refusal}. The write was not sent: retry once "
                              "the missing validators are back")
        tx_hash = sha256(raw)
        # The full state transition here, once: CheckTx on the validators only admits
        # (core.mempool), so a policy refusal would otherwise cost a block and the nonce.
        checked: TxResult = self.app.precheck(raw)
        if checked.code != 0:
            return Committed(checked.code, checked.log, b"", 0, tx_hash)
        # Register before broadcasting: the block may commit before the RPC call returns.
        fut: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tx_hash, []).append(fut)
        try:
            early = await self._broadcast(raw, tx_hash)
            if early is not None:
                return early
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"tx {tx_hash.hex()[:16]} not committed within {self.timeout_s:.0f} s: the "
                "network may have lost quorum (the tx stays in the mempool and may still "
                "commit)") from None
        finally:
            self._forget(tx_hash, fut)

    async def _broadcast(self, raw: bytes, tx_hash: bytes) -> Committed | None:
        """CheckTx through CometBFT; a ``Committed`` if refused there, ``None`` if queued."""
        try:
            code, log_, _ = await self.rpc.broadcast_tx_sync(raw)
        except CometRpcError as exc:
            if "already exists in cache" not in str(exc):
                raise Unavailable(f"the consensus engine at {self.rpc_url} did not take the "
                                  f"tx: {exc}") from exc
            # Known to this node's mempool: either committed already or still pending.
            if self.app.store.tx(tx_hash) is not None:
                checked: TxResult = self.app.check_tx(raw, False)
                if checked.code != 0:
                    return Committed(checked.code, checked.log, b"", 0, tx_hash)
                return Committed(Replay.code, f"tx {tx_hash.hex()[:16]} was already committed "
                                 "(replayed tx)", b"", 0, tx_hash)
            return None
        if code != 0:
            return Committed(code, log_, b"", 0, tx_hash)
        return None

    def _forget(self, tx_hash: bytes, fut: asyncio.Future[Committed]) -> None:
        futs = self._waiting.get(tx_hash)
        if futs and fut in futs:
            futs.remove(fut)
            if not futs:
                del self._waiting[tx_hash]

    def _on_commit(self, applied: BlockApplied, txs: tuple[bytes, ...]) -> None:
        if not self._waiting:
            return
        height = int(applied.header["height"])
        for tx_hash, r in zip(applied.tx_hashes, applied.results, strict=True):
            for fut in self._waiting.pop(tx_hash, []):
                if not fut.done():
                    fut.set_result(Committed(r.code, r.log, r.data.encode(), height, tx_hash))

    def _on_consensus(self, q: quorum.Quorum) -> None:
        """Quorum lost: fail every waiting write now, with the reason."""
        if q.quorum:
            return
        for futs in self._waiting.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(Unavailable(
                        f"{q.reason}. The tx was sent and stays in the mempool: it may "
                        "still commit when quorum returns"))

    def refuse(self, reason: str) -> None:
        """Stop taking writes and fail every waiting submitter with ``reason``."""
        self.refusal = reason
        for futs in self._waiting.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(Unavailable(f"node refuses to serve: {reason}"))
        self._waiting.clear()

    def watch(self, node: Any, server: Any) -> None:
        """Background checks: a fatal ABCI error (CometBFT halted here) stops serving; the
        consensus monitor judges whether the network commits."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch(node, server)))
        self._tasks.append(loop.create_task(self.monitor.run()))

    async def _watch(self, node: Any, server: Any) -> None:
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            if server.fatal_error is not None and not node.integrity_failure:
                node.integrity_failure = (f"the ledger application failed under consensus "
                                          f"({server.fatal_error}); this validator halted")
                self.refuse(node.integrity_failure)
                log.critical("REFUSING TO SERVE: %s", node.integrity_failure)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._on_commit in self.app.on_commit:
            self.app.on_commit.remove(self._on_commit)
        await self.rpc.aclose()


class _NodeAbciApp:
    """The node's ``LedgerApp`` as CometBFT sees it; checks InitChain against the config."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.app = node.app

    def info(self) -> AppInfo:
        info: AppInfo = self.app.info()
        return info

    def init_chain(self, chain_id: str, app_state_bytes: bytes, time_ns: int) -> bytes:
        expected = self.node.config.chain
        if expected and chain_id != expected:
            raise IntegrityError(f"CometBFT's genesis is for chain {chain_id!r} but this node "
                                 f"is configured for {expected!r}")
        app_hash: bytes = self.app.init_chain(chain_id, app_state_bytes, time_ns)
        self.node.chain = self.app.chain
        log.info("InitChain %s: genesis app hash %s", chain_id, app_hash.hex())
        return app_hash

    def check_tx(self, tx: bytes, recheck: bool) -> TxResult:
        result: TxResult = self.app.check_tx(tx, recheck)
        return result

    def finalize_block(self, height: int, time_ns: int, txs: list[bytes], proposer: bytes,
                       block_hash: bytes) -> BlockOutcome:
        outcome: BlockOutcome = self.app.finalize_block(height, time_ns, txs, proposer,
                                                        block_hash)
        return outcome

    def commit(self) -> int:
        retain: int = self.app.commit()
        return retain

    def query(self, path: str, data: bytes, height: int) -> QueryResult:
        result: QueryResult = self.app.query(path, data, height)
        return result


def check_network_config(node: Any) -> Path | None:
    """Raise what a network-mode start would fail on, before anything starts (``node
    start`` calls it ahead of the web server, whose start-up would print a traceback):
    a config without CometBFT's RPC or an ABCI address, an ABCI socket path too long for
    a Unix socket, or one a running node still serves. Returns that socket's path."""
    from medledger.consensus.abci import AbciServer

    config = node.config
    if not config.cometbft_rpc or not (config.abci_port or config.abci_socket):
        raise InvalidInput("mode 'cometbft' needs cometbft_rpc and abci_socket or abci_port "
                           "in config.json")
    if not config.abci_socket:
        return None
    path: Path = node.home.path / config.abci_socket
    if len(os.fsencode(path)) > cometbft.MAX_UNIX_SOCKET_PATH:
        raise InvalidInput(f"abci_socket {path} is longer than a Unix socket path may be "
                           f"({cometbft.MAX_UNIX_SOCKET_PATH} bytes): give a shorter one")
    AbciServer.refuse_if_served(str(path))
    return path


def check_store_for_network(store: Any) -> None:
    """Raise ``IntegrityError`` if the store must not be offered to CometBFT: the app hash
    the node would report in ``Info`` must be the one in the head block's header (what
    CometBFT's handshake compares next is that app hash against its own). The whole
    store was checked before, at start (``node/startcheck.py``)."""
    if store.height:
        head = store.block(store.height)
        if head is None or bytes.fromhex(head["app_hash"]) != store.app_hash:
            raise IntegrityError(f"the stored app hash does not match block {store.height}'s "
                                 "header")


async def start_network_mode(node: Any) -> tuple[Any, CometSubmitter]:
    """Serve ABCI for CometBFT in the running loop; install the CometBFT submitter.

    Returns ``(abci_server, submitter)``; ``abci_server`` is ``None`` when the local
    store failed its check (the node then refuses to serve and CometBFT cannot start).
    """
    from medledger.consensus.abci import AbciServer

    config = node.config
    socket_path = check_network_config(node)
    timeout = float(config.extra.get("commit_timeout_s", COMMIT_TIMEOUT_S))
    submitter = CometSubmitter(node.app, config.cometbft_rpc, timeout_s=timeout)
    node.submitter = submitter
    if not node.integrity_failure:
        try:
            check_store_for_network(node.store)
        except MedledgerError as err:
            node.integrity_failure = f"local ledger failed its integrity check: {err}"
    if node.integrity_failure:
        submitter.refuse(node.integrity_failure)
        log.critical("REFUSING TO SERVE, not joining consensus: %s", node.integrity_failure)
        return None, submitter
    if socket_path is not None:
        server = AbciServer(_NodeAbciApp(node), path=socket_path)
    else:
        if not is_loopback(config.abci_host):
            log.warning("ABCI listens on %s, beyond this machine: ABCI has no "
                        "authentication, so whoever reaches %s:%d can feed this node's "
                        "ledger application blocks; keep it on 127.0.0.1 unless a firewall "
                        "admits only this node's CometBFT", config.abci_host,
                        config.abci_host, config.abci_port)
        server = AbciServer(_NodeAbciApp(node), host=config.abci_host, port=config.abci_port)
    await server.start()
    submitter.watch(node, server)
    log.info("network mode: ABCI on %s, CometBFT RPC %s, height %d", server.address,
             config.cometbft_rpc, node.store.height)
    return server, submitter


# =========================================================================== local networks

STATE_FILE = "network.json"
ORG_NAMES = ["Northgate General Hospital", "Riverside Community Clinic",
             "St Agnes Children's Hospital", "Harbour View Medical Centre",
             "Elm Street Family Practice", "Lakeside Mental Health Trust"]


@dataclass
class Member:
    """One organisation of a local network: its node home and CometBFT home, ports, pids."""

    index: int
    org_id: str
    name: str
    home: str
    comet_home: str
    api_port: int
    rpc_port: int
    p2p_port: int
    abci_port: int
    node_pid: int | None = None
    comet_pid: int | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.rpc_port}"

    @property
    def node_log(self) -> Path:
        return Path(self.home) / "node.log"

    @property
    def comet_log(self) -> Path:
        return Path(self.comet_home) / cometbft.LOG_FILE_NAME


@dataclass
class Network:
    dir: str
    chain: str
    members: list[Member] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.dir) / STATE_FILE

    def save(self) -> None:
        doc = {"dir": self.dir, "chain": self.chain, "members": [asdict(m) for m in self.members]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.path)

    def member(self, which: int | str) -> Member:
        for m in self.members:
            if which in (m.index, m.org_id, str(m.index)):
                return m
        raise NotFound(f"no member {which!r} in the network at {self.dir}")


def load_network(directory: Path | str) -> Network:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise NotFound(f"no network at {directory} (run `medledger net up --dir {directory}`)")
    doc = orjson.loads(path.read_bytes())
    return Network(doc["dir"], doc["chain"], [Member(**m) for m in doc["members"]])


def validator_pub(comet_home: Path) -> bytes:
    """The Ed25519 validator public key of a CometBFT home (``priv_validator_key.json``)."""
    doc = orjson.loads((Path(comet_home) / "config" / "priv_validator_key.json").read_bytes())
    return base64.b64decode(doc["pub_key"]["value"])


def create_network(directory: Path | str, n: int = 4, password: str = "", *,
                   chain: str = "medledger-net", base_port: int | None = None,
                   commit_timeout_s: float = COMMIT_TIMEOUT_S,
                   scrypt_n: int = keys.DEFAULT_SCRYPT_N,
                   progress: Callable[[str], None] = lambda _: None,
                   retention: dict[str, int] | None = None) -> Network:
    """Create ``n`` organisations ``org-1..org-n``: node homes, CometBFT homes, one genesis.

    Ports: API ``base_port + i``; CometBFT p2p/rpc/abci from ``base_port + 10`` (three
    per node). ``base_port=None`` picks free ports.
    """
    if not 1 <= n <= len(ORG_NAMES):
        raise InvalidInput(f"a local network has 1-{len(ORG_NAMES)} nodes")
    if not password:
        raise InvalidInput("a keystore password is needed")
    root = Path(directory).resolve()
    if (root / STATE_FILE).exists():
        raise Conflict(f"{root} already holds a network", hint="`medledger net down --purge` "
                       "it, or use another --dir")
    root.mkdir(parents=True, exist_ok=True)
    comet_root = root / "cometbft"
    if base_port is None:
        api_ports = cometbft.free_ports(n)
        comet_base = None
    else:
        api_ports = list(range(base_port, base_port + n))
        comet_base = base_port + 10
    # 1. CometBFT keys first: the genesis organisations carry their validator keys.
    progress("creating CometBFT validator keys")
    binary = cometbft.binary_path()
    vals, node_ids = [], []
    for i in range(n):
        cometbft.init_home(comet_root / f"node{i}", f"node{i}", binary=binary)
        vals.append(validator_pub(comet_root / f"node{i}"))
        node_ids.append(cometbft.node_id(comet_root / f"node{i}", binary=binary))
    # 2. Organisation identities and the shared genesis.
    progress("creating organisation keys")
    orgs = [keys.new_identity(f"org-{i + 1}", "org", {"name": ORG_NAMES[i]}) for i in range(n)]
    entries = [org_genesis_entry(o, ORG_NAMES[i], vals[i], f"http://127.0.0.1:{api_ports[i]}",
                                 node_ids[i])
               for i, o in enumerate(orgs)]
    app_state: dict[str, Any] = {"orgs": entries}
    if retention:  # erasure retention rules per category, fixed at genesis (ADR 4)
        app_state["retention"] = dict(retention)
    genesis = {"chain_id": chain, **app_state}
    layouts = cometbft.make_testnet(comet_root, n, chain, app_state, comet_base,
                                    binary=binary, settings={"filter_peers": True})
    # 3. One node home per organisation, in network mode.
    members = []
    for i, (org, lay) in enumerate(zip(orgs, layouts, strict=True)):
        progress(f"creating node home for {org.id}")
        home = init_home(root / org.id, org.id, ORG_NAMES[i], password, genesis=genesis,
                         identity=org, port=api_ports[i], scrypt_n=scrypt_n)
        config = home.load_config()
        config.mode = "cometbft"
        config.cometbft_rpc = lay.rpc_url
        config.abci_port = lay.abci_port
        config.abci_socket = str(lay.abci_socket or "")
        config.extra["commit_timeout_s"] = commit_timeout_s
        home.save_config(config)
        members.append(Member(i, org.id, ORG_NAMES[i], str(home.path), str(lay.home),
                              api_ports[i], lay.rpc_port, lay.p2p_port, lay.abci_port))
    net = Network(str(root), chain, members)
    net.save()
    return net


# --------------------------------------------------------------------------- processes


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` runs (a zombie does not count)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _spawn(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None,
           die_with_parent: bool) -> subprocess.Popen[bytes]:
    preexec = cometbft._die_with_parent if die_with_parent else None  # noqa: SLF001
    with open(log_path, "ab") as out:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=preexec)  # noqa: PLW1509


def _wait_healthy(m: Member, proc: subprocess.Popen[bytes] | None, timeout: float) -> int:
    """Wait until the node's API answers /healthz; returns its status code (200 or 503)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Unavailable(f"node {m.org_id} exited with code {proc.returncode}; see "
                              f"{m.node_log}")
        try:
            code = httpx.get(m.api_url + "/healthz", timeout=2).status_code
            if code in (200, 503):
                return code
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise Unavailable(f"node {m.org_id} did not answer at {m.api_url} within {timeout:.0f} s; "
                      f"see {m.node_log}")


def start_member(net: Network, which: int | str, password: str, *,
                 die_with_parent: bool = False, timeout: float = 60.0
                 ) -> list[subprocess.Popen[bytes]]:
    """Start one member (see ``start_members``)."""
    return start_members(net, [which], password, die_with_parent=die_with_parent,
                         timeout=timeout)


def start_members(net: Network, which: Sequence[int | str], password: str, *,
                  die_with_parent: bool = False, timeout: float = 60.0
                  ) -> list[subprocess.Popen[bytes]]:
    """Start members' node processes, wait for their APIs (so ABCI listens), then their
    CometBFT processes. Already running processes are left alone.

    Processes run detached in their own sessions (``die_with_parent`` ties them to the
    calling process instead, for tests). A node that refuses to serve (its store failed
    the check) gets no CometBFT. Returns the Popen handles started.
    """
    members = [net.member(w) for w in which]
    started: list[subprocess.Popen[bytes]] = []
    node_procs: dict[int, subprocess.Popen[bytes]] = {}
    env = {**os.environ, "MEDLEDGER_PASSWORD": password}
    for m in members:  # what a crashed run of this member left behind goes first
        if not pid_alive(m.comet_pid):
            reap_group(m.comet_pid)
        if not pid_alive(m.node_pid):
            reap_group(m.node_pid)
    for m in members:
        if not pid_alive(m.node_pid):
            proc = _spawn([sys.executable, "-m", "medledger", "node", "start",
                           "--home", m.home], m.node_log, env, die_with_parent)
            m.node_pid, node_procs[m.index] = proc.pid, proc
            started.append(proc)
    net.save()
    for m in members:
        status = _wait_healthy(m, node_procs.get(m.index), timeout)
        if status == 200 and not pid_alive(m.comet_pid):
            cmd = [str(cometbft.binary_path()), "start", "--home", m.comet_home]
            proc = _spawn(cmd, m.comet_log, None, die_with_parent)
            m.comet_pid = proc.pid
            started.append(proc)
    net.save()
    return started


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: pgid == pid
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (from /proc; empty where there is none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def reap_group(pgid: int | None) -> list[int]:
    """SIGKILL what is left of a member process's group after its leader died (e.g. a
    kill -9 of the node left a validation worker or multiprocessing's resource tracker).
    Returns the pids killed. The group of a live leader is left alone."""
    if not pgid or pid_alive(pgid):
        return []
    left = group_members(pgid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _terminate(pid: int | None, timeout: float, kill: bool) -> None:
    if not pid_alive(pid):
        reap_group(pid)
        return
    assert pid is not None
    _signal_group(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    reap_group(pid)


def stop_member(net: Network, which: int | str, *, kill: bool = False,
                timeout: float = 10.0) -> None:
    """Stop a member's CometBFT then its node: SIGTERM (SIGKILL after ``timeout``), or
    SIGKILL right away with ``kill`` (a crash)."""
    m = net.member(which)
    _terminate(m.comet_pid, timeout, kill)
    _terminate(m.node_pid, timeout, kill)
    m.comet_pid = m.node_pid = None
    net.save()


def stop_network(net: Network, timeout: float = 10.0) -> None:
    for m in net.members:
        _terminate(m.comet_pid, timeout, False)
    for m in net.members:
        _terminate(m.node_pid, timeout, False)
        m.comet_pid = m.node_pid = None
    net.save()


def stop_and_reap(net: Network, procs: Iterable[subprocess.Popen[Any]],
                  timeout: float = 10.0) -> None:
    """Stop the network, then kill and reap any member process that is still running
    (the ones ``start_members`` returned)."""
    stop_network(net, timeout=timeout)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class MemberStatus:
    member: Member
    node_running: bool
    comet_running: bool
    serving: bool | None  # None: API unreachable
    height: int | None
    app_hash: str
    problem: str = ""
    consensus_height: int | None = None
    consensus: str = ""  # "" = committing; else why not (no quorum: who is missing)


def member_status(m: Member, client: httpx.Client) -> MemberStatus:
    node_up, comet_up = pid_alive(m.node_pid), pid_alive(m.comet_pid)
    serving: bool | None = None
    height: int | None = None
    app_hash = problem = ""
    try:
        doc = client.get(m.api_url + "/ledger/status", timeout=2).json()
        serving, height, app_hash = bool(doc["serving"]), int(doc["height"]), doc["app_hash"]
        problem = doc.get("problem", "")
    except (httpx.HTTPError, ValueError, KeyError):
        problem = "API unreachable"
    consensus = ""
    if serving:
        try:
            ready = client.get(m.api_url + "/readyz", timeout=2)
            consensus = "" if ready.status_code == 200 else str(ready.json().get("reason", ""))
        except (httpx.HTTPError, ValueError):
            consensus = "readiness unknown (API did not answer /readyz)"
    consensus_height = None
    if comet_up:
        try:
            res = client.post(m.rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": "status",
                                               "params": {}}, timeout=2).json()
            consensus_height = int(res["result"]["sync_info"]["latest_block_height"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
    elif node_up and serving and not problem:
        problem = "CometBFT is not running"
    return MemberStatus(m, node_up, comet_up, serving, height, app_hash, problem,
                        consensus_height, consensus)


def network_status(net: Network) -> list[MemberStatus]:
    with httpx.Client() as client:
        return [member_status(m, client) for m in net.members]


def org_identity(m: Member, password: str) -> keys.Identity:
    return Home(m.home).unlock_org(password)


def b64_validator_pub(m: Member) -> str:
    return b64e(validator_pub(Path(m.comet_home)))
