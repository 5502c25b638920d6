"""A real 4-validator CometBFT network of medledger nodes (8 processes), end to end.

One network is brought up for the module (``node.network``, what ``medledger net up``
runs) and the tests run in order against it, each leaving every member serving:

- writes at any node commit everywhere: same record versions, anchored audit events,
  block headers and app hashes on all four nodes;
- Byzantine input (unknown key, other chain, replay, policy violation) is refused by
  every node with the same code, and blocks keep coming;
- kill -9 of one validator under write load loses nothing acknowledged; it restarts
  from its SQLite store and catches up to the same app hash;
- two of four down: writes stall (no split brain) and resume when one returns;
- a tampered store: the node refuses to serve (healthz 503, ``net status`` says so),
  the other three carry on; repaired, it rejoins;
- governance: a fifth organisation proposed by org-1 and approved by org-2 and org-3
  becomes active on every node, its CometBFT validator is added with power 10, it
  signs txs, and its own node (a fifth validator process) syncs from genesis.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sqlite3
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from helpers import tcp_listeners

from medledger.client import Client, NodeError
from medledger.consensus import cometbft
from medledger.consensus.cometbft import CometbftNotFound
from medledger.core.tx import make_tx
from medledger.crypto import keys
from medledger.crypto.canonical import b64e
from medledger.errors import Forbidden
from medledger.node import network
from medledger.node.home import Home, init_home, org_genesis_entry

try:
    cometbft.binary_path()
except CometbftNotFound as exc:
    pytest.skip(str(exc), allow_module_level=True)

pytestmark = [pytest.mark.network, pytest.mark.timeout(240)]

PW = "network-test-password"
COMMIT_TIMEOUT_S = 6.0


# --------------------------------------------------------------------------- harness


class Harness:
    """The running network, with the identities the tests act as."""

    def __init__(self, net: network.Network) -> None:
        self.net = net
        self.procs: list[subprocess.Popen[bytes]] = []
        self.orgs = [network.org_identity(m, PW) for m in net.members]
        self.doctors: list[keys.Identity] = []
        self.patients: list[str] = []
        self._tokens: dict[int, str] = {}

    @property
    def urls(self) -> list[str]:
        return [m.api_url for m in self.net.members]

    def start(self, *members: int) -> None:
        self.procs += network.start_members(self.net, members, PW, die_with_parent=True)

    def stop(self, i: int, kill: bool = False) -> None:
        network.stop_member(self.net, i, kill=kill)
        self.reap()

    def reap(self) -> None:
        for p in self.procs:
            p.poll()

    def status(self, i: int) -> dict[str, Any]:
        return httpx.get(self.urls[i] + "/ledger/status", timeout=5).json()  # type: ignore[no-any-return]

    def heights(self, nodes: list[int] | None = None) -> list[int]:
        return [self.status(i)["height"] for i in (nodes or range(len(self.urls)))]

    def header(self, i: int, height: int) -> dict[str, Any]:
        return self.member_get(i, f"/ledger/blocks/{height}")["header"]  # type: ignore[no-any-return]

    def member_headers(self, i: int) -> dict[str, str]:
        """A bearer token of node ``i``'s own organisation: the raw ledger is members-only
        (tokens live in a node's memory: a restarted node needs a new one)."""
        if i not in self._tokens:  # its own organisation (any member's would do)
            with Client(self.urls[i], self.orgs[min(i, len(self.orgs) - 1)]) as c:
                self._tokens[i] = c.token()
        return {"Authorization": f"Bearer {self._tokens[i]}"}

    def member_request(self, method: str, i: int, path: str, **kw: Any) -> httpx.Response:
        extra = kw.pop("headers", {})
        for _ in range(2):
            resp = httpx.request(method, self.urls[i] + path, timeout=30,
                                 headers={**extra, **self.member_headers(i)}, **kw)
            if resp.status_code != 401:
                break
            self._tokens.pop(i, None)
        return resp

    def member_get(self, i: int, path: str) -> Any:
        return self.member_request("GET", i, path).json()

    def rpc(self, i: int, method: str, **params: Any) -> Any:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        doc = httpx.post(self.net.members[i].rpc_url, json=body, timeout=5).json()
        if doc.get("error"):
            raise AssertionError(f"RPC {method} at node {i}: {doc['error']}")
        return doc["result"]

    def post_raw(self, i: int, raw: bytes) -> tuple[int, str]:
        resp = self.member_request("POST", i, "/ledger/tx", content=raw,
                                   headers={"Content-Type": "application/octet-stream"})
        doc = resp.json()
        if resp.status_code == 200:
            return 200, str(doc["code"])
        return resp.status_code, "; ".join(x["diagnostics"] for x in doc["issue"])

    def wait_same_state(self, nodes: list[int] | None = None, timeout: float = 30) -> int:
        """Wait until ``nodes`` reach a common height with identical headers; return it."""
        nodes = nodes if nodes is not None else list(range(len(self.urls)))
        target = max(self.heights(nodes))
        eventually(lambda: min(self.heights(nodes)) >= target, timeout,
                   f"nodes {nodes} to reach height {target}")
        headers = [self.header(i, target) for i in nodes]
        assert all(h == headers[0] for h in headers), headers
        return target


def eventually(check: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


@pytest.fixture(scope="module")
def tn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    directory = tmp_path_factory.mktemp("net")
    net = network.create_network(directory, 4, PW, chain="medledger-test-net",
                                 commit_timeout_s=COMMIT_TIMEOUT_S, scrypt_n=2**12)
    t = Harness(net)
    try:
        t.start(0, 1, 2, 3)
        eventually(lambda: min(t.heights()) >= 2, 60, "the first blocks")
        yield t
    finally:
        network.stop_and_reap(net, t.procs, timeout=5)
        for line in _failures(net):
            print(line)


@pytest.fixture(autouse=True)
def _all_members_running(tn: Harness) -> Iterator[None]:
    """Each test starts with every member up: one that fails half-way (with members
    stopped) must not take the tests after it down too."""
    tn.start(*range(len(tn.net.members)))
    yield


def _failures(net: network.Network) -> list[str]:
    out = []
    for m in net.members:
        for path in (m.node_log, m.comet_log):
            try:
                lines = [ln for ln in path.read_text().splitlines() if "ERROR" in ln
                         or "CRITICAL" in ln or "Traceback" in ln]
            except OSError:
                continue
            out += [f"{path}: {ln}" for ln in lines[-5:]]
    return out


def _doctor(tn: Harness, i: int) -> keys.Identity:
    with Client(tn.urls[i], tn.orgs[i]) as c:
        doc = c.post("/admin/practitioners", {"id": f"dr-{i}-{uuid.uuid4().hex[:6]}",
                                              "role": "physician", "password": PW})
    return keys.unlock(orjson.dumps(doc["keystore"]), PW)


def _patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": "female",
            "birthDate": f"19{50 + len(pid) % 40}-0{1 + len(pid) % 9}-1{len(pid) % 9}",
            "name": [{"family": f"Family{pid}", "given": [f"Given{pid}"]}]}


def _observation(pid: str, value: float) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4",
                                 "display": "Heart rate"}]},
            "subject": {"reference": f"Patient/{pid}"},
            "valueQuantity": {"value": value, "unit": "/min"}}


# --------------------------------------------------------------------------- tests


def test_any_node_accepts_writes_and_every_node_agrees(tn: Harness) -> None:
    # Each organisation registers a physician at its own node; each physician registers
    # a patient and writes (then updates) an observation there.
    records: list[tuple[int, str, str]] = []  # (org index, patient id, observation id)
    for i in range(4):
        dr = _doctor(tn, i)
        tn.doctors.append(dr)
        pid = f"pat-{i}-{uuid.uuid4().hex[:6]}"
        tn.patients.append(pid)
        with Client(tn.urls[i], dr) as c:
            c.request("PUT", f"/fhir/Patient/{pid}", _patient(pid),
                      headers={"X-Medledger-Patient-Password": PW})
            obs = c.post("/fhir/Observation", _observation(pid, 60 + i))
            obs2 = c.put(f"/fhir/Observation/{obs['id']}", {**_observation(pid, 70 + i),
                                                              "id": obs["id"]})
            assert obs2["meta"]["versionId"] == "2"
        records.append((i, pid, obs["id"]))
    tn.wait_same_state()

    # The same versions everywhere; physicians authenticate at any node with their key.
    reads: dict[tuple[int, int], Any] = {}
    for i, pid, oid in records:
        for j in range(4):
            with Client(tn.urls[j], tn.doctors[i]) as c:
                patient = c.get(f"/fhir/Patient/{pid}")
                history = c.get(f"/fhir/Observation/{oid}/_history")
            reads[(i, j)] = (patient, [e["resource"] for e in history["entry"]])
        for j in range(1, 4):
            assert reads[(i, j)] == reads[(i, 0)]
        assert [r["meta"]["versionId"] for r in reads[(i, 0)][1]] == ["2", "1"]
        assert reads[(i, 0)][1][0]["valueQuantity"]["value"] == 70 + i

    # Every node anchored its read events; all nodes hold the same anchored events.
    def anchored(j: int, pid: str) -> dict[str, int]:
        with Client(tn.urls[j], tn.orgs[j]) as c:
            bundle = c.get(f"/fhir/AuditEvent?patient={pid}&_count=1000")
        out = {}
        for e in bundle.get("entry", []):
            ext = {x["url"].rsplit("/", 1)[-1]: x for x in e["resource"]["extension"]}
            if "anchored-height" in ext:
                out[e["resource"]["id"]] = ext["anchored-height"]["valueInteger"]
        return out

    pid0 = records[0][1]

    def reads_anchored_from_every_node() -> bool:
        with Client(tn.urls[0], tn.orgs[0]) as c:
            bundle = c.get(f"/fhir/AuditEvent?patient={pid0}&_count=1000")
        observers = {e["resource"]["source"]["observer"]["reference"]
                     for e in bundle.get("entry", []) if any(
                         x["url"].endswith("anchored-height") for x in e["resource"]["extension"])}
        return observers >= {f"Organization/{o.id}" for o in tn.orgs}

    eventually(reads_anchored_from_every_node, 20, "read audit events of all 4 nodes anchored")
    top = tn.wait_same_state()
    views = [{k: h for k, h in anchored(j, pid0).items() if h <= top} for j in range(4)]
    assert views[0] and all(v == views[0] for v in views[1:])
    some_event = next(iter(views[0]))
    proofs = [tn.member_get(j, f"/ledger/proof/audit/{some_event}") for j in range(4)]
    assert all(p == proofs[0] for p in proofs[1:])

    # Same app hash at the same height, on every node and in CometBFT's own headers.
    statuses = [tn.status(j) for j in range(4)]
    assert all(s["mode"] == "cometbft" and s["serving"] for s in statuses)
    for h in (1, top // 2, top):
        headers = [tn.header(j, h) for j in range(4)]
        assert all(x == headers[0] for x in headers[1:])
        comet_next = tn.rpc(0, "block", height=str(h + 1)) if h < top else None
        if comet_next is not None:
            assert comet_next["block"]["header"]["app_hash"].lower() == headers[0]["app_hash"]


def test_byzantine_input_is_refused_by_every_node_alike(tn: Harness) -> None:
    org1 = tn.orgs[0]
    chain = tn.net.chain

    def nonce() -> str:
        return uuid.uuid4().hex

    # a nurse of org-1 who will try to sign a consent for a patient
    with Client(tn.urls[0], org1) as c:
        nurse_doc = c.post("/admin/practitioners", {"id": f"nurse-{uuid.uuid4().hex[:6]}",
                                                    "role": "nurse", "password": PW})
    nurse = keys.unlock(orjson.dumps(nurse_doc["keystore"]), PW)
    mallory = keys.new_identity("mallory", "org")
    consent = {"id": str(uuid.uuid4()), "patient": tn.patients[0], "decision": "permit",
               "categories": [], "labels": [], "orgs": ["org-2"], "actors": [],
               "start": None, "end": None}
    register = {"id": f"x-{uuid.uuid4().hex[:6]}", "kind": "practitioner", "role": "nurse",
                "sign_pub": b64e(mallory.sign_public), "enc_pub": b64e(mallory.enc_public)}
    bad = {
        "unknown signer": make_tx("mallory", mallory.signer(), chain, "actor.register",
                                  register, nonce()).raw,
        "other chain": make_tx(org1.id, org1.signer(), "some-other-chain", "actor.register",
                               register, nonce()).raw,
        "policy: nurse signs a consent": make_tx(nurse.id, nurse.signer(), chain,
                                                 "consent.put", consent, nonce()).raw,
    }
    expected = {"unknown signer": 401, "other chain": 409,
                "policy: nurse signs a consent": 403}
    # a valid tx, committed once through node 0, then replayed to every node
    good = make_tx(org1.id, org1.signer(), chain, "actor.register", register, nonce()).raw
    assert tn.post_raw(0, good) == (200, "0")
    tn.wait_same_state()
    bad["replay of a committed tx"] = good
    expected["replay of a committed tx"] = 409

    before = max(tn.heights())
    for what, raw in bad.items():
        answers = [tn.post_raw(j, raw) for j in range(4)]
        assert all(a == answers[0] for a in answers), (what, answers)
        assert answers[0][0] == expected[what], (what, answers)
        # CometBFT's CheckTx at every node agrees on the result code too. The mempool
        # judges signer, signature, chain and nonce only (core.mempool): a well-signed
        # policy violation sent straight to CometBFT is admitted, and refused in the block.
        if what.startswith("policy"):  # admitted once; its block then burns the nonce
            assert tn.rpc(0, "broadcast_tx_sync", tx=base64.b64encode(raw).decode())[
                "code"] == 0
        elif what != "replay of a committed tx":
            codes = {tn.rpc(j, "broadcast_tx_sync", tx=base64.b64encode(raw).decode())["code"]
                     for j in range(4)}
            assert len(codes) == 1 and codes != {0}, (what, codes)
    eventually(lambda: min(tn.heights()) > before + 2, 20, "blocks after the refused txs")
    for what, raw in bad.items():
        h = base64.b64encode(hashlib.sha256(raw).digest()).decode()
        if what.startswith("policy"):  # in a block once, refused there by every node alike
            found = eventually(lambda h=h: tn.rpc(1, "tx", hash=h), 20, "the policy tx")
            assert found["tx_result"]["code"] == Forbidden.code, found
            height = int(found["height"])
            codes = {next(t["code"] for t in tn.member_get(i, f"/ledger/blocks/{height}")["txs"]
                          if t["hash"] == hashlib.sha256(raw).hexdigest())
                     for i in range(len(tn.urls))}
            assert codes == {Forbidden.code}, codes
        elif raw is not good:  # the other refused txs never reach a block
            with pytest.raises(AssertionError, match="not found"):
                tn.rpc(1, "tx", hash=h)


class Writer(threading.Thread):
    """Writes observations through one node until stopped; remembers what was acknowledged."""

    def __init__(self, tn: Harness, node: int) -> None:
        super().__init__(daemon=True)
        self.url, self.dr, self.pid = tn.urls[node], tn.doctors[node], tn.patients[node]
        self.acked: list[str] = []
        self.errors: list[str] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        with Client(self.url, self.dr, timeout=30) as c:
            n = 0
            while not self.stop_flag.is_set():
                n += 1
                try:
                    self.acked.append(c.post("/fhir/Observation",
                                             _observation(self.pid, float(n)))["id"])
                except NodeError as err:
                    self.errors.append(str(err))


def test_kill_one_validator_under_load_then_it_catches_up(tn: Harness) -> None:
    writers = [Writer(tn, 0), Writer(tn, 1)]
    for w in writers:
        w.start()
    try:
        eventually(lambda: all(len(w.acked) >= 3 for w in writers), 20, "writes to start")
        tn.stop(3, kill=True)  # kill -9 its CometBFT and node
        at_kill = [len(w.acked) for w in writers]
        eventually(lambda: all(len(w.acked) >= n + 10
                               for w, n in zip(writers, at_kill, strict=True)),
                   30, "writes to keep committing on 3 of 4 validators")
    finally:
        for w in writers:
            w.stop_flag.set()
        for w in writers:
            w.join(40)
    assert not any(w.errors for w in writers), [w.errors for w in writers]
    top = tn.wait_same_state([0, 1, 2])

    tn.start(3)  # same SQLite store: Info reports its height, CometBFT replays the rest
    eventually(lambda: tn.heights([3])[0] >= top, 60, "the restarted node to catch up")
    tn.wait_same_state()
    for w, i in zip(writers, (0, 1), strict=True):
        with Client(tn.urls[3], tn.doctors[i]) as c:
            bundle = c.get(f"/fhir/Observation?patient={tn.patients[i]}&_count=1000")
        ids = {e["resource"]["id"] for e in bundle["entry"]}
        assert set(w.acked) <= ids  # nothing acknowledged is lost


def test_two_of_four_down_quorum_visible_writes_fail_fast_and_retry_is_idempotent(
        tn: Harness) -> None:
    from typer.testing import CliRunner

    from medledger.cli.main import app

    tn.stop(2, kill=True)
    tn.stop(3, kill=True)
    missing = {tn.net.members[2].org_id, tn.net.members[3].org_id}
    # /readyz names the validators that stopped voting, within a few seconds (it may first
    # say only "not committing" while the node still waits at the step it was in)
    ready = eventually(lambda: (r := httpx.get(tn.urls[0] + "/readyz", timeout=5)).status_code
                       == 503 and r.json().get("consensus", {}).get("quorum") is False
                       and r.json(), 30, "node 0 to report the lost quorum")
    assert set(ready["consensus"]["missing_validators"]) == missing, ready
    assert "no quorum" in ready["reason"] and all(o in ready["reason"] for o in missing)
    # both survivors notice on their own (each within a few seconds of the other)
    eventually(lambda: httpx.get(tn.urls[1] + "/readyz", timeout=5).status_code == 503, 30,
               "node 1 to report the lost quorum")
    result = CliRunner().invoke(app, ["net", "status", "--dir", tn.net.dir])
    assert result.exit_code == 3, result.output
    reasons = [line for line in result.output.splitlines() if "no quorum:" in line]
    assert len(reasons) == 2 and all(o in line for o in missing for line in reasons), reasons
    h0, h1 = tn.heights([0, 1])
    assert h0 == h1 and tn.header(0, h0) == tn.header(1, h1)  # no split brain

    # a write fails fast with the reason, naming the record it would create
    key = f"retry-{uuid.uuid4().hex}"
    obs = _observation(tn.patients[0], 1.0)
    with Client(tn.urls[0], tn.doctors[0], timeout=30, retries=0) as c:
        with pytest.raises(NodeError) as err:
            c.request("POST", "/fhir/Observation", obs, idempotency_key=key)
    assert err.value.status == 503 and "no quorum" in str(err.value), err.value
    named = re.search(r"would create Observation/([0-9a-f-]+) version 1", str(err.value))
    assert named and key in str(err.value), err.value
    rid = named.group(1)

    tn.start(2)
    eventually(lambda: httpx.get(tn.urls[0] + "/readyz", timeout=5).status_code == 200, 60,
               "quorum to return with 3 of 4 validators")
    # the retry with the same key gives the record named in the 503, once
    with Client(tn.urls[0], tn.doctors[0], timeout=30) as c:
        first = c.request("POST", "/fhir/Observation", obs, idempotency_key=key).json()
        again = c.request("POST", "/fhir/Observation", obs, idempotency_key=key).json()
        history = c.get(f"/fhir/Observation/{rid}/_history")
    assert first["id"] == again["id"] == rid
    assert first["meta"]["versionId"] == again["meta"]["versionId"] == "1"
    assert history["total"] == 1, history
    tn.start(3)
    eventually(lambda: tn.heights([3])[0] >= max(tn.heights([0, 1, 2])), 60,
               "node 3 to catch up")
    tn.wait_same_state(timeout=30)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def test_abci_is_a_private_unix_socket(tn: Harness) -> None:
    """ABCI has no authentication: `net` serves it on a Unix socket only this user can
    reach (0600, in a 0700 directory), and on no TCP port at all."""
    for m in tn.net.members:
        path = Path(m.home) / Home(m.home).load_config().abci_socket
        assert stat.S_ISSOCK(path.stat().st_mode), path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        toml = (Path(m.comet_home) / "config" / "config.toml").read_text()
        assert f'proxy_app = "unix://{path}"' in toml
        if Path("/proc/net/tcp").exists():
            assert tcp_listeners(m.abci_port) == set()


def test_only_members_nodes_are_admitted_as_peers(tn: Harness) -> None:
    """filter_peers: CometBFT asks the app about each new peer, and the app admits the
    node ids the ledger lists for active members. A stranger's CometBFT, with the
    genesis and every member as a persistent peer, gets no peer and no block."""
    root = Path(tn.net.dir)
    members = [cometbft.node_id(Path(m.comet_home)) for m in tn.net.members]
    for i, m in enumerate(tn.net.members):
        toml = (Path(m.comet_home) / "config" / "config.toml").read_text()
        assert "filter_peers = true" in toml
        for node in members:
            assert tn.rpc(i, "abci_query", path=f"/p2p/filter/id/{node}")["response"].get(
                "code", 0) == 0
    home = root / "stranger"
    cometbft.init_home(home, "stranger")
    stranger = cometbft.node_id(home)
    refused = tn.rpc(0, "abci_query", path=f"/p2p/filter/id/{stranger}")["response"]
    assert refused.get("code", 0) != 0 and "not an active member" in refused["log"]
    p2p, rpc, abci = cometbft.free_ports(3)
    (home / "config" / "genesis.json").write_text(
        (Path(tn.net.members[0].comet_home) / "config" / "genesis.json").read_text())
    peers = ",".join(f"{node}@127.0.0.1:{m.p2p_port}"
                     for node, m in zip(members, tn.net.members, strict=True))
    cometbft.edit_config(home / "config" / "config.toml", {
        "rpc.laddr": f"tcp://127.0.0.1:{rpc}", "p2p.laddr": f"tcp://127.0.0.1:{p2p}",
        "p2p.persistent_peers": peers, "p2p.addr_book_strict": False,
        "p2p.allow_duplicate_ip": True})
    lay = cometbft.NodeLayout(9, "stranger", home, stranger, p2p, rpc, abci)
    proc = cometbft.start_node(lay, extra_args=["--proxy_app=kvstore"])
    tn.procs.append(proc)
    try:
        eventually(lambda: httpx.get(f"http://127.0.0.1:{rpc}/status", timeout=2)
                   .status_code == 200, 30, "the stranger's RPC")
        time.sleep(8)  # several dial rounds to every member
        info = httpx.get(f"http://127.0.0.1:{rpc}/net_info", timeout=5).json()["result"]
        assert int(info["n_peers"]) == 0, info["peers"]
        status = httpx.get(f"http://127.0.0.1:{rpc}/status", timeout=5).json()["result"]
        assert int(status["sync_info"]["latest_block_height"]) == 0
        ids = {p["node_info"]["id"] for p in tn.rpc(0, "net_info")["peers"]}
        assert stranger not in ids and set(members[1:]) <= ids
    finally:
        cometbft.stop_node(proc, 10)


def test_kill9_of_a_node_leaves_no_orphans_and_net_start_cleans_up(tn: Harness) -> None:
    import os
    import signal

    m = tn.net.member(1)
    node_pid = m.node_pid
    assert node_pid is not None
    workers = eventually(lambda: _children(node_pid), 20, "the node's worker processes")
    os.kill(node_pid, signal.SIGKILL)  # the node alone, as a crash or an OOM kill would
    tn.reap()
    # PR_SET_PDEATHSIG: the validation workers die with the node, without any net command
    eventually(lambda: not any(network.pid_alive(w) for w in workers), 20,
               "the node's workers to exit")
    tn.start(1)  # net start: reaps what is left of the old group, starts the node again
    assert network.group_members(node_pid) == []
    eventually(lambda: httpx.get(m.api_url + "/readyz", timeout=5).status_code == 200, 60,
               "the restarted node to be ready")
    tn.wait_same_state(timeout=30)


def test_tampered_store_refuses_to_serve_and_the_rest_continue(tn: Harness) -> None:
    from typer.testing import CliRunner

    from medledger.cli.main import app

    m = tn.net.members[3]
    tn.stop(3)
    db = sqlite3.connect(Path(m.home) / "ledger.db")
    height, idx, raw = db.execute("SELECT height, idx, raw FROM txs WHERE code = 0 "
                                  "ORDER BY height DESC LIMIT 1").fetchone()
    flipped = bytearray(raw)
    flipped[len(flipped) // 2] ^= 0x01
    db.execute("UPDATE txs SET raw = ? WHERE height = ? AND idx = ?",
               (bytes(flipped), height, idx))
    db.commit()
    try:
        tn.start(3)
        health = httpx.get(m.api_url + "/healthz", timeout=5)
        assert health.status_code == 503
        assert f"block {height} tx {idx}" in health.json()["reason"]
        assert not network.pid_alive(m.comet_pid)  # never offered to CometBFT
        with Client(m.api_url, tn.doctors[0]) as c, pytest.raises(NodeError) as err:
            c.get(f"/fhir/Patient/{tn.patients[0]}")
        assert err.value.status == 503

        result = CliRunner().invoke(app, ["net", "status", "--dir", tn.net.dir],
                                    env={"COLUMNS": "200"})
        assert result.exit_code == 3, result.output
        assert "REFUSING" in result.output and "org-4" in result.output

        before = tn.heights([0, 1, 2])
        with Client(tn.urls[0], tn.doctors[0]) as c:
            c.post("/fhir/Observation", _observation(tn.patients[0], 3.0))
        assert min(tn.heights([0, 1, 2])) > min(before)
    finally:  # repair the byte; the node rejoins and catches up
        tn.stop(3)
        db.execute("UPDATE txs SET raw = ? WHERE height = ? AND idx = ?", (raw, height, idx))
        db.commit()
        db.close()
    tn.start(3)
    assert httpx.get(m.api_url + "/healthz", timeout=5).status_code == 200
    tn.wait_same_state(timeout=60)


def test_governance_fifth_org_joins_as_validator(tn: Harness) -> None:
    net = tn.net
    root = Path(net.dir)
    comet_home = root / "cometbft" / "node4"
    cometbft.init_home(comet_home, "node4")
    val_pub = network.validator_pub(comet_home)
    org5 = keys.new_identity("org-5", "org", {"name": "Elm Street Family Practice"})
    entry = org_genesis_entry(org5, "Elm Street Family Practice", val_pub,
                              node_id=cometbft.node_id(comet_home))
    chain = net.chain

    def org_tx(i: int, kind: str, body: dict[str, Any]) -> bytes:
        o = tn.orgs[i]
        raw: bytes = make_tx(o.id, o.signer(), chain, kind, body, uuid.uuid4().hex).raw
        return raw

    def org5_status(j: int) -> str:
        res = tn.rpc(j, "abci_query", path="/state", data=b"org/org-5".hex())
        value = res["response"].get("value")
        return str(orjson.loads(base64.b64decode(value))["status"]) if value else "absent"

    assert tn.post_raw(0, org_tx(0, "org.propose", {"org": entry})) == (200, "0")
    assert tn.post_raw(1, org_tx(1, "org.approve", {"org_id": "org-5"})) == (200, "0")
    tn.wait_same_state()
    assert {org5_status(j) for j in range(4)} == {"proposed"}  # 2 of 4 is no majority
    assert tn.post_raw(2, org_tx(2, "org.approve", {"org_id": "org-5"})) == (200, "0")
    tn.wait_same_state()
    assert {org5_status(j) for j in range(4)} == {"active"}

    # CometBFT applied the validator update: 5 validators, the new one with power 10
    def validators(j: int) -> dict[str, int]:
        res = tn.rpc(j, "validators")
        return {v["pub_key"]["value"]: int(v["voting_power"]) for v in res["validators"]}

    new_key = base64.b64encode(val_pub).decode()
    eventually(lambda: all(validators(j).get(new_key) == 10 and len(validators(j)) == 5
                           for j in range(4)), 20, "the validator update")

    # org-5 signs txs: it registers a practitioner of its own
    dr5 = keys.new_identity("dr-org5", "practitioner", {"role": "physician"})
    body = {"id": dr5.id, "kind": "practitioner", "role": "physician",
            "sign_pub": b64e(dr5.sign_public), "enc_pub": b64e(dr5.enc_public)}
    raw = make_tx(org5.id, org5.signer(), chain, "actor.register", body, uuid.uuid4().hex).raw
    assert tn.post_raw(3, raw) == (200, "0")

    # ...and runs its own node: a fifth validator process syncing from genesis
    genesis = Home(net.members[0].home).load_genesis()
    api_port, p2p, rpc, abci = cometbft.free_ports(4)
    home = init_home(root / "org-5", "org-5", "Elm Street Family Practice", PW,
                     genesis=genesis, identity=org5, port=api_port, scrypt_n=2**12)
    config = home.load_config()
    config.mode, config.abci_port = "cometbft", abci
    config.cometbft_rpc = f"http://127.0.0.1:{rpc}"
    config.extra["commit_timeout_s"] = COMMIT_TIMEOUT_S
    home.save_config(config)
    (comet_home / "config" / "genesis.json").write_text(
        (Path(net.members[0].comet_home) / "config" / "genesis.json").read_text())
    peers = ",".join(f"{cometbft.node_id(Path(m.comet_home))}@127.0.0.1:{m.p2p_port}"
                     for m in net.members)
    cometbft.edit_config(comet_home / "config" / "config.toml", {
        "proxy_app": f"tcp://127.0.0.1:{abci}", "abci": "socket",
        "rpc.laddr": f"tcp://127.0.0.1:{rpc}", "p2p.laddr": f"tcp://127.0.0.1:{p2p}",
        "p2p.persistent_peers": peers, "p2p.addr_book_strict": False,
        "p2p.allow_duplicate_ip": True, **cometbft.consensus_settings()})
    net.members.append(network.Member(4, "org-5", "Elm Street Family Practice", str(home.path),
                                      str(comet_home), api_port, rpc, p2p, abci))
    net.save()
    tn.start(4)
    eventually(lambda: tn.status(4)["height"] >= max(tn.heights([0, 1, 2, 3])), 60,
               "the fifth node to sync from genesis")
    tn.wait_same_state(timeout=30)
    # the new validator signs blocks
    def signed_by_new() -> bool:
        top = int(tn.rpc(0, "status")["sync_info"]["latest_block_height"])
        sigs = tn.rpc(0, "commit", height=str(top))["signed_header"]["commit"]["signatures"]
        addr = tn.rpc(4, "status")["validator_info"]["address"]
        return any(s.get("validator_address") == addr for s in sigs)
    eventually(signed_by_new, 90, "a commit signed by the fifth validator")  # after sync
