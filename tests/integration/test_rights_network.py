"""Erasure by crypto-shredding on a real 4-validator CometBFT network (8 processes).

Genesis retention: immunizations are kept 10 years. A patient of org-1 has two vital-sign
observations (one with two versions) and an immunization, and a share link to all of
them. A copy of org-4's node home is taken (a backup) before the patient erases the
first observation through ``Patient/$erase``. Then, in order:

- every node answers 410 for the erased record (read and vread), still serves the other
  one, and holds neither the erased blobs in ``blobs.db`` nor their bytes in any file of
  the node home or CometBFT home (WAL included); the old share link answers 410; early
  erasure of the immunization is refused naming the retention rule; the erasure is in
  the patient's list and the audit trail (who, when, basis);
- the backup: ``blobs.db`` alone restored -> purged at start, before serving; the whole
  home restored (an older ledger too) -> no content served until the node has replayed
  the erasure, never the erased record;
- a new node syncing from genesis never receives the erased content (it does receive
  the rest) and ``medledger verify`` passes on it and on every validator.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from test_network import Harness, _doctor, _observation, _patient, eventually

from medledger.client import Client
from medledger.consensus import cometbft
from medledger.core.machine import BlockApplied  # noqa: F401  (import check: core loads)
from medledger.fhir import shl
from medledger.node import network
from medledger.node.home import Home, init_home

pytestmark = [pytest.mark.network, pytest.mark.timeout(600)]

PW = "network-test-password"
YEAR = 365 * 86400


class World:
    def __init__(self, tn: Harness) -> None:
        self.tn = tn
        self.pid = f"pat-{uuid.uuid4().hex[:8]}"
        self.dr = _doctor(tn, 0)
        self.obs_a = self.obs_b = self.imm = ""
        self.blobs_a: list[str] = []
        self.blob_b = ""
        self.shlink = ""
        self.backup = Path()
        self.extra: list[subprocess.Popen[bytes]] = []


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("rightsnet")
    net = network.create_network(directory, 4, PW, chain="medledger-rights-net",
                                 commit_timeout_s=8.0, scrypt_n=2**12,
                                 retention={"immunizations": 10 * YEAR})
    tn = Harness(net)
    world: World | None = None
    try:
        tn.start(0, 1, 2, 3)
        eventually(lambda: min(tn.heights()) >= 2, 60, "the first blocks")
        world = World(tn)
        world.backup = directory / "backup-org-4"
        yield world
    finally:
        for p in world.extra if world else []:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        network.stop_and_reap(net, tn.procs, timeout=5)


# --------------------------------------------------------------------------- helpers

def login(url: str, actor: str, password: str = PW) -> httpx.Client:
    resp = httpx.post(url + "/auth/login", json={"id": actor, "password": password}, timeout=30)
    assert resp.status_code == 200, resp.text
    return httpx.Client(base_url=url, timeout=60, headers={
        "Authorization": f"Bearer {resp.json()['access_token']}",
        "Content-Type": "application/fhir+json"})


def erase_params(basis: str, **scope: Any) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": "basis", "valueCode": basis}]
    for ref in scope.get("records", []):
        params.append({"name": "record", "valueString": ref})
    if "category" in scope:
        params.append({"name": "category", "valueCode": scope["category"]})
    if scope.get("all"):
        params.append({"name": "all", "valueBoolean": True})
    return {"resourceType": "Parameters", "parameter": params}


def state_value(home: str, key: str) -> dict[str, Any] | None:
    db = sqlite3.connect(f"file:{Path(home) / 'ledger.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    return None if row is None else dict(orjson.loads(row[0]))


def blob_rows(home: str | Path, hashes: list[str], table: str = "blobs") -> set[str]:
    db = sqlite3.connect(f"file:{Path(home) / 'blobs.db'}?mode=ro", uri=True)
    try:
        return {h for h in hashes if db.execute(
            f"SELECT 1 FROM {table} WHERE hash = ?", (bytes.fromhex(h),)).fetchone()}
    finally:
        db.close()


def blob_bytes(home: str | Path, h: str) -> bytes:
    db = sqlite3.connect(f"file:{Path(home) / 'blobs.db'}?mode=ro", uri=True)
    try:
        return bytes(db.execute("SELECT data FROM blobs WHERE hash = ?",
                                (bytes.fromhex(h),)).fetchone()[0])
    finally:
        db.close()


def slices(blob: bytes) -> list[bytes]:
    """Short pieces of a blob from several offsets (SQLite may split a blob over pages)."""
    step = max(1, (len(blob) - 32) // 6)
    return [blob[i:i + 32] for i in range(0, len(blob) - 32, step)][:6]


def files_holding(dirs: list[Path], pieces: list[bytes]) -> list[str]:
    found = []
    for d in dirs:
        for f in d.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                found += [f"{f}" for p in pieces if p in data]
    return found


def read_status(url: str, dr: Any, path: str) -> int:
    with Client(url, dr) as c:
        return c._send("GET", path).status_code  # noqa: SLF001


def member_dirs(m: network.Member) -> list[Path]:
    return [Path(m.home), Path(m.comet_home)]


# --------------------------------------------------------------------------- tests

def test_erasure_on_every_node(w: World) -> None:
    tn, pid = w.tn, w.pid
    with Client(tn.urls[0], w.dr) as c:
        c.request("PUT", f"/fhir/Patient/{pid}", _patient(pid),
                  headers={"X-Medledger-Patient-Password": PW})
        a = c.post("/fhir/Observation", _observation(pid, 61))
        c.put(f"/fhir/Observation/{a['id']}", {**_observation(pid, 62), "id": a["id"]})
        b = c.post("/fhir/Observation", _observation(pid, 63))
        imm = c.post("/fhir/Immunization", {
            "resourceType": "Immunization", "status": "completed",
            "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx",
                                        "code": "140"}]},
            "patient": {"reference": f"Patient/{pid}"},
            "occurrenceDateTime": "2024-10-01"})
    w.obs_a, w.obs_b, w.imm = a["id"], b["id"], imm["id"]
    home0 = tn.net.members[0].home
    w.blobs_a = [state_value(home0, f"ver/Observation/{a['id']}/{v:010d}")["blob"]  # type: ignore[index]
                 for v in (1, 2)]
    w.blob_b = state_value(home0, f"ver/Observation/{b['id']}/{1:010d}")["blob"]  # type: ignore[index]
    with login(tn.urls[0], pid) as me:
        share = me.post("/api/shares", json={"selection": {}, "expires_in_s": 3600,
                                             "label": "for my dentist"})
        assert share.status_code == 201, share.text
    w.shlink = share.json()["shlink"]
    manifest_url = shl.decode_shlink(w.shlink).url
    assert httpx.post(manifest_url, json={"recipient": "Dr Tooth"}).status_code == 200

    # every node holds the content and serves it
    tn.wait_same_state()
    for j in range(4):
        eventually(lambda j=j: blob_rows(tn.net.members[j].home, w.blobs_a + [w.blob_b])
                   == set(w.blobs_a + [w.blob_b]), 30, f"node {j} to replicate the blobs")
        assert read_status(tn.urls[j], w.dr, f"/fhir/Observation/{w.obs_a}") == 200

    # a backup of org-4's node home before the erasure (graceful stop: WAL checkpointed)
    m3 = tn.net.members[3]
    tn.stop(3)
    shutil.copytree(m3.home, w.backup)
    tn.start(3)
    pieces = [p for h in w.blobs_a for p in slices(blob_bytes(w.backup, h))]
    assert files_holding([w.backup], pieces), "the byte scan must see the blob in the backup"

    # refusals first: the retention rule, bad parameters, the wrong people
    with login(tn.urls[0], pid) as me:
        url = f"/fhir/Patient/{pid}/$erase"
        r = me.post(url, json=erase_params("consent-withdrawn",
                                           records=[f"Immunization/{w.imm}"]))
        assert r.status_code == 403, r.text
        assert "retention rule 'immunizations: keep 3650 days'" in r.text
        r = me.post(url, json=erase_params("because", records=[f"Observation/{w.obs_a}"]))
        assert r.status_code == 400 and "basis must be one of" in r.text
        r = me.post(url, json=erase_params("objection", category="vital-signs", all=True))
        assert r.status_code == 400 and "exactly one scope" in r.text
        r = me.post(url, json=erase_params("objection", records=["Observation/nope"]))
        assert r.status_code == 404 and "not a record of patient" in r.text
        r = me.post(url, json={"resourceType": "Patient"})
        assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    with Client(tn.urls[0], w.dr) as c:
        r = c._send("POST", f"/fhir/Patient/{pid}/$erase",  # noqa: SLF001
                    json=erase_params("objection", records=[f"Observation/{w.obs_a}"]))
        assert r.status_code == 403 and "only the patient" in r.text

    # the erasure, by the patient
    with login(tn.urls[0], pid) as me:
        r = me.post(f"/fhir/Patient/{pid}/$erase",
                    json=erase_params("consent-withdrawn", records=[f"Observation/{w.obs_a}"]))
        assert r.status_code == 200, r.text
        out = {p["name"]: p for p in r.json()["parameter"]}
        assert out["versionsErased"]["valueInteger"] == 2
        assert out["basis"]["valueCode"] == "consent-withdrawn"
        assert out["erasedBy"]["valueString"] == pid
        listed = me.get("/api/erasures").json()
        assert [(e["basis"], e["by"], e["versions"]) for e in listed] == [
            ("consent-withdrawn", pid, 2)]
        assert listed[0]["scope"] == {"records": [f"Observation/{w.obs_a}"]}

    tn.wait_same_state()
    for j, m in enumerate(tn.net.members):
        assert read_status(tn.urls[j], w.dr, f"/fhir/Observation/{w.obs_a}") == 410
        assert read_status(tn.urls[j], w.dr, f"/fhir/Observation/{w.obs_a}/_history/1") == 410
        assert read_status(tn.urls[j], w.dr, f"/fhir/Observation/{w.obs_b}") == 200
        eventually(lambda m=m: not blob_rows(m.home, w.blobs_a), 20, f"node {j} to delete")
        assert blob_rows(m.home, [w.blob_b]) == {w.blob_b}
        assert files_holding(member_dirs(m), pieces) == [], f"erased bytes left on node {j}"
    # the old share link (it included the erased record) is gone too
    r = httpx.post(manifest_url, json={"recipient": "Dr Tooth"})
    assert r.status_code == 410, r.text
    # who erased what, when and on which basis: in the audit trail
    with Client(tn.urls[0], tn.orgs[0]) as c:
        events = c.get(f"/fhir/AuditEvent?patient={pid}&_count=1000")["entry"]
    erase_events = [e["resource"] for e in events
                    if e["resource"]["type"].get("code") == "erase"]
    refused = [e for e in erase_events if e["outcome"] != "0"]
    erase_events = [e for e in erase_events if e["outcome"] == "0"]
    assert len(refused) == 1  # the physician's attempt, audited as a refusal
    assert len(erase_events) == 1 and erase_events[0]["action"] == "D"
    ext = {x["url"].rsplit("/", 1)[-1]: x for x in erase_events[0]["extension"]}
    assert ext["access-basis"]["valueString"] == "consent-withdrawn"
    assert erase_events[0]["agent"][0]["who"]["reference"] == f"Patient/{pid}"


def test_disclosures_list_reads_by_other_organisations(w: World) -> None:
    tn, pid = w.tn, w.pid
    with login(tn.urls[0], pid) as me:
        r = me.post("/api/consents", json={"decision": "permit", "orgs": ["org-2"]})
        assert r.status_code == 201, r.text
    dr2 = _doctor(tn, 1)
    tn.wait_same_state()
    with Client(tn.urls[1], dr2) as c:  # another organisation, let in by the consent
        c.get(f"/fhir/Observation/{w.obs_b}")

    def listed() -> list[dict[str, Any]]:
        with login(tn.urls[0], pid) as me:
            doc = me.get(f"/fhir/Patient/{pid}/$disclosures").json()
        return [e["resource"] for e in doc.get("entry", [])]

    def by_org2() -> list[dict[str, Any]]:
        return [r for r in listed() if r["agent"][0]["who"]["reference"].endswith(dr2.id)]

    found = eventually(by_org2, 30, "org-2's read in the accounting at org-1's node")
    ext = {x["url"].rsplit("/", 1)[-1]: x for x in found[0]["extension"]}
    assert ext["disclosure-kind"]["valueCode"] == "other-organisation"
    assert found[0]["agent"][1]["who"]["reference"] == "Organization/org-2"
    import base64

    from medledger.core import proofs
    proof = orjson.loads(base64.b64decode(ext["ledger-proof"]["valueAttachment"]["data"]))
    # checked against a header served by a third organisation's node
    other = tn.header(2, int(proof["header"]["height"]))
    from medledger.core.machine import header_hash
    assert proofs.verify_proof(proof, header_hash(other).hex())
    kinds = {x["valueCode"] for r in listed() for x in r["extension"]
             if x["url"].endswith("disclosure-kind")}
    assert {"other-organisation", "share-link"} <= kinds
    # the treatment reads by org-1's own physician are not disclosures
    assert not [r for r in listed() if r["agent"][0]["who"]["reference"].endswith(w.dr.id)]


def _restore(src: Path, dst: Path, names: list[str]) -> None:
    for name in names:
        for suffix in ("", "-wal", "-shm"):
            (dst / f"{name}{suffix}").unlink(missing_ok=True)
            if (src / f"{name}{suffix}").exists():
                shutil.copy2(src / f"{name}{suffix}", dst / f"{name}{suffix}")


def test_restored_blob_store_is_purged_before_serving(w: World) -> None:
    tn, m = w.tn, w.tn.net.members[3]
    tn.stop(3)
    _restore(w.backup, Path(m.home), ["blobs.db"])
    assert blob_rows(m.home, w.blobs_a) == set(w.blobs_a)  # the old copy holds them
    tn.start(3)  # returns once the API answers: the purge ran before
    assert blob_rows(m.home, w.blobs_a) == set()
    assert "sealed blobs the ledger has erased since this copy was made" in \
        m.node_log.read_text()
    eventually(lambda: read_status(tn.urls[3], w.dr, f"/fhir/Observation/{w.obs_a}") == 410,
               60, "node 4 to serve again")


def test_restored_home_serves_nothing_erased_while_it_catches_up(w: World) -> None:
    tn, m = w.tn, w.tn.net.members[3]
    tn.stop(3)
    _restore(w.backup, Path(m.home), ["ledger.db", "blobs.db"])
    erased_key = f"ver/Observation/{w.obs_a}/{1:010d}"
    assert "erased" not in (state_value(m.home, erased_key) or {})  # an older ledger
    tn.start(3)
    seen = []
    while not seen or seen[-1] != 410:  # never the content: 503 while behind, then 410
        seen.append(read_status(tn.urls[3], w.dr, f"/fhir/Observation/{w.obs_a}"))
        assert seen[-1] in (410, 503), seen
        assert len(seen) < 2000, "node 4 never caught up"
    assert 503 in seen  # it was behind and said so
    tn.wait_same_state()
    assert blob_rows(m.home, w.blobs_a) == set()
    assert read_status(tn.urls[3], w.dr, f"/fhir/Observation/{w.obs_b}") == 200


def test_node_syncing_from_genesis_never_receives_erased_content(w: World,
                                                                 tmp_path: Path) -> None:
    tn = w.tn
    net = tn.net
    m3 = net.members[3]
    org4 = network.org_identity(m3, PW)
    api_port, p2p, rpc, abci = cometbft.free_ports(4)
    home = init_home(tmp_path / "org-4-b", org4.id, m3.name, PW,
                     genesis=Home(m3.home).load_genesis(), identity=org4, port=api_port,
                     scrypt_n=2**12)
    config = home.load_config()
    config.mode, config.abci_port = "cometbft", abci
    config.cometbft_rpc = f"http://127.0.0.1:{rpc}"
    home.save_config(config)
    comet_home = tmp_path / "comet-b"
    cometbft.init_home(comet_home, "full-node-b")
    # peers admit only the nodes the ledger names: org-4 names its second node first
    out = subprocess.run([sys.executable, "-m", "medledger", "org", "nodes", "--home",
                          m3.home, cometbft.node_id(Path(m3.comet_home)),
                          cometbft.node_id(comet_home)],
                         env={**__import__("os").environ, "MEDLEDGER_PASSWORD": PW},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "names 2 node(s)" in out.stdout, out.stdout + out.stderr
    (comet_home / "config" / "genesis.json").write_text(
        (Path(m3.comet_home) / "config" / "genesis.json").read_text())
    peers = ",".join(f"{cometbft.node_id(Path(m.comet_home))}@127.0.0.1:{m.p2p_port}"
                     for m in net.members)
    cometbft.edit_config(comet_home / "config" / "config.toml", {
        "proxy_app": f"tcp://127.0.0.1:{abci}", "abci": "socket",
        "rpc.laddr": f"tcp://127.0.0.1:{rpc}", "p2p.laddr": f"tcp://127.0.0.1:{p2p}",
        "p2p.persistent_peers": peers, "p2p.addr_book_strict": False,
        "p2p.allow_duplicate_ip": True, **cometbft.consensus_settings()})
    env = {**__import__("os").environ, "MEDLEDGER_PASSWORD": PW}
    log = open(tmp_path / "node-b.log", "ab")  # noqa: SIM115
    node = subprocess.Popen([sys.executable, "-m", "medledger", "node", "start", "--home",
                             str(home.path)], env=env, stdout=log, stderr=log,
                            start_new_session=True)
    w.extra.append(node)
    url = f"http://127.0.0.1:{api_port}"
    eventually(lambda: httpx.get(url + "/healthz", timeout=2).status_code == 200, 60,
               "the new node's API")
    comet = subprocess.Popen([str(cometbft.binary_path()), "start", "--home", str(comet_home)],
                             stdout=log, stderr=log, start_new_session=True)
    w.extra.append(comet)
    top = max(tn.heights())
    eventually(lambda: httpx.get(url + "/ledger/status").json()["height"] >= top, 120,
               "the new node to sync from genesis")
    # it fetches what is not erased (the positive control) and never the erased blobs
    eventually(lambda: blob_rows(home.path, [w.blob_b]) == {w.blob_b}, 60,
               "the new node to replicate the record that was not erased")
    assert blob_rows(home.path, w.blobs_a) == set()
    assert blob_rows(home.path, w.blobs_a, table="missing") == set()  # not even wanted
    assert read_status(url, w.dr, f"/fhir/Observation/{w.obs_a}") == 410
    for p in (comet, node):
        p.terminate()
        p.wait(15)
    pieces = [p for h in w.blobs_a for p in slices(blob_bytes(w.backup, h))]
    assert files_holding([home.path, comet_home], pieces) == []
    verify = subprocess.run([sys.executable, "-m", "medledger", "verify", "--home",
                             str(home.path)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "2 erased versions hold no content here" in verify.stdout


def test_verify_passes_on_every_validator_after_erasure(w: World) -> None:
    tn = w.tn
    tn.wait_same_state()
    network.stop_network(tn.net, timeout=10)
    tn.reap()
    env = {**__import__("os").environ, "MEDLEDGER_PASSWORD": PW}
    for m in tn.net.members:
        r = subprocess.run([sys.executable, "-m", "medledger", "verify", "--home", m.home],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "2 erased versions hold no content here" in r.stdout, r.stdout
        assert blob_rows(m.home, w.blobs_a) == set()
