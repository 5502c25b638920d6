"""Unmodified Synthea 3.3.0 output loaded into a real node over HTTP, as FHIR servers are
loaded: the hospital and practitioner batches, then each patient's transaction Bundle.

The population is the session's (``synthea_population``, tests/conftest.py). The module
node imports every patient but the largest; the largest (34,600 resources, 86 MB) is
imported by the kill -9 test, which first interrupts an import of it part-way.
"""

from __future__ import annotations

import collections
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
from helpers import ORG_ID, PASSWORD, NodeHandle, run_cli, running_node

from medledger.client import Client
from medledger.crypto import keys
from medledger.search.index import VALUE_TABLES, SearchIndex, index_key

pytestmark = pytest.mark.timeout(3600)

LOINC = "http://loinc.org"
INSTRUMENTS = {"55757-9", "55758-7", "44249-1", "44261-6", "89206-7", "89204-2",
               "69737-5", "70274-6"}
DIRECTORY_TYPES = {"Organization", "Location", "Practitioner", "PractitionerRole", "Medication"}
BREAK_GLASS = {"X-Break-Glass-Reason": "integration test: every imported record must be readable"}


# -- helpers ----------------------------------------------------------------------------------


def _post_bundle(node: NodeHandle, path: Path, timeout: float = 3000) -> httpx.Response:
    with node.client(ORG_ID) as c:
        return httpx.post(node.url + "/fhir", content=path.read_bytes(), timeout=timeout,
                          headers={"Authorization": f"Bearer {c.token()}",
                                   "Content-Type": "application/fhir+json"})


def _entries(path: Path) -> list[dict[str, Any]]:
    return list(orjson.loads(path.read_bytes())["entry"])


def _patient_id(path: Path) -> str:
    return next(e["resource"]["id"] for e in _entries(path)
                if e["resource"]["resourceType"] == "Patient")


def _codes(resource: dict[str, Any]) -> set[str]:
    return {c.get("code") for c in resource.get("code", {}).get("coding", [])
            if c.get("system") == LOINC}


def _labels(resource: dict[str, Any]) -> set[str]:
    return {s.get("code") for s in resource.get("meta", {}).get("security", [])}


def _get(node: NodeHandle, who: str, path: str, **headers: str) -> dict[str, Any]:
    """GET as a FHIR client does: a 503 with Retry-After (the search index catching up
    after a large import) is retried after the time it names, for at most 10 minutes."""
    deadline = time.time() + 600
    with node.client(who) as c:
        headers = {"Authorization": f"Bearer {c.token()}", **headers}
        while True:
            resp = httpx.get(f"{node.url}/fhir/{path}", timeout=600, headers=headers)
            retry = resp.headers.get("Retry-After")
            if resp.status_code != 503 or retry is None or time.time() > deadline:
                break
            time.sleep(int(retry))
    assert resp.status_code == 200, resp.text[:500]
    return dict(resp.json())


def _everything(node: NodeHandle, who: str, pid: str, **headers: str) -> dict[str, Any]:
    return _get(node, who, f"Patient/{pid}/$everything", **headers)


def _search(node: NodeHandle, who: str, query: str) -> dict[str, Any]:
    return _get(node, who, query)


def _matches(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", [])
            if e.get("search", {}).get("mode") == "match"]


def _withheld(bundle: dict[str, Any]) -> str:
    return " ".join(i.get("diagnostics", "") for e in bundle.get("entry", [])
                    if e.get("search", {}).get("mode") == "outcome"
                    for i in e["resource"]["issue"])


def _statuses(resp: httpx.Response) -> collections.Counter[str]:
    assert resp.status_code == 200, resp.text[:800]
    return collections.Counter(e["response"]["status"] for e in resp.json()["entry"])


def _normalise(resource: dict[str, Any], refs: dict[str, str]) -> Any:
    """A file's resource as the node stores it: references resolved, meta set aside."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (refs.get(v, v) if k == "reference" and isinstance(v, str) else walk(v))
                    for k, v in node.items() if k != "meta"}
        if isinstance(node, list):
            return [walk(x) for x in node]
        return node
    return walk(resource)


def _reference_map(population: SyntheaPopulation, path: Path) -> dict[str, str]:
    """urn:uuid and conditional references of ``path`` -> Type/id, from the files alone."""
    refs = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in _entries(path)}
    for dir_path in population.directory:
        for e in _entries(dir_path):
            r = e["resource"]
            for ident in r.get("identifier", []):
                refs[f"{r['resourceType']}?identifier={ident['system']}|{ident['value']}"] = \
                    f"{r['resourceType']}/{r['id']}"
    return refs


# -- the module's node: directory + every patient but the largest --------------------------


@pytest.fixture(scope="module")
def imported(synthea_population: SyntheaPopulation, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[NodeHandle, dict[str, httpx.Response]]]:
    with running_node(tmp_path_factory.mktemp("synthea") / "home",
                      extra={"validation_workers": 2}) as node:
        responses = {}
        for path in synthea_population.directory + synthea_population.patients[:-1]:
            responses[path.name] = _post_bundle(node, path)
        yield node, responses


def test_directory_batches_import_entry_by_entry(
        synthea_population: SyntheaPopulation,
        imported: tuple[NodeHandle, dict[str, httpx.Response]]) -> None:
    node, responses = imported
    for path in synthea_population.directory:
        resp = responses[path.name]
        assert resp.json()["type"] == "batch-response"
        assert _statuses(resp) == {"201 Created": len(_entries(path))}
        for entry in resp.json()["entry"]:
            assert entry["response"]["location"].endswith("/_history/1")


def test_every_patient_bundle_imports_with_per_type_counts(
        synthea_population: SyntheaPopulation,
        imported: tuple[NodeHandle, dict[str, httpx.Response]]) -> None:
    node, responses = imported
    for path in synthea_population.patients[:-1]:
        resp = responses[path.name]
        entries = _entries(path)
        assert resp.json()["type"] == "transaction-response"
        # Medication entries a patient bundle shares with others are directory records:
        # a later patient finds the first patient's (same id, same content)
        assert set(_statuses(resp)) <= {"201 Created", "200 OK"}
        assert len(resp.json()["entry"]) == len(entries)
        pid = _patient_id(path)
        found = _everything(node, "dr-house", pid, **BREAK_GLASS)
        got = collections.Counter(r["resourceType"] for r in _matches(found))
        want = collections.Counter(e["resource"]["resourceType"] for e in entries
                                   if e["resource"]["resourceType"] not in DIRECTORY_TYPES)
        assert got == want, path.name


def test_everything_returns_every_imported_resource_as_sent(
        synthea_population: SyntheaPopulation,
        imported: tuple[NodeHandle, dict[str, httpx.Response]]) -> None:
    node, _ = imported
    for path in synthea_population.patients[:3]:
        refs = _reference_map(synthea_population, path)
        pid = _patient_id(path)
        stored = {f"{r['resourceType']}/{r['id']}": r
                  for r in _matches(_everything(node, "dr-house", pid, **BREAK_GLASS))}
        for e in _entries(path):
            r = e["resource"]
            if r["resourceType"] in DIRECTORY_TYPES:
                continue
            key = f"{r['resourceType']}/{r['id']}"
            assert _normalise(stored[key], {}) == _normalise(r, refs), key
            assert stored[key]["meta"]["versionId"] == "1"
        # without breaking the glass a physician sees part and is told about the rest
        plain = _everything(node, "dr-house", pid)
        shown = {f"{r['resourceType']}/{r['id']}" for r in _matches(plain)}
        withheld = _withheld(plain)
        for key in stored:
            assert key in shown or key in withheld, key


def test_screening_instruments_carry_psy_and_a_nurse_sees_none(
        synthea_population: SyntheaPopulation,
        imported: tuple[NodeHandle, dict[str, httpx.Response]]) -> None:
    node, _ = imported
    screened = 0
    for path in synthea_population.patients[:-1]:
        pid = _patient_id(path)
        everything = _matches(_everything(node, "dr-house", pid, **BREAK_GLASS))
        instruments = [r for r in everything if _codes(r) & INSTRUMENTS]
        for resource in instruments:
            assert "PSY" in _labels(resource), resource["id"]
        screened += bool(instruments)
        nurse = _search(node, "nurse-joy", f"Observation?patient={pid}")
        assert all("PSY" not in _labels(r) for r in _matches(nurse))
        assert not any(_codes(r) & INSTRUMENTS for r in _matches(nurse))
        assert _matches(nurse), "a nurse sees the vital signs"
        conditions = _search(node, "nurse-joy", f"Condition?patient={pid}")
        assert _matches(conditions) == []
        everything_nurse = _matches(_everything(node, "nurse-joy", pid))
        assert {r["resourceType"] for r in everything_nurse}.isdisjoint({"Condition"})
        assert all("PSY" not in _labels(r) for r in everything_nurse)
    assert screened >= 3


def test_one_practitioner_record_for_every_patient_that_names_it(
        synthea_population: SyntheaPopulation,
        imported: tuple[NodeHandle, dict[str, httpx.Response]]) -> None:
    node, _ = imported
    practitioners = _matches(_search(node, "dr-house", "Practitioner"))
    npis = [i["value"] for p in practitioners for i in p["identifier"]]
    assert len(npis) == len(set(npis)) == sum(
        1 for e in _entries(synthea_population.practitioners)
        if e["resource"]["resourceType"] == "Practitioner")
    # encounters of different patients point at the same directory ids
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for path in synthea_population.patients[:-1]:
        pid = _patient_id(path)
        for r in _matches(_search(node, "dr-house", f"Encounter?patient={pid}")):
            for p in r.get("participant", []):
                seen[p["individual"]["reference"]].add(pid)
    assert any(len(patients) > 1 for patients in seen.values())
    ids = {f"Practitioner/{p['id']}" for p in practitioners}
    assert set(seen) <= ids


def test_reimport_changes_nothing(
        synthea_population: SyntheaPopulation,
        imported: tuple[NodeHandle, dict[str, httpx.Response]]) -> None:
    node, first = imported
    for path in [*synthea_population.directory, synthea_population.patients[0]]:
        again = _post_bundle(node, path)
        assert _statuses(again) == {"200 OK": len(_entries(path))}
        before = [e["response"]["location"] for e in first[path.name].json()["entry"]]
        after = [e["response"]["location"] for e in again.json()["entry"]]
        assert after == before  # same ids, no new versions


def _index_rows(node: NodeHandle) -> set[tuple[Any, ...]]:
    """Every row of a stopped node's search index, named by record and parameter (row and
    parameter ids are an index's own)."""
    assert node.org is not None
    index = SearchIndex(node.home / "index.db", index_key(node.org.enc_private))
    try:
        rows = {("res", *r) for r in index.query(
            "SELECT types.type, res.id, v, patient, category, labels, updated FROM res "
            "JOIN types USING (tid)")}
        rows |= {("blk", *r) for r in index.query(
            "SELECT key, res.id FROM blk JOIN res USING (rid)")}
        for table in VALUE_TABLES:
            cols = [str(c[1]) for c in index.query(f"PRAGMA table_info({table})")
                    if c[1] not in ("pid", "rid")]
            rows |= {(table, *r) for r in index.query(
                f"SELECT params.type, params.code, res.id, {', '.join('x.' + c for c in cols)} "
                f"FROM {table} x JOIN params USING (pid) JOIN res USING (rid)")}
    finally:
        index.close()
    return rows


def test_the_import_indexes_what_a_rebuild_from_the_ledger_does(
        imported: tuple[NodeHandle, dict[str, httpx.Response]]) -> None:
    """The node indexes its own imports from the values its sealing workers extracted
    (no decryption): the index equals one rebuilt by decrypting every ledger head."""
    node, _ = imported
    _search(node, "dr-house", "Patient?_count=1")  # the index has reached the ledger
    node.stop()
    try:
        hinted = _index_rows(node)
        res = run_cli("index", "rebuild", "--home", str(node.home), "--quiet", timeout=900)
        assert res.returncode == 0, res.stderr
        rebuilt = _index_rows(node)
    finally:
        node.start()
    assert len(hinted) > 100_000
    assert hinted == rebuilt


# -- the largest patient: kill -9 part-way, then the retry ----------------------------------


def _stage_entries(home: Path) -> tuple[int, int]:
    """(staged parts, committed records of any patient) in a node's ledger.db."""
    try:
        db = sqlite3.connect(f"file:{home / 'ledger.db'}?mode=ro", uri=True, timeout=1)
        try:
            staged = db.execute("SELECT count(*) FROM state WHERE key LIKE 'stage/%'"
                                ).fetchone()[0]
            records = db.execute("SELECT count(*) FROM state WHERE key LIKE 'pat/%'"
                                 ).fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0, 0
    return int(staged), int(records)


def test_kill9_mid_import_leaves_nothing_then_the_largest_patient_imports(
        synthea_population: SyntheaPopulation, tmp_path: Path) -> None:
    largest = synthea_population.largest
    entries = _entries(largest)
    assert len(entries) >= 10_000 and largest.stat().st_size >= 20e6
    pid = _patient_id(largest)
    # small parts: many import.part txs, so the kill lands between begin and commit
    with running_node(tmp_path / "home", extra={"validation_workers": 2,
                                                "import_part_bytes": 64 * 1024}) as node:
        for path in synthea_population.directory:
            assert _post_bundle(node, path).status_code == 200
        outcome: dict[str, Any] = {}
        poster = threading.Thread(target=lambda: outcome.update(
            resp=_try_post(node, largest)), daemon=True)
        poster.start()
        deadline = time.time() + 3000
        while _stage_entries(node.home)[0] == 0:
            assert time.time() < deadline and poster.is_alive(), outcome
            time.sleep(0.2)
        node.kill9()  # part of the import is staged, nothing committed
        poster.join(60)
        node.start()
        deadline = time.time() + 60
        while _stage_entries(node.home)[0] and time.time() < deadline:
            time.sleep(0.2)  # the node aborts the open import when it starts
        assert _stage_entries(node.home) == (0, 0)
        with node.client("dr-house") as c:
            resp = httpx.get(f"{node.url}/fhir/Patient/{pid}", timeout=60,
                             headers={"Authorization": f"Bearer {c.token()}"})
        assert resp.status_code == 404
        # the client retries: the whole patient arrives, atomically
        again = _post_bundle(node, largest)
        statuses = _statuses(again)
        assert sum(statuses.values()) == len(entries)
        assert set(statuses) <= {"201 Created", "200 OK"}
        found = _everything(node, "dr-house", pid, **BREAK_GLASS)
        assert len(_matches(found)) == sum(1 for e in entries if e["resource"]["resourceType"]
                                           not in DIRECTORY_TYPES)


def _try_post(node: NodeHandle, path: Path) -> Any:
    try:
        return _post_bundle(node, path)
    except httpx.HTTPError as exc:  # the node was killed under it
        return exc


def test_the_demo_loads_synthea_and_a_second_run_on_its_home_changes_nothing(
        synthea_population: SyntheaPopulation, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`medledger demo` run again on its home: the patients it loaded are recognised
    (their Bundle's last record is there) and not re-posted -- the loader, a physician,
    may not overwrite records labelled for other roles without breaking the glass."""
    from medledger.cli.demo import seed_synthea
    with running_node(tmp_path / "home", staff=False) as node:
        first = seed_synthea(node.url, node.home, synthea_population.fhir_dir, 5000, 3)
        height = httpx.get(f"{node.url}/ledger/status", timeout=10).json()["height"]
        assert len(first) == 3
        posted: list[str] = []
        request = Client.request

        def counted(self: Client, method: str, path: str, *args: Any, **kw: Any) -> Any:
            if method in ("POST", "PUT"):
                posted.append(f"{method} {path}")
            return request(self, method, path, *args, **kw)

        monkeypatch.setattr(Client, "request", counted)
        again = seed_synthea(node.url, node.home, synthea_population.fhir_dir, 5000, 3)
        assert again == first
        assert posted == ["POST /fhir", "POST /fhir"]  # the directory batches only
        node.staff["dr-house"] = keys.load_keystore(node.home / "demo-keys" / "dr-house.json",
                                                    PASSWORD)
        for pid in first:
            found = _everything(node, "dr-house", pid, **BREAK_GLASS)
            records = _matches(found)
            assert records and all(r["meta"]["versionId"] == "1" for r in records)
        assert httpx.get(f"{node.url}/ledger/status", timeout=10).json()["height"] - height < 20
