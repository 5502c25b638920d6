"""The largest Synthea patient (34,600 resources, 86 MB) imported atomically on a real
4-validator CometBFT network of medledger nodes.

Loaded at org-1 over HTTP (a staged import: ``import.begin``, parts of at most 900 KiB,
inside CometBFT's 1 MiB ``mempool.max_tx_bytes``, and one ``import.commit``). While
it runs, org-2's ledger is sampled: it holds either none of the patient's records or
all of them, never part. Afterwards every node has the same records and app hash, and
every node holds every sealed blob (replicated from org-1).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import SyntheaPopulation

from medledger.client import Client
from medledger.consensus import cometbft
from medledger.consensus.cometbft import CometbftNotFound
from medledger.node import network

try:
    cometbft.binary_path()
except CometbftNotFound as exc:
    pytest.skip(str(exc), allow_module_level=True)

pytestmark = [pytest.mark.network, pytest.mark.timeout(3600)]

PW = "network-test-password"
DIRECTORY_TYPES = {"Organization", "Location", "Practitioner", "PractitionerRole", "Medication"}


def _count(home: str, sql: str, *args: Any) -> int:
    try:
        db = sqlite3.connect(f"file:{Path(home) / 'ledger.db'}?mode=ro", uri=True, timeout=2)
        try:
            return int(db.execute(sql, args).fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return -1


def _blobs(home: str) -> int:
    try:
        db = sqlite3.connect(f"file:{Path(home) / 'blobs.db'}?mode=ro", uri=True, timeout=2)
        try:
            return int(db.execute("SELECT count(*) FROM blobs").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return -1


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[network.Network]:
    # the import.commit block applies 34,600 record versions on each of four validators
    # sharing two cores: allow it more than the default 30 s to commit
    n = network.create_network(tmp_path_factory.mktemp("synthea-net"), 4, PW,
                               chain="medledger-synthea-net", scrypt_n=2**12,
                               commit_timeout_s=300)
    procs = network.start_members(n, [0, 1, 2, 3], PW, die_with_parent=True)
    try:
        yield n
    finally:
        network.stop_and_reap(n, procs)


def _post(url: str, token: str, path: Path) -> httpx.Response:
    return httpx.post(url + "/fhir", content=path.read_bytes(), timeout=3000,
                      headers={"Authorization": f"Bearer {token}",
                               "Content-Type": "application/fhir+json"})


def test_largest_patient_imports_atomically_on_four_validators(
        synthea_population: SyntheaPopulation, net: network.Network) -> None:
    largest = synthea_population.largest
    entries = orjson.loads(largest.read_bytes())["entry"]
    assert len(entries) >= 25_000 and largest.stat().st_size >= 64e6
    pid = next(e["resource"]["id"] for e in entries
               if e["resource"]["resourceType"] == "Patient")
    expected = sum(1 for e in entries if e["resource"]["resourceType"] not in DIRECTORY_TYPES)
    urls = [m.api_url for m in net.members]
    org = network.org_identity(net.members[0], PW)
    with Client(urls[0], org) as c:
        token = c.token()
    for path in synthea_population.directory:
        assert _post(urls[0], token, path).status_code == 200

    observed: list[int] = []
    done = threading.Event()

    def watch() -> None:  # org-2 sees none of the patient or all of it
        while not done.is_set():
            observed.append(_count(net.members[1].home,
                                   "SELECT count(*) FROM state WHERE key LIKE ?",
                                   f"pat/{pid}/%"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        resp = _post(urls[0], token, largest)
    finally:
        time.sleep(1)
        done.set()
        watcher.join(10)
    assert resp.status_code == 200, resp.text[:500]
    assert len(resp.json()["entry"]) == len(entries)
    assert set(observed) - {-1} <= {0, expected}, sorted(set(observed))
    # every node: the same records, the same app hash, every sealed blob
    deadline = time.time() + 900
    while time.time() < deadline:
        counts = [_count(m.home, "SELECT count(*) FROM state WHERE key LIKE ?",
                         f"pat/{pid}/%") for m in net.members]
        blobs = [_blobs(m.home) for m in net.members]
        if counts == [expected] * 4 and len(set(blobs)) == 1:
            break
        time.sleep(1)
    assert counts == [expected] * 4, counts
    assert len(set(blobs)) == 1 and blobs[0] >= expected, blobs
    statuses = [httpx.get(u + "/ledger/status", timeout=10).json() for u in urls]
    height = min(s["height"] for s in statuses)
    headers = []
    for u in urls:  # the raw ledger is for members: org-1 signs in at each node
        with Client(u, org) as c:
            headers.append(c.get(f"/ledger/blocks/{height}")["header"])
    assert all(h == headers[0] for h in headers)
