"""CometBFT homes, processes and RPC, managed from Python.

Owns: finding the pinned ``cometbft`` binary, creating node homes (single nodes and
n-validator testnets on loopback), the ``config.toml`` settings medledger relies on,
starting/stopping ``cometbft start`` processes, and a small async JSON-RPC client.

It knows nothing about medledger transactions: genesis ``app_state`` is passed through
as an opaque JSON object and arrives at the application in ``init_chain``.

Settings chosen for medledger networks (see ``consensus_settings``):
- empty blocks ON with a 1 s interval: the ledger clock (block time) keeps moving
  when idle, so time-based rules (share-link expiry, consent periods) and liveness
  checks work without traffic; blocks with txs are produced as soon as txs arrive.
- loopback-tuned timeouts (``timeout_commit`` 300 ms, short propose/vote timeouts).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from medledger.errors import MedledgerError, Unavailable

__all__ = [
    "COMETBFT_VERSION",
    "CometRpc",
    "CometRpcError",
    "CometbftNotFound",
    "NodeLayout",
    "NodeStatus",
    "TxLookup",
    "binary_path",
    "consensus_settings",
    "edit_config",
    "workload_settings",
    "free_ports",
    "init_home",
    "kill_node",
    "make_testnet",
    "node_id",
    "start_node",
    "stop_node",
]

COMETBFT_VERSION = "0.38.25"
log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[3]
LOG_FILE_NAME = "cometbft.log"


class CometbftNotFound(MedledgerError):
    """No usable ``cometbft`` binary."""

    code = 15
    http_status = 503


class CometRpcError(Unavailable):
    """CometBFT's RPC refused or failed a call (transport error or JSON-RPC error)."""


# --------------------------------------------------------------------------- binary


def binary_path() -> Path:
    """The ``cometbft`` binary: ``$MEDLEDGER_COMETBFT``, else ``<repo>/.tools/bin/cometbft``
    (installed by ``scripts/install_cometbft.sh``), else ``cometbft`` on ``PATH``."""
    env = os.environ.get("MEDLEDGER_COMETBFT")
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise CometbftNotFound(f"MEDLEDGER_COMETBFT={env} is not an executable file")
        return path
    local = _REPO_ROOT / ".tools" / "bin" / "cometbft"
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which("cometbft")
    if found:
        return Path(found)
    raise CometbftNotFound(
        "cometbft binary not found",
        hint="run scripts/install_cometbft.sh or set MEDLEDGER_COMETBFT",
    )


def _run(args: Sequence[str], binary: Path | None = None) -> str:
    cmd = [str(binary or binary_path()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise MedledgerError(
            f"{' '.join(cmd)} failed with exit code {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout


# --------------------------------------------------------------------------- config.toml


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for our plain values
    raise TypeError(f"unsupported TOML value {value!r}")


def edit_config(path: Path, settings: Mapping[str, object]) -> None:
    """Set keys in CometBFT's ``config.toml`` in place, keeping its comments.

    Keys are ``"key"`` for the top-level table or ``"section.key"`` (e.g.
    ``"consensus.timeout_commit"``). Every key must already exist in the file (the
    template written by ``cometbft init`` has them all), which catches typos.
    """
    lines = path.read_text().splitlines(keepends=True)
    pending = dict(settings)
    section = ""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped.strip("[]").strip()
            continue
        if not stripped or stripped.startswith("#") or "=" not in stripped:
            continue
        key = stripped.split("=", 1)[0].strip()
        full = f"{section}.{key}" if section else key
        if full in pending:
            lines[i] = f"{key} = {_toml_value(pending.pop(full))}\n"
    if pending:
        raise KeyError(f"keys not found in {path}: {sorted(pending)}")
    path.write_text("".join(lines))


def consensus_settings(
    *, empty_blocks_interval: str | None = "1s", timeout_commit: str = "300ms"
) -> dict[str, object]:
    """``config.toml`` consensus settings for fast blocks on a LAN/loopback.

    ``empty_blocks_interval=None`` turns empty blocks off (CometBFT then still makes
    one extra block after a block that changed the app hash, carrying the new hash).
    """
    settings: dict[str, object] = {
        "consensus.timeout_propose": "1s",
        "consensus.timeout_propose_delta": "200ms",
        "consensus.timeout_prevote": "300ms",
        "consensus.timeout_prevote_delta": "100ms",
        "consensus.timeout_precommit": "300ms",
        "consensus.timeout_precommit_delta": "100ms",
        "consensus.timeout_commit": timeout_commit,
        "consensus.peer_gossip_sleep_duration": "20ms",
        "consensus.create_empty_blocks": empty_blocks_interval is not None,
        "consensus.create_empty_blocks_interval": empty_blocks_interval or "0s",
    }
    return settings


# Sized for medledger's workload (docs/NETWORK.md "CometBFT settings" explains and
# measures each). ADR 4: the largest tx is 1 MiB (big imports are staged over several).
MAX_TX_BYTES = 1024 * 1024
MAX_UNIX_SOCKET_PATH = 100  # sun_path holds 107 bytes on Linux, 103 on macOS
BLOCK_MAX_BYTES = 2 * 1024 * 1024  # the largest tx fits; ~700 record.puts of ~3 KB


def workload_settings() -> dict[str, object]:
    """``config.toml`` settings for blocks, mempool, p2p and RPC (see ``BLOCK_MAX_BYTES``)."""
    return {
        "mempool.max_tx_bytes": MAX_TX_BYTES,
        "mempool.size": 10_000,  # txs waiting; at ~500 tx/s that is 20 s of backlog
        "mempool.max_txs_bytes": 256 * 1024 * 1024,  # bounded memory, not the 1 GiB default
        "mempool.cache_size": 100_000,  # dedupe cache: larger than what is in flight
        # a block of BLOCK_MAX_BYTES must reach every validator well inside timeout_propose;
        # at CometBFT's default 5 MB/s per peer a 2 MiB block needs ~0.4 s
        "p2p.send_rate": 50 * 1024 * 1024,
        "p2p.recv_rate": 50 * 1024 * 1024,
        # a 1 MiB tx is ~1.4 MB as base64 in a JSON-RPC body (default limit 1 MB)
        "rpc.max_body_bytes": 4 * MAX_TX_BYTES,
    }


# --------------------------------------------------------------------------- homes


@dataclass(frozen=True)
class NodeLayout:
    """One node of a network: its home and the loopback ports it uses."""

    index: int
    moniker: str
    home: Path
    node_id: str
    p2p_port: int
    rpc_port: int
    abci_port: int
    host: str = "127.0.0.1"
    # ABCI over a Unix socket in the network's private directory (``make_testnet``);
    # ``None``: over loopback TCP on ``abci_port``
    abci_socket: Path | None = None

    @property
    def proxy_app(self) -> str:
        """Where CometBFT dials the ABCI application (an ``AbciServer``)."""
        if self.abci_socket is not None:
            return f"unix://{self.abci_socket}"
        return f"tcp://{self.host}:{self.abci_port}"

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.rpc_port}"

    @property
    def p2p_address(self) -> str:
        return f"{self.node_id}@{self.host}:{self.p2p_port}"

    @property
    def log_path(self) -> Path:
        return self.home / LOG_FILE_NAME

    @property
    def config_path(self) -> Path:
        return self.home / "config" / "config.toml"

    @property
    def genesis_path(self) -> Path:
        return self.home / "config" / "genesis.json"


def init_home(home: Path, moniker: str, *, binary: Path | None = None) -> None:
    """``cometbft init --home`` (keys, config, a one-validator genesis); sets moniker.

    Existing keys and genesis are kept (CometBFT's init does not overwrite them).
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    _run(["init", "--home", str(home)], binary)
    edit_config(home / "config" / "config.toml", {"moniker": moniker})


def node_id(home: Path, *, binary: Path | None = None) -> str:
    """The p2p node id (hex of the node key's address) of a home."""
    return _run(["show-node-id", "--home", str(home)], binary).strip()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free right now (the OS picks them)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _validator_entry(home: Path, name: str) -> dict[str, Any]:
    key = json.loads((home / "config" / "priv_validator_key.json").read_text())
    return {"address": key["address"], "pub_key": key["pub_key"], "power": "10", "name": name}


def _rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_testnet(
    base_dir: Path,
    n: int,
    chain_id: str,
    app_state: Mapping[str, Any],
    base_port: int | None = None,
    *,
    genesis_time: datetime | None = None,
    empty_blocks_interval: str | None = "1s",
    timeout_commit: str = "300ms",
    log_level: str = "info",
    block_max_bytes: int = BLOCK_MAX_BYTES,
    settings: Mapping[str, object] | None = None,
    binary: Path | None = None,
    abci_unix: bool = True,
) -> list[NodeLayout]:
    """Create ``n`` validator homes ``base_dir/node<i>`` for one loopback network.

    All homes share one genesis: every node's validator key (power 10 each), the
    given ``chain_id`` and ``app_state`` (opaque JSON, delivered to ``init_chain``).
    Ports: node ``i`` uses ``base_port + 3i`` (p2p), ``+1`` (rpc), ``+2`` (abci);
    with ``base_port=None`` free ports are picked. Each node lists all others as
    persistent peers. Blocks hold at most ``block_max_bytes``; ``workload_settings``
    (then ``settings``) are written to every ``config.toml``. Homes that already hold
    blocks are refused (a new genesis over old chain data would not start).

    ``abci_unix``: each app serves ABCI on ``base_dir/abci<i>.sock`` (``base_dir`` made
    ``0700``: ABCI has no authentication, and a loopback port is open to every local
    user), unless the path is too long for a Unix socket; then on the ABCI port.
    """
    if n < 1:
        raise ValueError("a network needs at least one node")
    base_dir = Path(base_dir)
    for i in range(n):
        if (base_dir / f"node{i}" / "data" / "blockstore.db").exists():
            raise MedledgerError(
                f"{base_dir / f'node{i}'} already holds a chain",
                hint="use a fresh directory or delete the old network",
            )
    if base_port is None:
        ports = free_ports(3 * n)
    else:
        ports = list(range(base_port, base_port + 3 * n))
    binary = binary or binary_path()

    homes = [base_dir / f"node{i}" for i in range(n)]
    monikers = [f"node{i}" for i in range(n)]
    sockets: list[Path | None] = [None] * n
    if abci_unix:
        base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(base_dir, 0o700)
        wanted = [base_dir.resolve() / f"abci{i}.sock" for i in range(n)]
        if all(len(os.fsencode(p)) <= MAX_UNIX_SOCKET_PATH for p in wanted):
            sockets = list(wanted)
        else:
            log.warning("%s is too long a path for Unix sockets (%d bytes at most): ABCI "
                        "goes over loopback TCP, which every local user can reach; use a "
                        "shorter directory", wanted[0], MAX_UNIX_SOCKET_PATH)
    for home, moniker in zip(homes, monikers, strict=True):
        init_home(home, moniker, binary=binary)
    layouts = [
        NodeLayout(
            index=i,
            moniker=monikers[i],
            home=homes[i],
            node_id=node_id(homes[i], binary=binary),
            p2p_port=ports[3 * i],
            rpc_port=ports[3 * i + 1],
            abci_port=ports[3 * i + 2],
            abci_socket=sockets[i],
        )
        for i in range(n)
    ]

    genesis = json.loads(layouts[0].genesis_path.read_text())
    genesis["genesis_time"] = _rfc3339(genesis_time or datetime.now(UTC))
    genesis["chain_id"] = chain_id
    genesis["initial_height"] = "1"
    genesis["validators"] = [_validator_entry(lay.home, lay.moniker) for lay in layouts]
    genesis["app_state"] = dict(app_state)
    genesis["app_hash"] = ""
    genesis["consensus_params"]["block"]["max_bytes"] = str(block_max_bytes)
    genesis_text = json.dumps(genesis, indent=2) + "\n"

    for lay in layouts:
        lay.genesis_path.write_text(genesis_text)
        peers = ",".join(other.p2p_address for other in layouts if other is not lay)
        edit_config(
            lay.config_path,
            {
                "proxy_app": lay.proxy_app,
                "abci": "socket",
                "log_level": log_level,
                "rpc.laddr": f"tcp://{lay.host}:{lay.rpc_port}",
                "p2p.laddr": f"tcp://{lay.host}:{lay.p2p_port}",
                "p2p.external_address": f"{lay.host}:{lay.p2p_port}",
                "p2p.persistent_peers": peers,
                "p2p.addr_book_strict": False,
                "p2p.allow_duplicate_ip": True,
                "p2p.flush_throttle_timeout": "10ms",
                **consensus_settings(
                    empty_blocks_interval=empty_blocks_interval, timeout_commit=timeout_commit
                ),
                **workload_settings(),
                **(settings or {}),
            },
        )
    return layouts


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the child if the parent dies, so test crashes leave no orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start_node(
    layout: NodeLayout, *, binary: Path | None = None, extra_args: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``cometbft start`` for ``layout.home``; stdout+stderr append to ``home/cometbft.log``.

    The ABCI server at ``layout.proxy_app`` should already listen (CometBFT retries
    the connection only briefly). The child runs in its own session.
    """
    cmd = [str(binary or binary_path()), "start", "--home", str(layout.home), *extra_args]
    log_file = open(layout.log_path, "ab")  # noqa: SIM115 - handed to the child
    # PR_SET_PDEATHSIG fires when the spawning *thread* exits: only safe from the main one.
    preexec = _die_with_parent if threading.current_thread() is threading.main_thread() else None
    try:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509
        )
    finally:
        log_file.close()


def stop_node(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM (CometBFT shuts down cleanly), then SIGKILL after ``timeout``s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def kill_node(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGKILL (a crash): no shutdown, no flush."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    return proc.returncode


# --------------------------------------------------------------------------- RPC


@dataclass(frozen=True)
class NodeStatus:
    height: int
    app_hash_hex: str  # app hash in the latest header = state after block height-1
    catching_up: bool
    node_id: str = ""
    block_time: str = ""


@dataclass(frozen=True)
class TxLookup:
    hash_hex: str
    height: int
    index: int
    code: int
    log: str
    data: bytes
    tx: bytes


class CometRpc:
    """Async JSON-RPC client for one CometBFT node (``http://host:rpc_port``)."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout)
        self._next_id = 0

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> CometRpc:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """One JSON-RPC call; returns ``result`` or raises ``CometRpcError``."""
        self._next_id += 1
        body = {
            "jsonrpc": "2.0",
            "id": self._next_id,
            "method": method,
            "params": dict(params or {}),
        }
        try:
            resp = await self._client.post("/", json=body)
        except httpx.HTTPError as exc:
            raise CometRpcError(f"CometBFT RPC {self.url} unreachable ({method}): {exc}") from exc
        try:
            payload = resp.json()
        except ValueError as exc:
            raise CometRpcError(
                f"CometBFT RPC {method}: HTTP {resp.status_code}, not JSON: {resp.text[:200]}"
            ) from exc
        if payload.get("error"):
            err = payload["error"]
            detail = err.get("data") or err.get("message") or err
            raise CometRpcError(f"CometBFT RPC {method} failed: {detail}")
        return payload.get("result")

    async def broadcast_tx_sync(self, tx: bytes) -> tuple[int, str, str]:
        """Submit a tx after CheckTx: ``(code, log, tx hash hex)``; code 0 = in mempool."""
        res = await self.call("broadcast_tx_sync", {"tx": base64.b64encode(tx).decode()})
        return int(res["code"]), str(res.get("log", "")), str(res["hash"])

    async def status(self) -> NodeStatus:
        res = await self.call("status")
        sync = res["sync_info"]
        return NodeStatus(
            height=int(sync["latest_block_height"]),
            app_hash_hex=str(sync["latest_app_hash"]),
            catching_up=bool(sync["catching_up"]),
            node_id=str(res.get("node_info", {}).get("id", "")),
            block_time=str(sync.get("latest_block_time", "")),
        )

    async def tx(self, tx_hash: bytes | str) -> TxLookup | None:
        """The committed tx with this hash (bytes or hex), or ``None`` if not (yet) indexed."""
        raw = bytes.fromhex(tx_hash) if isinstance(tx_hash, str) else tx_hash
        try:
            res = await self.call("tx", {"hash": base64.b64encode(raw).decode(), "prove": False})
        except CometRpcError as exc:
            if "not found" in str(exc):
                return None
            raise
        result = res.get("tx_result", {})
        return TxLookup(
            hash_hex=str(res["hash"]),
            height=int(res["height"]),
            index=int(res.get("index", 0)),
            code=int(result.get("code", 0)),
            log=str(result.get("log", "")),
            data=base64.b64decode(result.get("data") or ""),
            tx=base64.b64decode(res.get("tx") or ""),
        )

    async def abci_query(
        self, path: str, data: bytes = b"", height: int = 0
    ) -> tuple[int, bytes, str, int]:
        """ABCI ``Query`` through CometBFT: ``(code, value, log, height)``."""
        res = await self.call(
            "abci_query",
            {"path": path, "data": data.hex(), "height": str(height), "prove": False},
        )
        r = res["response"]
        return (
            int(r.get("code", 0)),
            base64.b64decode(r.get("value") or ""),
            str(r.get("log", "")),
            int(r.get("height", 0)),
        )

    async def block_app_hash(self, height: int) -> str:
        """App hash in the header of block ``height`` (state after ``height - 1``)."""
        res = await self.call("block", {"height": str(height)})
        return str(res["block"]["header"]["app_hash"])

    async def wait_for_height(self, height: int, timeout: float = 30.0) -> NodeStatus:
        """Poll ``status`` until the node has committed ``height``."""
        deadline = time.monotonic() + timeout
        last: NodeStatus | None = None
        while True:
            try:
                last = await self.status()
                if last.height >= height:
                    return last
            except CometRpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"{self.url} did not reach height {height} in {timeout}s "
                    f"(at {last.height if last else 'unreachable'})"
                )
            await asyncio.sleep(0.1)
